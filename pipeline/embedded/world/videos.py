"""Videos of the world: a spec drawn first (scene, size, rate, the shape's straight path), frames rendered from it,
H.264 in mp4."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from pipeline.embedded.world.scene import (
    DIRECTIONS,
    MAX_SHAPE_FRACTION,
    MIN_SHAPE_FRACTION,
    MIN_TRAVEL,
    VIDEO_CAPTION,
    VIDEO_FPS,
    VIDEO_MAX_ASPECT,
    VIDEO_SECONDS,
    VIDEO_SIDES,
    WHICH_WAY,
    Box,
    Scene,
    render,
    sample_scene,
    sample_size,
    shape_size,
)


@dataclass(frozen=True)
class VideoSpec:
    """A video before encoding: the scene, the frame size and rate, and the shape's straight path."""

    scene: Scene
    width: int
    height: int
    fps: int
    num_frames: int
    direction: str
    start: Box  # the shape's box in frame 0
    travel: float  # pixels moved from the first frame to the last
    noise_seed: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps

    def box_at(self, index: int) -> Box:
        """The shape's box in frame `index` (constant speed from `start`, `travel` px by the last frame)."""
        step = self.travel * index / max(self.num_frames - 1, 1)
        dx, dy = {"left": (-step, 0.0), "right": (step, 0.0), "up": (0.0, -step), "down": (0.0, step)}[self.direction]
        return self.start.shifted(dx, dy)

    def frame(self, index: int) -> np.ndarray:
        """uint8 (height, width, 3) RGB of frame `index` (its noise is seeded by the frame's index)."""
        return render(self.scene, self.box_at(index), self.width, self.height,
                      noise=np.random.default_rng([self.noise_seed, index]))


def video_answers(scene: Scene, direction: str) -> dict[str, str]:
    """The generation prompts of one video and their exact answers."""
    return {VIDEO_CAPTION: f"a {scene.color} {scene.shape} moving {direction}", WHICH_WAY: direction}


def sample_video_spec(
    rng: np.random.Generator, *, shape: str | None = None, color: str | None = None, background: str | None = None,
    direction: str | None = None, size: tuple[int, int] | None = None, fps: int | None = None,
    duration_s: float | None = None,
) -> VideoSpec:
    """A random video of the world (nothing rendered yet)."""
    scene = sample_scene(rng, shape=shape, color=color, background=background)
    width, height = size or sample_size(rng, sides=VIDEO_SIDES, max_aspect=VIDEO_MAX_ASPECT, even=True)
    fps = int(fps or rng.integers(VIDEO_FPS[0], VIDEO_FPS[1] + 1))
    duration_s = float(duration_s or rng.uniform(*VIDEO_SECONDS))
    num_frames = max(2, round(duration_s * fps))
    direction = direction or DIRECTIONS[rng.integers(len(DIRECTIONS))]
    short = min(width, height)
    along = width if direction in ("left", "right") else height
    min_travel = MIN_TRAVEL * along
    # the base size must leave room to travel a third of the frame: cap it (never below 25% of the shorter side)
    top = min(MAX_SHAPE_FRACTION * short, along - min_travel - 1.0)
    w, h = shape_size(scene, float(rng.uniform(MIN_SHAPE_FRACTION * short, max(top, MIN_SHAPE_FRACTION * short))))
    h = max(h, MIN_SHAPE_FRACTION * short)
    extent = w if direction in ("left", "right") else h
    travel = float(rng.uniform(min_travel, along - extent))
    lo = float(rng.uniform(0, along - extent - travel))  # where the path starts, along the motion's axis
    first = lo if direction in ("right", "down") else lo + travel
    if direction in ("left", "right"):
        y0 = float(rng.uniform(0, height - h))
        start = Box(first, y0, first + w, y0 + h)
    else:
        x0 = float(rng.uniform(0, width - w))
        start = Box(x0, first, x0 + w, first + h)
    return VideoSpec(scene=scene, width=width, height=height, fps=fps, num_frames=num_frames, direction=direction,
                     start=start, travel=travel, noise_seed=int(rng.integers(2**31)))


def encode_video(frames: list[np.ndarray] | np.ndarray, *, fps: int, codec: str = "libx264", crf: int = 23) -> bytes:
    """mp4 bytes of RGB frames: H.264 (libx264, yuv420p, single-threaded so the bytes are deterministic) or MPEG-4."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        if codec == "libx264":
            stream = container.add_stream("libx264", rate=Fraction(fps), options={
                "crf": str(crf), "preset": "veryfast", "threads": "1"})
        else:
            stream = container.add_stream(codec, rate=Fraction(fps))
            stream.codec_context.thread_count = 1
            stream.bit_rate = 2_000_000
        height, width = frames[0].shape[:2]
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


@dataclass(frozen=True)
class DrawnVideo:
    """One encoded video and its truth."""

    data: bytes
    spec: VideoSpec

    @property
    def scene(self) -> Scene:
        return self.spec.scene

    @property
    def direction(self) -> str:
        return self.spec.direction

    @property
    def answers(self) -> dict[str, str]:
        return video_answers(self.spec.scene, self.spec.direction)

    @property
    def truth(self) -> dict[str, str]:
        s = self.spec.scene
        return {"shape": s.shape, "color": s.color, "background": s.background, "direction": self.spec.direction}


def draw_video(rng: np.random.Generator, *, codec: str = "libx264", **fixed) -> DrawnVideo:
    """A random encoded video of the world; keyword args as sample_video_spec (shape, color, direction, size...)."""
    spec = sample_video_spec(rng, **fixed)
    frames = [spec.frame(i) for i in range(spec.num_frames)]
    return DrawnVideo(data=encode_video(frames, fps=spec.fps, codec=codec), spec=spec)
