"""Videos: pick frames exactly as the InternVL cards do and decode only those frames (pure functions + decoders).

`sample_frame_indices` reproduces the cards' `get_index` (tests/data/frame_cases.json). Where the cards misbehave
(a start bound past the end of the video gives indices beyond the last frame, or descending ones), we refuse the
row with a clear error instead; an end bound past the end is clamped to the last frame, as the cards do.

Decoding dominates frame sampling: in a real video (H.264 with the encoder's default 250-frame GOP and B-frames)
each sampled frame needs every reference frame since its keyframe, so 8 frames of a 20 s clip decode ~all of it.
The cards' decord decodes every frame on the way. When PyAV is installed and the stream is one we have verified to
decode bit-identically to decord (8-bit 4:2:0/4:2:2/4:4:4 H.264, HEVC, MPEG-4 or VP9, not rotated), we decode
with PyAV instead and tell the decoder to drop non-reference frames (AVDISCARD_NONREF: frames no other frame
predicts from, typically half the B-frames) except the sampled ones: the same frames, pixel for pixel, for ~30%
less decoding. Anything else, or anything unexpected on the way, goes to decord exactly as the cards do.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pipeline.errors import MediaError
from pipeline.media.replies import reply_type

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"})


@dataclass(frozen=True)
class VideoLimits:
    """Caps checked from the container header, before any frame is decoded."""

    max_duration_s: float = 3600.0
    max_frames: int = 1_000_000
    max_pixels: int = 3840 * 2160


@reply_type  # sample_with_* may run in the decode sandbox (media/sandbox.py)
@dataclass(frozen=True)
class SampledFrames:
    """The frames picked from one video and what the output records about them."""

    frames: np.ndarray  # uint8 (num_segments, H, W, 3)
    indices: list[int]
    fps: float
    num_frames: int  # frames in the whole video

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def sample_frame_indices(
    *, num_frames: int, fps: float, num_segments: int, start_s: float | None = None, end_s: float | None = None
) -> list[int]:
    """The middle frame of each of `num_segments` equal segments of [start, end], as the cards' get_index.

    Raises ValueError when the start lies past the last frame (the cards would return out-of-range indices).
    """
    if num_frames < 1 or num_segments < 1:
        raise ValueError(f"need at least one frame and one segment, got num_frames={num_frames}, num_segments={num_segments}")
    max_frame = num_frames - 1
    start, end = (start_s, end_s) if start_s is not None or end_s is not None else (-100000, 100000)
    start = -100000 if start is None else start
    end = 100000 if end is None else end
    start_idx = max(0, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    if start_idx > max_frame:
        duration = num_frames / fps if fps > 0 else 0.0
        raise ValueError(f"video.start_s={start_s} is past the end of the video ({duration:.2f} s, {num_frames} frames)")
    if end_idx < start_idx:
        raise ValueError(f"video bound [{start_s}, {end_s}] selects no frames")
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * i)) for i in range(num_segments)]


def looks_like_video(data: bytes) -> bool:
    """Container magic numbers: ISO BMFF (mp4/mov: 'ftyp' at offset 4), Matroska/WebM (EBML), AVI (RIFF....AVI)."""
    head = data[:16]
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")


# Streams the PyAV path reproduces decord on (tests/test_video.py checks each against decord, pixel for pixel).
PYAV_CODECS = frozenset({"h264", "hevc", "mpeg4", "vp9"})
PYAV_PIXEL_FORMATS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuv444p"})


def _check_limits(*, num_frames: int, fps: float, width: int, height: int, limits: VideoLimits) -> None:
    """Header facts against the caps, before any frame is decoded."""
    if num_frames == 0 or fps <= 0:
        raise MediaError("decode_error", f"video has no frames (frames={num_frames}, fps={fps})")
    if width * height > limits.max_pixels:
        raise MediaError("too_large", f"video is {width}x{height}, over the {limits.max_pixels} pixel limit")
    if num_frames > limits.max_frames or num_frames / fps > limits.max_duration_s:
        raise MediaError(
            "too_large",
            f"video has {num_frames} frames ({num_frames / fps:.1f} s), over the limits of {limits.max_frames} frames "
            f"/ {limits.max_duration_s:g} s",
        )


def _indices(*, num_frames: int, fps: float, num_segments: int, start_s: float | None, end_s: float | None) -> list[int]:
    try:
        return sample_frame_indices(num_frames=num_frames, fps=fps, num_segments=num_segments, start_s=start_s,
                                    end_s=end_s)
    except ValueError as err:
        raise MediaError("bad_input", str(err)) from None


class Unverified(Exception):
    """The PyAV path cannot vouch for decord-identical frames here: decode with decord instead."""


def sample_with_pyav(data: bytes, *, num_segments: int = 8, start_s: float | None = None, end_s: float | None = None,
                     limits: VideoLimits = VideoLimits()) -> SampledFrames:
    """decord's frames (frame i = the i-th packet in presentation order), decoding no non-reference frame we skip.

    Raises Unverified when the stream is not one this path is verified on, or anything looks unusual.
    """
    import av

    try:
        container = av.open(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - let decord open (and classify) what PyAV cannot
        raise Unverified(str(err)) from None
    with container:
        try:
            stream = container.streams.best("video")
        except Exception:  # noqa: BLE001
            stream = None
        ctx = stream.codec_context if stream is not None else None
        if ctx is None or ctx.name not in PYAV_CODECS or ctx.format is None or ctx.format.name not in PYAV_PIXEL_FORMATS:
            raise Unverified("stream outside the verified codecs / pixel formats")
        # decord's frame list: every packet of the stream, sorted by pts (it indexes the file the same way)
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
        pts = sorted(p for p, _ in packets if p is not None)
        if len(pts) != len(packets) or len(set(pts)) != len(pts) or not stream.average_rate:
            raise Unverified("packets without distinct timestamps")
        num_frames, fps = len(pts), float(stream.average_rate)
        _check_limits(num_frames=num_frames, fps=fps, width=ctx.width, height=ctx.height, limits=limits)
        indices = _indices(num_frames=num_frames, fps=fps, num_segments=num_segments, start_s=start_s, end_s=end_s)
        wanted = {pts[i] for i in indices}
        keys = sorted(p for p, key in packets if key)
        ctx.thread_count = 1
        frames: dict[int, np.ndarray] = {}
        position: int | None = None  # pts of the last frame the decoder gave out
        for target in sorted(wanted):
            if target in frames:
                continue
            key = max((k for k in keys if k <= target), default=pts[0])
            if position is None or key > position or target <= position:
                container.seek(key, stream=stream, backward=True)  # to the keyframe; flushes the decoder
            for packet in container.demux(stream):
                # decode this packet's frame unless it is a non-reference frame nobody asked for
                ctx.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                for frame in ctx.decode(packet):
                    if frame.rotation:
                        raise Unverified("rotated video (decord transposes it)")
                    position = frame.pts
                    if frame.pts in wanted and frame.pts not in frames:
                        frames[frame.pts] = frame.to_ndarray(format="rgb24")
                if target in frames:
                    break
            if target not in frames:
                raise Unverified(f"frame at pts {target} was not decoded")
    return SampledFrames(frames=np.stack([frames[pts[i]] for i in indices]), indices=indices, fps=fps,
                         num_frames=num_frames)


def sample_video(data: bytes, *, num_segments: int = 8, start_s: float | None = None, end_s: float | None = None,
                 limits: VideoLimits = VideoLimits()) -> SampledFrames:
    """Decode only the sampled frames of a video held in memory (never the whole video): PyAV when verified to give
    decord's exact frames (faster, see the module doc), else decord as the cards do."""
    try:
        import av  # noqa: F401
    except ImportError:
        pass
    else:
        try:
            return sample_with_pyav(data, num_segments=num_segments, start_s=start_s, end_s=end_s, limits=limits)
        except Unverified:
            pass
        except MediaError:
            raise
        except Exception:  # noqa: BLE001 - PyAV failing mid-stream: decord decides (and classifies) instead
            pass
    return sample_with_decord(data, num_segments=num_segments, start_s=start_s, end_s=end_s, limits=limits)


def sample_with_decord(data: bytes, *, num_segments: int = 8, start_s: float | None = None, end_s: float | None = None,
                       limits: VideoLimits = VideoLimits()) -> SampledFrames:
    """The cards' decoder: decord from memory, one get_batch of the sampled indices."""
    try:
        import decord
    except ImportError:
        raise MediaError("unsupported", "video input needs the decord package (pip install decord)") from None

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except Exception as err:  # noqa: BLE001 - decord raises its own DECORDError and RuntimeErrors on bad containers
        raise MediaError("decode_error", f"video could not be opened: {type(err).__name__}: {err}") from None
    num_frames, fps = len(reader), float(reader.get_avg_fps())
    height, width = reader[0].shape[:2] if num_frames else (0, 0)
    _check_limits(num_frames=num_frames, fps=fps, width=width, height=height, limits=limits)
    indices = _indices(num_frames=num_frames, fps=fps, num_segments=num_segments, start_s=start_s, end_s=end_s)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as err:  # noqa: BLE001 - a corrupt stream fails here, after the header read fine
        raise MediaError("decode_error", f"video frames could not be decoded: {type(err).__name__}: {err}") from None
    return SampledFrames(frames=frames, indices=indices, fps=fps, num_frames=num_frames)
