"""What a picture of the world shows and how it is drawn: the contract's constants, the prompts, a scene (shape,
colours, noise), the shape's box and the rendering (pure functions of a `numpy.random.Generator`)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

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


# Prompts about one shape or colour (called with it: which_image("circle")).
which_image = "Which image shows a {}?".format  # the pair prompt asking which image shows the shape
is_there = "Is there a {} in the image?".format  # the yes/no prompt asking whether the image shows the shape
is_color = "Is the shape {}?".format  # the yes/no prompt asking whether the shape is the colour


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


def sample_size(
    rng: np.random.Generator, *, sides: tuple[int, int] = IMAGE_SIDES, max_aspect: float = MAX_ASPECT,
    even: bool = False,
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


def place(rng: np.random.Generator, scene: Scene, width: int, height: int) -> Box:
    """A random box for the shape: 25-70% of the shorter side, fully inside the image, anywhere."""
    short = min(width, height)
    w, h = shape_size(scene, float(rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION)) * short)
    h = max(h, MIN_SHAPE_FRACTION * short)
    x0 = float(rng.uniform(0, width - w))
    y0 = float(rng.uniform(0, height - h))
    return Box(x0, y0, x0 + w, y0 + h)
