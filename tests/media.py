"""Test media made on the fly: videos encoded with PyAV whose frames carry their own index, images."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

BITS = 16


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    """A frame showing `index` in binary: BITS vertical bands, white for a set bit (robust to lossy codecs)."""
    frame = np.zeros((height, width, 3), np.uint8)
    band = width // BITS
    for bit in range(BITS):
        if index >> bit & 1:
            frame[:, bit * band:(bit + 1) * band] = 255
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index a decoded index_frame shows."""
    band = frame.shape[1] // BITS
    middle = frame[frame.shape[0] // 4: 3 * frame.shape[0] // 4]
    return sum(1 << bit for bit in range(BITS) if middle[:, bit * band + band // 4: (bit + 1) * band - band // 4].mean() > 128)


CONTAINERS = {"mp4": ("mp4", "mpeg4"), "mov": ("mov", "mpeg4"), "avi": ("avi", "mpeg4"), "mkv": ("matroska", "mpeg4"),
              "webm": ("webm", "libvpx-vp9")}


def make_video(num_frames: int, fps: float, *, width: int = 128, height: int = 96, kind: str = "mp4",
               frame_times: list[float] | None = None) -> bytes:
    """Encode a video whose frame i shows i. `frame_times` (seconds) makes a variable-frame-rate stream."""
    container_format, codec = CONTAINERS[kind]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, width, height), format="rgb24")
            if frame_times is not None:
                frame.pts = int(round(frame_times[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
