"""Video frame sampling: our CPU stage vs the model cards' per-frame `load_video` loop, same videos, one process.

- ours:  Preprocess.prepare: the video's bytes read once; pipeline.media.video.sample_video decodes only the sampled
         frames (PyAV dropping non-reference frames nobody asked for when verified identical to decord, else one
         decord get_batch), each frame tiled (1 tile: a single 448 px resize) into one uint8 block.
- cards: bench/cards.py `load_video(max_num=1)`: decord VideoReader(num_threads=1) on the file, `vr[i].asnumpy()`
         per frame, Image.fromarray().convert('RGB'), dynamic_preprocess(max_num=1), the torchvision transform per
         tile (reproduced operation for operation), torch.stack / torch.cat.
Both pick the same indices and yield the same pixels (checked: normalize_tiles(ours) == the cards' tensor).

Videos (bench/media.py, cached): "realistic" = libx264 defaults (GOP 250, B-frames, b-pyramid), a photo-like scene
panning under sensor noise, 720p and 1080p, 12-40 s; "short-gop" = the earlier MPEG-4 test clips (GOP 12, no
B-frames), where decoding is a much smaller share. Rounds alternate; ratio of medians for wall and CPU time, the
latter of this process and its children (ours decodes in the pipeline's sandbox child by default, `decode.isolate:
video`, so its IPC cost is included; bench/timing.py).
`--profile` splits one pass into decode (decord get_batch, PyAV) and per-frame conversions.

    PYTHONPATH=. python bench/frame_sampling.py [--rounds 3] [--frames 8] [--set realistic|short-gop|all] [--profile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cards  # noqa: E402
from bench.media import cached, camera_video  # noqa: E402
from bench.timing import Clock, cpu_seconds  # noqa: E402
from pipeline.config import parse_job  # noqa: E402
from pipeline.media.tiling import normalize_tiles  # noqa: E402
from pipeline.media.video import sample_with_decord, sample_with_pyav  # noqa: E402
from pipeline.stages.preprocess import Preprocess  # noqa: E402
from tests.media import make_video  # noqa: E402

REALISTIC = [(20, 30, 1280, 720), (12, 30, 1920, 1080), (40, 24, 1280, 720)]  # seconds, fps, width, height
SHORT_GOP = [(300, 30, 1280, 720), (600, 25, 960, 540), (240, 24, 640, 480), (900, 30, 854, 480)]  # frames, fps, w, h


def video_set(name: str) -> list[Path]:
    realistic = [camera_video(s, fps, w, h, seed=i) for i, (s, fps, w, h) in enumerate(REALISTIC)]
    short = [cached(f"mpeg4-{w}x{h}-{n}f-{fps}fps.mp4", lambda n=n, fps=fps, w=w, h=h: make_video(n, fps, width=w, height=h))
             for n, fps, w, h in SHORT_GOP]
    return {"realistic": realistic, "short-gop": short, "all": realistic + short}[name]


def profile(path: Path, frames: int) -> dict[str, float]:
    """Process-CPU ms of one pass of each step."""
    data = path.read_bytes()
    out: dict[str, float] = {}

    def timed(key: str, fn):
        t = cpu_seconds()
        result = fn()
        out[key] = (cpu_seconds() - t) * 1000
        return result

    video = timed("decord get_batch", lambda: sample_with_decord(data, num_segments=frames))
    timed("pyav nonref", lambda: sample_with_pyav(data, num_segments=frames))
    timed("ours: fromarray + resize 448", lambda: [np.asarray(Image.fromarray(f).resize((448, 448))) for f in video.frames])
    transform = cards.build_transform(448)
    timed("cards: fromarray.convert + dynamic_preprocess + transform", lambda: [
        transform(cards.dynamic_preprocess(Image.fromarray(f).convert("RGB"), max_num=1, use_thumbnail=True)[0])
        for f in video.frames])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--set", default="realistic", choices=["realistic", "short-gop", "all"])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = video_set(args.set)
    stage = Preprocess(parse_job({"task": "caption", "input": "x", "output": "y", "model": "m",
                                  "video": {"num_frames": args.frames}}))
    for p in paths:  # same frames, same pixels as the cards feed the model
        row = stage.prepare(str(p))
        assert row["status"] == "ok", row
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["num_tiles"], 448, 448, 3)
        reference, _ = cards.load_video(str(p), num_segments=args.frames)
        assert np.array_equal(normalize_tiles(pixels), reference.numpy()), p
    clock = Clock()
    for _ in range(args.rounds):
        for side, fn in (("ours", lambda p: stage.prepare(str(p))),
                         ("cards", lambda p: cards.load_video(str(p), num_segments=args.frames))):
            for p in paths:
                clock.run(f"{side} {p.name}", fn, p)
    frames = len(paths) * args.frames
    print(f"videos: {len(paths)} ({args.set}), {args.frames} frames each, {args.rounds} alternating rounds, 1 thread; "
          f"same frames and pixels as the cards (checked)")
    print(f"{'video':38s} {'MB':>5s} {'ours ms':>8s} {'cards ms':>9s} {'ratio':>6s}   (CPU time, medians)")
    for p in paths:
        o, c = clock.median(f"ours {p.name}"), clock.median(f"cards {p.name}")
        print(f"{p.name:38s} {p.stat().st_size / 1e6:5.1f} {o * 1000:8.0f} {c * 1000:9.0f} {c / o:5.2f}x")

    for label, cpu in (("wall", False), ("cpu", True)):
        o, c = clock.total("ours ", cpu), clock.total("cards ", cpu)
        print(f"{label:4s}: ours {frames / o:6.1f} frames/s | cards {frames / c:6.1f} frames/s | "
              f"ratio ours/cards: {c / o:.2f}x")
    if args.profile:
        print("\nper-step profile (CPU ms, one pass):")
        for p in paths:
            print(f"  {p.name}: " + ", ".join(f"{k} {v:.0f}" for k, v in profile(p, args.frames).items()))


if __name__ == "__main__":
    main()
