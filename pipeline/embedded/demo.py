"""`internvl-batch demo`: the caption job end to end on generated images, a tiny model and local Ray."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import parse_job
from pipeline.embedded import DEMO_WORKDIR
from pipeline.run.summary import RunSummary

# (name, width, height): sizes that give 1, 3, 7 and 13 tiles with the default max_tiles=12
DEMO_SIZES = [("square", 448, 448), ("wide", 1344, 448), ("photo", 1280, 720), ("tall", 600, 1800), ("large", 1920, 1440),
              ("small", 320, 240)]


def demo_image(seed: int, width: int, height: int) -> Image.Image:
    """A colourful synthetic picture: a gradient background with a few random shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, size=3)
    rgb = np.stack([(base[c] + (x * (c + 1) + y * (3 - c)) // 8) % 256 for c in range(3)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(8, max(9, width // 3))), y0 + int(rng.integers(8, max(9, height // 3)))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return image


def write_demo_images(folder: Path) -> list[Path]:
    """Write the demo images as JPEG and PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, w, h) in enumerate(DEMO_SIZES):
        path = folder / f"{i:02d}-{name}.{'png' if i % 2 else 'jpg'}"
        demo_image(i, w, h).save(path)
        paths.append(path)
    return paths


@contextlib.contextmanager
def _storage(workdir: Path, use_s3: bool, echo: Callable[[str], None]) -> Iterator[tuple[str, str, dict]]:
    """Yield (input, output, storage options): local folders, or an embedded S3 server with the images uploaded."""
    images = workdir / "images"
    write_demo_images(images)
    if not use_s3:
        yield str(images), str(workdir / "results"), {}
        return
    import s3fs

    from pipeline.embedded.s3_server import local_s3_server

    with local_s3_server(workdir / "s3", buckets=["demo"]) as server:
        echo(f"embedded S3 server (SeaweedFS) at {server.endpoint_url}")
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())  # the AWS chain: the pipeline never sees credentials in its config
        try:
            fs = s3fs.S3FileSystem()
            fs.put(str(images) + "/", "demo/images/", recursive=True)
            yield "s3://demo/images/", "s3://demo/results/", {}
            local = workdir / "results"
            fs.get("demo/results/", str(local) + "/", recursive=True)
            echo(f"copied s3://demo/results/ to {local}")
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run_demo(
    *, workdir: Path | None = None, use_s3: bool | None = None, echo: Callable[[str], None] = print
) -> tuple[RunSummary, str]:
    """Build the tiny model (once), write sample images, caption them; returns the summary and the results path."""
    from pipeline.embedded.s3_server import find_weed
    from pipeline.embedded.tiny_model import make_tiny_model
    from pipeline.run.runner import run_job

    workdir = (workdir or Path(DEMO_WORKDIR)).resolve()
    model = workdir / "tiny-internvl"
    if not (model / "config.json").exists():
        make_tiny_model(model)
        echo(f"built a tiny InternVL checkpoint in {model}")
    use_s3 = find_weed() is not None if use_s3 is None else use_s3
    with _storage(workdir, use_s3, echo) as (input_url, output_url, options):
        job = parse_job(
            {
                "task": "caption", "input": input_url, "output": output_url, "model": str(model),
                "prompt": "Describe the image in detail.", "generation": {"max_new_tokens": 24},
                "compute": {"replicas": 1, "batch_size": 4}, "storage": options, "overwrite": True,
            },
            source="demo",
        )
        summary = run_job(job, echo=echo)
    results = workdir / "results"
    _print_sample(results, echo)
    return summary, str(results)


def _print_sample(results: Path, echo: Callable[[str], None]) -> None:
    """Show a few rows of the output."""
    import pyarrow.dataset as pads

    table = pads.dataset(results, format="parquet", ignore_prefixes=[".", "_"]).to_table(
        columns=["uri", "num_tiles", "num_input_tokens", "status", "response"]
    )
    for row in table.sort_by("uri").to_pylist()[:6]:
        echo(f"  {Path(row['uri']).name:<16} tiles={row['num_tiles']:<3} tokens_in={row['num_input_tokens']:<5} "
             f"{row['status']}: {(row['response'] or '')[:60]!r}")
