"""Video frame sampling: our CPU stage vs the model cards' per-frame `load_video` loop, same videos, one process.

- ours:  decord from memory, one `get_batch` of the sampled indices, each frame tiled (1 tile: a single 448 px
         resize) into one uint8 block.
- cards: decord from the file, `vr[i]` per frame, Image.fromarray().convert('RGB'), dynamic_preprocess(max_num=1),
         then per tile Resize + ToTensor + Normalize (PIL + torch in place of torchvision) and stack float32.
Both pick the same indices (checked) and yield the same pixels (checked). Rounds alternate; medians, as a ratio.

    python bench/frame_sampling.py [--rounds 3] [--frames 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import parse_job  # noqa: E402
from pipeline.stages import Preprocess  # noqa: E402
from pipeline.tiling import normalize_tiles  # noqa: E402
from pipeline.video import sample_frame_indices  # noqa: E402
from tests.media import make_video  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
VIDEOS = [(300, 30, 1280, 720), (600, 25, 960, 540), (240, 24, 640, 480), (900, 30, 854, 480)]


def cards_load_video(path: str, num_segments: int) -> torch.Tensor:
    """The cards' load_video with max_num=1: per-frame decode, per-tile float transform."""
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    fps = float(vr.get_avg_fps())
    indices = sample_frame_indices(num_frames=len(vr), fps=fps, num_segments=num_segments)
    out = []
    for i in indices:
        img = Image.fromarray(vr[i].asnumpy()).convert("RGB")
        tile = img.resize((448, 448)).resize((448, 448), Image.Resampling.BICUBIC)  # dynamic_preprocess(max_num=1)
        x = torch.from_numpy(np.asarray(tile).copy()).permute(2, 0, 1).float().div(255)
        out.append((x - MEAN) / STD)
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (n, fps, w, h) in enumerate(VIDEOS):
            path = Path(tmp) / f"{i}.mp4"
            path.write_bytes(make_video(n, fps, width=w, height=h))
            paths.append(str(path))
        stage = Preprocess(parse_job({"task": "caption", "input": tmp, "output": tmp, "model": "m",
                                      "video": {"num_frames": args.frames}}))
        for p in paths:  # same frames, same pixels as the cards feed the model
            row = stage.prepare(p)
            pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["num_tiles"], 448, 448, 3)
            assert np.array_equal(normalize_tiles(pixels), cards_load_video(p, args.frames).numpy()), p
        ours, cards = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for p in paths:
                stage.prepare(p)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            for p in paths:
                cards_load_video(p, args.frames)
            cards.append(time.perf_counter() - t)
    frames = len(paths) * args.frames
    o, c = statistics.median(ours), statistics.median(cards)
    print(f"videos: {len(paths)} ({', '.join(f'{w}x{h} {n}f' for n, _, w, h in VIDEOS)}), {args.frames} frames each, "
          f"{args.rounds} alternating rounds, 1 thread")
    print(f"ours  (get_batch, uint8 tiles):           {frames / o:7.1f} frames/s")
    print(f"cards (per-frame vr[i], float32 per tile): {frames / c:7.1f} frames/s")
    print(f"ratio ours/cards: {c / o:.2f}x")


if __name__ == "__main__":
    main()
