"""Images of the world: sizes with a given tile count, one drawn image and its answers, pairs of images."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.embedded.world.scene import (
    CAPTION,
    COLORS,
    JPEG_QUALITY,
    SHAPES,
    WHAT_BACKGROUND,
    WHAT_COLOR,
    WHAT_SHAPE,
    Box,
    Scene,
    is_color,
    is_there,
    place,
    render,
    sample_scene,
    sample_size,
    which_image,
)


def encode_image(pixels: np.ndarray, *, fmt: str, quality: int = 90) -> bytes:
    """PNG or JPEG (Pillow's defaults: 4:2:0 chroma) bytes of an RGB array."""
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def tiles_for(width: int, height: int, *, max_tiles: int = 12, thumbnail: bool = True) -> int:
    """How many tiles the pipeline cuts an image of this size into (grid tiles, plus the thumbnail if > 1)."""
    from pipeline.media.tiling import choose_grid  # the pipeline's own rule, so counts always agree with it

    cols, rows = choose_grid(width=width, height=height, max_tiles=max_tiles)
    return cols * rows + (thumbnail and cols * rows > 1)


# Tile counts an image of the contract can get with the defaults (max_tiles 12, thumbnail on).
TILE_COUNTS = (1, 3, 4, 5, 7, 9, 10, 11, 13)


def size_with_tiles(rng: np.random.Generator, tiles: int, *, max_tiles: int = 12,
                    tries: int = 100_000) -> tuple[int, int]:
    """A random image size (as sample_size) that the pipeline cuts into exactly `tiles` tiles."""
    for _ in range(tries):
        width, height = sample_size(rng)
        if tiles_for(width, height, max_tiles=max_tiles) == tiles:
            return width, height
    raise ValueError(f"no image size of the contract gives {tiles} tiles with max_tiles={max_tiles}")


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
    """The question of a pair asking for `query_shape`, and which image is the answer."""
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
