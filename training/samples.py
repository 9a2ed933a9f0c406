"""Training samples drawn from the world: per-tile features of images, pairs and videos cut by the pipeline's own
tiler, and their questions with answers (a pure function of seed, kind and index)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.embedded import world as W
from pipeline.media.images import load_tiles
from pipeline.media.tiling import tile_image
from pipeline.media.video import sample_frame_indices
from training import seeing as S

NUM_FRAMES = 8


@dataclass
class Sample:
    """One training sample: per-tile features and its questions with answers."""

    kind: str  # "image" | "pair" | "video"
    tiles_per_image: tuple[int, ...]
    features: torch.Tensor  # (tiles, 11): seeing.fast_features (the shape logits come from the classifier)
    qa: list[tuple[str, str]]
    shape_tiles: list[tuple[int, int]]  # (tile index, shape class) of tiles that show the whole shape (classifier)

    @property
    def layout(self) -> tuple:
        return (self.kind, self.tiles_per_image)


TRAIN_TILES = {1: 0.22, 3: 0.08, 4: 0.08, 5: 0.14, 7: 0.08, 9: 0.08, 10: 0.1, 11: 0.08, 13: 0.14}
PAIR_TILES = {1: 0.4, 3: 0.15, 4: 0.15, 5: 0.15, 7: 0.15}  # per image of a pair (max_tiles 12 // 2 = 6)


def _pick(rng: np.random.Generator, weights: dict[int, float]) -> int:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], dtype=np.float64)
    return int(keys[rng.choice(len(keys), p=p / p.sum())])


def train_size(rng: np.random.Generator, tiles: int, *, max_tiles: int = 12) -> tuple[int, int]:
    """An image size with exactly `tiles` tiles; mostly at most 1200 px per side (cheap to draw), sometimes any."""
    sides = (W.IMAGE_SIDES[0], 1200) if rng.random() < 0.75 else W.IMAGE_SIDES
    for _ in range(5000):
        width, height = W.sample_size(rng, sides=sides)
        if W.tiles_for(width, height, max_tiles=max_tiles) == tiles:
            return width, height
    return W.size_with_tiles(rng, tiles, max_tiles=max_tiles)


def image_qa(scene: W.Scene) -> list[tuple[str, str]]:
    """An image's questions with their answers: the generation prompts and every yes/no one."""
    qa = list(W.image_answers(scene).items())
    qa += [(q, "yes" if yes else "no") for q, yes in W.image_yes_no(scene).items()]
    return qa


def make_image(rng: np.random.Generator) -> Sample:
    """One image sample: a drawn image of a tile count picked by TRAIN_TILES, cut as the pipeline cuts it."""
    drawn = W.draw_image(rng, size=train_size(rng, _pick(rng, TRAIN_TILES)))
    tiles = load_tiles(drawn.data, max_tiles=12).pixels
    return Sample("image", (len(tiles),), S.fast_features(tiles), image_qa(drawn.scene),
                  [(len(tiles) - 1, W.SHAPES.index(drawn.scene.shape))])


def make_pair(rng: np.random.Generator) -> Sample:
    """One pair sample: two images of different shapes (at most 6 tiles each), asked for each shape."""
    sizes = (train_size(rng, _pick(rng, PAIR_TILES), max_tiles=6), train_size(rng, _pick(rng, PAIR_TILES), max_tiles=6))
    pair = W.draw_pair(rng, sizes=sizes)
    parts = [load_tiles(im.data, max_tiles=6).pixels for im in pair.images]
    shapes = tuple(im.scene.shape for im in pair.images)
    qa = [(W.which_image(s), "Image-1" if s == shapes[0] else "Image-2") for s in shapes]
    n0 = len(parts[0])
    return Sample("pair", (n0, len(parts[1])), S.fast_features(np.concatenate(parts)), qa,
                  [(n0 - 1, W.SHAPES.index(shapes[0])), (n0 + len(parts[1]) - 1, W.SHAPES.index(shapes[1]))])


def video_frames(spec: W.VideoSpec) -> np.ndarray:
    """The 8 frames the pipeline samples from spec's video, rendered directly and passed through the same codec (an
    8-frame H.264 stream at the video's size), without drawing and encoding every frame."""
    import av

    indices = sample_frame_indices(num_frames=spec.num_frames, fps=spec.fps, num_segments=NUM_FRAMES)
    data = W.encode_video([spec.frame(i) for i in indices], fps=spec.fps)
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == NUM_FRAMES
    return np.stack(frames)


def make_video(rng: np.random.Generator) -> Sample:
    """One video sample: the 8 frames the pipeline samples, each one tile, and the video questions."""
    spec = W.sample_video_spec(rng)
    frames = video_frames(spec)
    tiles = np.concatenate([tile_image(Image.fromarray(f, "RGB"), min_tiles=1, max_tiles=1).pixels for f in frames])
    qa = list(W.video_answers(spec.scene, spec.direction).items())
    label = W.SHAPES.index(spec.scene.shape)
    return Sample("video", (1,) * NUM_FRAMES, S.fast_features(tiles), qa, [(i, label) for i in (0, 7)])


MAKERS = {"image": make_image, "pair": make_pair, "video": make_video}
KIND_ID = {"image": 1, "pair": 2, "video": 3}


def make_sample(seed: int, kind: str, index: int) -> Sample:
    """The index-th sample of a kind: a pure function of (seed, kind, index)."""
    return MAKERS[kind](np.random.default_rng([seed, KIND_ID[kind], index]))


def _make_chunk(args: tuple[int, str, list[int]]) -> list[Sample]:
    seed, kind, indices = args
    torch.set_num_threads(1)
    return [make_sample(seed, kind, i) for i in indices]


def make_samples(seed: int, plan: dict[str, int], *, workers: int) -> list[Sample]:
    """Samples of each kind (same result for any worker count)."""
    jobs = []
    for kind, count in plan.items():
        step = 25
        jobs += [(seed, kind, list(range(lo, min(count, lo + step)))) for lo in range(0, count, step)]
    if workers <= 1:
        chunks = [_make_chunk(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_make_chunk, jobs, chunksize=1)
    return [s for c in chunks for s in c]
