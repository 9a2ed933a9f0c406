"""A sample's media to uint8 tiles: one image, several images sharing the tile budget, or a video's sampled frames;
or to whole pictures, for an engine that tiles them itself (compute.engine: vllm-native).

Pure functions with the job's tiling / video sections as arguments; the CPU stage (stages/preprocess.py) calls
them, in a decoder child process where decode.isolate says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline.errors import ErrorType, MediaError
from pipeline.media.budget import frames_within, max_tiles_within
from pipeline.media.images import decode_image, load_tiles
from pipeline.media.tiling import TILE_SIZE, choose_grid, tile_image
from pipeline.media.video import VideoLimits, sample_video

if TYPE_CHECKING:  # the job's sections are what callers pass; media needs only their values
    from pipeline.config import TilingConfig, VideoConfig


def tiles_from_bytes(data: bytes | None, num_tiles: int) -> np.ndarray:
    """The uint8 (num_tiles, 448, 448, 3) view of a `pixels` cell."""
    return np.frombuffer(data or b"", dtype=np.uint8).reshape(num_tiles, TILE_SIZE, TILE_SIZE, 3)


def image_tiles(data: bytes, tiling: TilingConfig, max_tiles: int, tokens: int | None = None) -> tuple[np.ndarray, int, int]:
    """Decode one image and cut it into tiles: (uint8 tiles, width, height). tiling.mode fast decodes big JPEGs at a
    reduced DCT scale. With a visual-token budget, the largest tile count whose tokens fit, from the header's size."""

    def within_budget(width: int, height: int) -> int:
        fitting = max_tiles_within(width, height, tokens=tokens, min_tiles=min(tiling.min_tiles, max_tiles),
                                   max_tiles=max_tiles, thumbnail=tiling.thumbnail)
        if fitting is None:
            raise MediaError(ErrorType.TOO_LARGE, f"even min_tiles={tiling.min_tiles} tiles exceed the budget of "
                                                  f"{tokens} visual tokens (tiling.max_tokens_per_sample)")
        return fitting

    tiles = load_tiles(data, min_tiles=min(tiling.min_tiles, max_tiles), max_tiles=max_tiles, thumbnail=tiling.thumbnail,
                       mode=tiling.mode, max_pixels=tiling.max_image_pixels, exif_transpose=tiling.exif_transpose,
                       choose_max_tiles=within_budget if tokens is not None else None)
    return tiles.pixels, tiles.source_size[0], tiles.source_size[1]


def video_frames(data: bytes, video: VideoConfig, tiling: TilingConfig) -> Any:
    """A video's sampled frames (the cards' segment middles): video.num_frames of them, or with a visual-token
    budget as many as fit (each of tiles_per_frame tiles)."""
    frames = video.num_frames
    if tiling.max_tokens_per_sample is not None:
        frames = frames_within(frames, tokens=tiling.max_tokens_per_sample, tiles_per_frame=video.tiles_per_frame,
                               thumbnail=tiling.thumbnail)
        if frames == 0:
            raise MediaError(ErrorType.TOO_LARGE, f"even one frame of video.tiles_per_frame={video.tiles_per_frame} tiles "
                                                  f"exceeds the budget of {tiling.max_tokens_per_sample} visual tokens "
                                                  "(tiling.max_tokens_per_sample)")
    limits = VideoLimits(max_duration_s=video.max_duration_s, max_frames=video.max_frames, max_pixels=video.max_pixels)
    return sample_video(data, num_segments=frames, start_s=video.start_s, end_s=video.end_s, limits=limits)


def _video_facts(sampled: Any) -> dict[str, Any]:
    return dict(media_type="video", width=int(sampled.frames.shape[2]), height=int(sampled.frames.shape[1]),
                num_frames=sampled.num_frames, frame_indices=sampled.indices, fps=sampled.fps,
                duration_s=sampled.duration_s)


def video_tiles(data: bytes, video: VideoConfig, tiling: TilingConfig) -> dict[str, Any]:
    """Sample frames (video_frames) and tile each with tiles_per_frame (1: a single 448 px resize, as the cards)."""
    sampled = video_frames(data, video, tiling)
    per_frame = dict(min_tiles=min(tiling.min_tiles, video.tiles_per_frame), max_tiles=video.tiles_per_frame)
    tiles = [tile_image(Image.fromarray(frame, "RGB"), **per_frame,
                        thumbnail=tiling.thumbnail).pixels for frame in sampled.frames]
    return dict(pixels=np.concatenate(tiles), tiles_per_image=[len(t) for t in tiles], **_video_facts(sampled))


# -- pictures, for an engine that tiles them itself (compute.engine: vllm-native) ---------------------------------


def card_tile_count(width: int, height: int, tiling: TilingConfig, max_tiles: int) -> int:
    """How many tiles the cards' tiling cuts a picture of that size into (grid, plus the thumbnail if > 1)."""
    cols, rows = choose_grid(width=width, height=height, min_tiles=min(tiling.min_tiles, max_tiles), max_tiles=max_tiles)
    return cols * rows + int(tiling.thumbnail and cols * rows > 1)


def image_picture(data: bytes, tiling: TilingConfig, max_tiles: int) -> tuple[np.ndarray, int]:
    """Decode one image whole (uint8 RGB (h, w, 3)), not tiled; and the tile count the cards would make of it."""
    image = decode_image(data, max_pixels=tiling.max_image_pixels, exif_transpose=tiling.exif_transpose)
    return np.asarray(image), card_tile_count(image.width, image.height, tiling, max_tiles)


def video_pictures(data: bytes, video: VideoConfig, tiling: TilingConfig) -> dict[str, Any]:
    """A video's sampled frames (video_frames), not tiled, with the tile counts the cards would make of each."""
    sampled = video_frames(data, video, tiling)
    count = card_tile_count(sampled.frames.shape[2], sampled.frames.shape[1], tiling, video.tiles_per_frame)
    return dict(pictures=list(sampled.frames), tiles_per_image=[count] * len(sampled.frames), **_video_facts(sampled))


def pictures_from_bytes(data: bytes | None, sizes: list[list[int]]) -> list[np.ndarray]:
    """The uint8 (h, w, 3) pictures of a `pixels` cell that holds pictures (sizes: [height, width] each)."""
    flat = np.frombuffer(data or b"", dtype=np.uint8)
    out, start = [], 0
    for height, width in sizes:
        end = start + int(height) * int(width) * 3
        out.append(flat[start:end].reshape(int(height), int(width), 3))
        start = end
    if start != flat.size:
        raise ValueError(f"pixels hold {flat.size} bytes, the picture sizes {start}")
    return out
