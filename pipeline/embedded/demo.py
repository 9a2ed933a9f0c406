"""`internvl-batch demo`: the trained tiny model on held-out samples of its world, through the pipeline on local Ray."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.config import parse_job
from pipeline.embedded import DEMO_WORKDIR
from pipeline.run.summary import RunSummary


@contextlib.contextmanager
def _storage(workdir: Path, use_s3: bool, echo: Callable[[str], None]) -> Iterator[tuple[str, dict]]:
    """Yield (base URL, storage options) holding samples/: local folders, or an embedded S3 server with the samples
    uploaded (everything it wrote is copied back into workdir at the end)."""
    if not use_s3:
        yield str(workdir), {}
        return
    import s3fs

    from pipeline.embedded.s3_server import local_s3_server

    with local_s3_server(workdir / "s3", buckets=["demo"]) as server:
        echo(f"embedded S3 server (SeaweedFS) at {server.endpoint_url}")
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())  # the AWS chain: the pipeline never sees credentials in its config
        try:
            fs = s3fs.S3FileSystem()
            fs.put(str(workdir / "samples") + "/", "demo/samples/", recursive=True)
            yield "s3://demo", {}
            for name in ("results", "pairs", "scores", "passed"):
                fs.get(f"demo/{name}/", str(workdir / name) + "/", recursive=True)
            echo(f"copied s3://demo/ results to {workdir}")
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _rows(folder: Path) -> list[dict]:
    import pyarrow.dataset as pads

    return pads.dataset(folder, format="parquet", ignore_prefixes=[".", "_"]).to_table().to_pylist()


def run_demo(
    *, workdir: Path | None = None, use_s3: bool | None = None, echo: Callable[[str], None] = print
) -> tuple[RunSummary, str]:
    """With the trained tiny model (written once): draw held-out samples of its world (`world`), caption and
    question images and videos, ask which of two images shows a shape, score yes/no questions and keep the red
    shapes; print rows next to the truth and the accuracy measured. Returns the first job's summary and results."""
    from pipeline.embedded import meaning as M
    from pipeline.embedded.s3_server import find_weed
    from pipeline.embedded.tiny_model import make_tiny_model
    from pipeline.run.runner import run_job

    workdir = (workdir or Path(DEMO_WORKDIR)).resolve()
    model = workdir / "tiny-internvl-trained"
    if not (model / "config.json").exists():
        make_tiny_model(model, trained=True)
        echo(f"wrote the trained tiny InternVL checkpoint to {model}")
    truth = M.draw_eval_set(workdir / "samples", images=9, pairs=3, videos=4)
    echo(f"drew {len(truth.rows)} held-out samples of the world in {workdir / 'samples'} (9 images of 1-13 tiles, "
         "3 image pairs, 4 videos)")
    use_s3 = find_weed() is not None if use_s3 is None else use_s3
    with _storage(workdir, use_s3, echo) as (base, options):
        common = {"storage": options, "compute": {"replicas": 1, "batch_size": 4}}
        summary = run_job(parse_job({**M.vqa_job(f"{base}/samples/singles.jsonl", f"{base}/results/", str(model)),
                                     **common}, source="demo"), echo=echo)
        run_job(parse_job({**M.vqa_job(f"{base}/samples/pairs.jsonl", f"{base}/pairs/", str(model)), **common},
                          source="demo"), echo=echo)
        run_job(parse_job({**M.score_job(f"{base}/samples/images.jsonl", f"{base}/scores/", str(model), keep="red",
                                         output_passed=f"{base}/passed/"), **common}, source="demo"), echo=echo)
    answers = _rows(workdir / "results") + _rows(workdir / "pairs")
    echo("answers next to the truth:")
    M.show_rows([r for r in answers if r["question"] in (M.W.CAPTION, M.W.VIDEO_CAPTION, M.W.WHICH_WAY)]
                + [r for r in answers if r["media_type"] == "images"], truth, echo, limit=20)
    echo("accuracy: " + M.format_metrics({k: v for k, v in M.answer_metrics(answers, truth).items()}))
    scores = _rows(workdir / "scores")
    passed = sorted(r["id"] for r in scores if r["passed"])
    red = sorted(rid for rid, lab in truth.labels.items() if lab["is_red"])
    echo(f"filter 'Is the shape red?' >= 0.5 kept {passed}; the red shapes are {red}")
    echo("scores: " + M.format_metrics(M.score_metrics(scores, truth, keep="red")))
    return summary, str(workdir / "results")
