"""A user's own Ray Data program with internvl-batch inside it: their read, their filter, `annotate`, their write.

    python examples/annotate_my_dataset.py MODEL OUT [--task caption|score] [--pictures N]

MODEL: an InternVL checkpoint (a local folder, an s3:// prefix or a hub id such as OpenGVLab/InternVL3-1B-hf); to
try it on a laptop, `internvl-batch make-tiny-model /tmp/tiny --trained` makes one that knows this program's
pictures. OUT: a folder for the Parquet files this program writes. Ray runs locally (or joins RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import ray
from PIL import Image, ImageDraw

from pipeline import annotate

COLORS = {"red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square")


def draw_pictures(folder: Path, n: int) -> list[dict]:
    """The user's own collection: n PNG pictures of a coloured shape on white, with what each shows."""
    rows = []
    for i in range(n):
        color, shape = list(COLORS)[i % len(COLORS)], SHAPES[i // len(COLORS) % len(SHAPES)]
        picture = Image.new("RGB", (320, 240), (245, 245, 245))
        box = (100, 60, 220, 180)
        draw = ImageDraw.Draw(picture)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        path = folder / f"picture-{i:03d}.png"
        picture.save(path)
        rows.append({"uri": str(path), "color": color, "shape": shape})
    return rows


def job_for(task: str, model: str) -> dict:
    """The model's settings, as a job file holds them (no input or output: this program reads and writes)."""
    if task == "score":
        return {"task": "score", "model": model, "prompt": "Is there a circle in the image?", "labels": ["yes", "no"]}
    return {"task": "caption", "model": model, "prompt": "Describe the image.", "generation": {"max_new_tokens": 24}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="InternVL checkpoint: folder, s3:// prefix or hub id")
    parser.add_argument("out", help="folder for the Parquet output")
    parser.add_argument("--task", choices=["caption", "score"], default="caption")
    parser.add_argument("--pictures", type=int, default=8)
    args = parser.parse_args()

    ray.init(include_dashboard=False)
    with tempfile.TemporaryDirectory() as folder:
        ds = ray.data.from_items(draw_pictures(Path(folder), args.pictures))
        ds = ds.filter(expr="color != 'blue'")  # the user's own step: not the blue ones
        ds = annotate(ds, job_for(args.task, args.model))
        ds.write_parquet(args.out)  # annotate is lazy: the pictures are read, tiled and answered here
    for row in pq.read_table(args.out, columns=["uri", "color", "shape", "response"]).to_pylist():
        print(f"{Path(row['uri']).name} ({row['color']} {row['shape']}): {row['response']}")


if __name__ == "__main__":
    main()
