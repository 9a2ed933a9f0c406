"""Videos: pick frames exactly as the InternVL cards do and decode only those frames (pure functions + decord).

`sample_frame_indices` reproduces the cards' `get_index` (tests/data/frame_cases.json). Where the cards misbehave
(a start bound past the end of the video gives indices beyond the last frame, or descending ones), we refuse the
row with a clear error instead; an end bound past the end is clamped to the last frame, as the cards do.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pipeline.images import MediaError

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v"})


@dataclass(frozen=True)
class VideoLimits:
    """Caps checked from the container header, before any frame is decoded."""

    max_duration_s: float = 3600.0
    max_frames: int = 1_000_000
    max_pixels: int = 3840 * 2160


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


def sample_video(
    data: bytes,
    *,
    num_segments: int = 8,
    start_s: float | None = None,
    end_s: float | None = None,
    limits: VideoLimits = VideoLimits(),
) -> SampledFrames:
    """Open a video from memory with decord and decode only the sampled frames (never the whole video)."""
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
    try:
        indices = sample_frame_indices(num_frames=num_frames, fps=fps, num_segments=num_segments, start_s=start_s, end_s=end_s)
    except ValueError as err:
        raise MediaError("bad_input", str(err)) from None
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as err:  # noqa: BLE001 - a corrupt stream fails here, after the header read fine
        raise MediaError("decode_error", f"video frames could not be decoded: {type(err).__name__}: {err}") from None
    return SampledFrames(frames=frames, indices=indices, fps=fps, num_frames=num_frames)
