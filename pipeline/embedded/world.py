"""A procedurally drawn world for a tiny InternVL that can be checked for meaning (pure functions, seeded).

The contract (what the tiny model in pipeline/embedded is trained to see, and what tests may rely on):

- One solid, filled shape per image: a circle, an axis-aligned square, or an isosceles triangle with its base
  horizontal, pointing up or down. Shape colours: red (220, 30, 30), green (40, 180, 60), blue (40, 70, 220),
  yellow (235, 215, 40); backgrounds: white (245), black (15), gray (128). Each channel varies by up to +-25 (shape) /
  +-12 (background); per-pixel Gaussian noise of sigma 0-8 is added.
- The shape's bounding box spans 25-70% of the image's shorter side and lies fully inside the image.
- Images are 160-2400 px per side, aspect 1:4 to 4:1 (1 to 12 grid tiles plus the thumbnail), JPEG (quality 60-95)
  or PNG.
- Videos are 2-10 s at 10-30 fps, 160-1280 px per side (even sizes, aspect 1:2 to 2:1), H.264 (yuv420p) in mp4: one
  shape of one colour on one background moves in a straight line (left, right, up or down) at constant speed across at
  least a third of the frame, staying fully inside it.
- Answers are exact lower-case strings without a final period (`image_answers`, `pair_answers`, `video_answers`);
  the yes/no prompts (`image_yes_no`) are for the score task, labels yes/no.

Everything is a function of a `numpy.random.Generator` (or of a spec drawn from one): the same seed draws the same
bytes. Nothing here imports torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from statistics import NormalDist
from typing import Literal

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
DIRECTIONS = ("left", "right", "up", "down")

SHAPE_JITTER = 25  # per channel, uniform in [-25, 25]
BACKGROUND_JITTER = 12
MAX_NOISE_SIGMA = 8.0
MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION = 0.25, 0.70  # of the shorter side
IMAGE_SIDES = (160, 2400)
VIDEO_SIDES = (160, 1280)
VIDEO_MAX_ASPECT = 2.0  # every frame is squashed to one 448 px tile: keep shapes recognisable
MAX_ASPECT = 4.0
JPEG_QUALITY = (60, 95)
VIDEO_SECONDS = (2.0, 10.0)
VIDEO_FPS = (10, 30)
MIN_TRAVEL = 1 / 3  # of the frame's extent along the motion

# Prompts, exactly as a job asks them.
CAPTION = "Describe the image."
WHAT_SHAPE = "What shape is in the image?"
WHAT_COLOR = "What color is the shape?"
WHAT_BACKGROUND = "What color is the background?"
VIDEO_CAPTION = "Describe the video."
WHICH_WAY = "Which way does the shape move?"


def which_image(shape: str) -> str:
    return f"Which image shows a {shape}?"


def is_there(shape: str) -> str:
    return f"Is there a {shape} in the image?"


def is_color(color: str) -> str:
    return f"Is the shape {color}?"


Shape = Literal["circle", "square", "triangle"]


@dataclass(frozen=True)
class Scene:
    """What an image (or every frame of a video) shows, and the exact colours it is drawn with."""

    shape: str
    color: str
    background: str
    shape_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    noise_sigma: float
    pointing: str = "up"  # triangles only: "up" or "down"
    triangle_height: float = 1.0  # triangles only: height / base


@dataclass(frozen=True)
class Box:
    """A bounding box in pixels (float, x1/y1 exclusive edges)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def shifted(self, dx: float, dy: float) -> Box:
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)


def inside(scene: Scene, box: Box, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Whether points (pixel coordinates, broadcastable arrays) lie inside the scene's shape drawn in `box`."""
    if scene.shape == "square":
        return (xs >= box.x0) & (xs < box.x1) & (ys >= box.y0) & (ys < box.y1)
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    if scene.shape == "circle":
        r = box.width / 2
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    depth = (ys - box.y0) if scene.pointing == "up" else (box.y1 - ys)  # distance from the apex, downwards or upwards
    half = (box.width / 2) * depth / box.height
    return (depth >= 0) & (depth <= box.height) & (np.abs(xs - cx) <= half)


def sample_scene(
    rng: np.random.Generator, *, shape: str | None = None, color: str | None = None, background: str | None = None
) -> Scene:
    """A random scene; any of shape, color, background may be fixed."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    jitter = rng.integers(-SHAPE_JITTER, SHAPE_JITTER + 1, size=3)
    shape_rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter))
    jitter = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=3)
    background_rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(BACKGROUNDS[background], jitter))
    return Scene(
        shape=shape, color=color, background=background, shape_rgb=shape_rgb, background_rgb=background_rgb,
        noise_sigma=float(rng.uniform(0.0, MAX_NOISE_SIGMA)),
        pointing="up" if rng.random() < 0.5 else "down",
        triangle_height=float(rng.uniform(0.8, 1.0)),
    )


def shape_size(scene: Scene, side: float) -> tuple[float, float]:
    """(width, height) of the shape's bounding box for a base size `side` (triangles are a little flatter)."""
    return (side, side * scene.triangle_height) if scene.shape == "triangle" else (side, side)


def render(scene: Scene, box: Box, width: int, height: int, *, noise: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (height, width, 3) RGB: the background, the shape filled in `box`, then Gaussian noise (if `noise`)."""
    image = np.empty((height, width, 3), np.float32)
    image[...] = scene.background_rgb
    x0, x1 = max(int(np.floor(box.x0)), 0), min(int(np.ceil(box.x1)), width)
    y0, y1 = max(int(np.floor(box.y0)), 0), min(int(np.ceil(box.y1)), height)
    if x1 > x0 and y1 > y0:
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        image[y0:y1, x0:x1][inside(scene, box, xs, ys)] = scene.shape_rgb
    if noise is not None and scene.noise_sigma > 0:
        image += gaussian_noise(noise, image.shape, scene.noise_sigma)
    np.rint(image, out=image)
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


# Standard normal quantiles at the centres of 256 equal-probability bins: a random byte looked up here is Gaussian
# noise quantised to 256 levels (within 2.9 sigma), ~10x cheaper to draw than numpy's standard_normal.
_GAUSS = np.asarray([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32)


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """float32 zero-mean noise of standard deviation ~sigma (quantised Gaussian, see _GAUSS)."""
    codes = np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)
    return _GAUSS[codes] * np.float32(sigma)


def encode_image(pixels: np.ndarray, *, fmt: str, quality: int = 90) -> bytes:
    """PNG or JPEG (Pillow's defaults: 4:2:0 chroma) bytes of an RGB array."""
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def sample_size(
    rng: np.random.Generator, *, sides: tuple[int, int] = IMAGE_SIDES, max_aspect: float = MAX_ASPECT, even: bool = False
) -> tuple[int, int]:
    """(width, height): log-uniform aspect in [1/max_aspect, max_aspect], log-uniform scale, both sides in `sides`."""
    lo, hi = sides
    while True:
        aspect = float(np.exp(rng.uniform(-np.log(max_aspect), np.log(max_aspect))))
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        width, height = round(scale * np.sqrt(aspect)), round(scale / np.sqrt(aspect))
        if even:
            width, height = width - width % 2, height - height % 2
        if lo <= width <= hi and lo <= height <= hi and 1 / max_aspect <= width / height <= max_aspect:
            return width, height


def tiles_for(width: int, height: int, *, max_tiles: int = 12, thumbnail: bool = True) -> int:
    """How many tiles the pipeline cuts an image of this size into (grid tiles, plus the thumbnail if > 1)."""
    from pipeline.media.tiling import choose_grid  # the pipeline's own rule, so counts always agree with it

    cols, rows = choose_grid(width=width, height=height, max_tiles=max_tiles)
    return cols * rows + (thumbnail and cols * rows > 1)


# Tile counts an image of the contract can get with the defaults (max_tiles 12, thumbnail on).
TILE_COUNTS = (1, 3, 4, 5, 7, 9, 10, 11, 13)


def size_with_tiles(rng: np.random.Generator, tiles: int, *, max_tiles: int = 12, tries: int = 100_000) -> tuple[int, int]:
    """A random image size (as sample_size) that the pipeline cuts into exactly `tiles` tiles."""
    for _ in range(tries):
        width, height = sample_size(rng)
        if tiles_for(width, height, max_tiles=max_tiles) == tiles:
            return width, height
    raise ValueError(f"no image size of the contract gives {tiles} tiles with max_tiles={max_tiles}")


def place(rng: np.random.Generator, scene: Scene, width: int, height: int) -> Box:
    """A random box for the shape: 25-70% of the shorter side, fully inside the image, anywhere."""
    short = min(width, height)
    w, h = shape_size(scene, float(rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION)) * short)
    h = max(h, MIN_SHAPE_FRACTION * short)
    x0 = float(rng.uniform(0, width - w))
    y0 = float(rng.uniform(0, height - h))
    return Box(x0, y0, x0 + w, y0 + h)


def image_answers(scene: Scene) -> dict[str, str]:
    """The generation prompts of one image and their exact answers."""
    return {
        CAPTION: f"a {scene.color} {scene.shape} on a {scene.background} background",
        WHAT_SHAPE: scene.shape,
        WHAT_COLOR: scene.color,
        WHAT_BACKGROUND: scene.background,
    }


def image_yes_no(scene: Scene) -> dict[str, bool]:
    """The score prompts of one image (every shape and every colour asked) and whether the answer is yes."""
    out = {is_there(shape): shape == scene.shape for shape in SHAPES}
    out.update({is_color(color): color == scene.color for color in COLORS})
    return out


@dataclass(frozen=True)
class DrawnImage:
    """One image: its encoded bytes and its truth."""

    data: bytes
    format: str  # "jpeg" or "png"
    width: int
    height: int
    scene: Scene
    box: Box
    pixels: np.ndarray = field(repr=False)  # the RGB array before encoding

    @property
    def answers(self) -> dict[str, str]:
        return image_answers(self.scene)

    @property
    def yes_no(self) -> dict[str, bool]:
        return image_yes_no(self.scene)

    @property
    def truth(self) -> dict[str, str]:
        return {"shape": self.scene.shape, "color": self.scene.color, "background": self.scene.background}


def draw_image(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
    size: tuple[int, int] | None = None,
    tiles: int | None = None,
    fmt: str | None = None,
    quality: int | None = None,
) -> DrawnImage:
    """A random image of the world. `size` (width, height) or `tiles` (exact tile count, see TILE_COUNTS) fix its
    size; `fmt` ("jpeg"/"png") and `quality` its encoding."""
    scene = sample_scene(rng, shape=shape, color=color, background=background)
    if size is None:
        size = size_with_tiles(rng, tiles) if tiles is not None else sample_size(rng)
    width, height = size
    box = place(rng, scene, width, height)
    fmt = fmt or ("jpeg" if rng.random() < 0.5 else "png")
    quality = int(quality if quality is not None else rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    pixels = render(scene, box, width, height, noise=rng)
    return DrawnImage(data=encode_image(pixels, fmt=fmt, quality=quality), format=fmt, width=width, height=height,
                      scene=scene, box=box, pixels=pixels)


@dataclass(frozen=True)
class DrawnPair:
    """Two images showing different shapes, and which of them shows `query_shape`."""

    images: tuple[DrawnImage, DrawnImage]
    query_shape: str

    @property
    def prompt(self) -> str:
        return which_image(self.query_shape)

    @property
    def answer(self) -> str:
        return "Image-1" if self.images[0].scene.shape == self.query_shape else "Image-2"

    @property
    def answers(self) -> dict[str, str]:
        return {self.prompt: self.answer}


def pair_answers(shapes: tuple[str, str], query_shape: str) -> dict[str, str]:
    return {which_image(query_shape): "Image-1" if shapes[0] == query_shape else "Image-2"}


def draw_pair(rng: np.random.Generator, *, sizes: tuple[tuple[int, int], tuple[int, int]] | None = None,
              answer: str | None = None) -> DrawnPair:
    """Two images with two different shapes (colours, backgrounds, sizes drawn independently); the question asks for
    one of the two shapes (`answer` "Image-1"/"Image-2" fixes which)."""
    first, second = rng.choice(len(SHAPES), size=2, replace=False)
    a = draw_image(rng, shape=SHAPES[first], size=sizes[0] if sizes else None)
    b = draw_image(rng, shape=SHAPES[second], size=sizes[1] if sizes else None)
    if answer is None:
        answer = "Image-1" if rng.random() < 0.5 else "Image-2"
    return DrawnPair(images=(a, b), query_shape=a.scene.shape if answer == "Image-1" else b.scene.shape)


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
    return {VIDEO_CAPTION: f"a {scene.color} {scene.shape} moving {direction}", WHICH_WAY: direction}


def sample_video_spec(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
    direction: str | None = None,
    size: tuple[int, int] | None = None,
    fps: int | None = None,
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
