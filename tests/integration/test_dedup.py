"""`dedup: exact` end to end on local Ray: 200 pictures of which 50 distinct (and a corrupt file twice) -> 50 samples
reach the model, every sample gets its rows (a duplicate: its representative's answer, or its error, and
`duplicate_of`); a run resumed after the copies were lost fills them without the model, and a last run finds
nothing to do and keeps one row per id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import parse_job

pytestmark = pytest.mark.integration


def distinct_picture(k: int, path: Path) -> None:
    """A small picture of its own for each k (the seeded noise differs, so do the bytes)."""
    rng = np.random.default_rng(k)
    Image.fromarray(rng.integers(0, 256, (24 + k % 5, 32, 3), dtype=np.uint8), "RGB").save(path)


def test_dedup_exact_computes_each_picture_once_and_copies_the_rest(ray_local, tiny_model, tmp_path):
    from pipeline.run.runner import run_job

    images = tmp_path / "images"
    images.mkdir()
    for k in range(50):
        distinct_picture(k, images / f"{k:03d}.png")
    for i in range(50, 200):  # copies under other names: the same bytes as picture i % 50
        (images / f"{i:03d}.png").write_bytes((images / f"{i % 50:03d}.png").read_bytes())
    for name in ("x1.png", "x2.png"):  # the same undecodable bytes twice: one error, copied
        (images / name).write_bytes(b"not a picture")
    job = parse_job({"task": "caption", "input": str(images), "output": str(tmp_path / "out"), "model": str(tiny_model),
                     "generation": {"max_new_tokens": 2}, "dedup": "exact", "rows_per_shard": 64,
                     "compute": {"batch_size": 8}})
    lines: list[str] = []
    summary = run_job(job, echo=lines.append)
    assert sum(r["samples"] for r in summary.replicas.values()) == 50  # counted by the model stage
    assert (summary.rows_in, summary.rows_out, summary.rows_ok, summary.rows_error) == (202, 202, 200, 2)
    assert (summary.duplicates_found, summary.rows_copied) == (151, 151)
    assert summary.model_s_saved is not None and summary.model_s_saved > 0
    success = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert success["duplicates_found"] == 151 and success["rows_copied"] == 151

    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == 202 and all(r["sample_id"] == r["id"] for r in rows.values())
    for k in range(50):  # a picture's copies: the smallest id is computed, the others name it
        copies = [rows[f"{i:03d}.png"] for i in range(k, 200, 50)]
        rep = min(copies, key=lambda r: r["id"])
        assert rep["duplicate_of"] is None and rep["status"] == "ok" and rep["response"]
        for row in copies:
            if row is not rep:
                assert row["duplicate_of"] == rep["id"] and row["response"] == rep["response"]
                assert (row["status"], row["settings"]) == ("ok", rep["settings"])
    first, second = sorted([rows["x1.png"], rows["x2.png"]], key=lambda r: r["id"])
    assert first["duplicate_of"] is None and second["duplicate_of"] == first["id"]
    assert second["error_type"] == first["error_type"] == "decode_error"

    # Resumed after the copies were lost (as if the run died before its fill pass): the representatives are done, so
    # their duplicates are filled from the output without the model.
    out = tmp_path / "out"
    copies = [p for p in out.glob("part-*.parquet") if pq.read_table(p, columns=["duplicate_of"]).column(0).null_count == 0]
    assert sum(pq.read_metadata(p).num_rows for p in copies) == 151
    for p in copies:
        p.unlink()
    resumed = run_job(job, echo=lines.append)
    assert resumed.replicas == {} and resumed.rows_copied == 151 and resumed.model_s_saved is None
    assert (resumed.rows_out, resumed.rows_ok) == (202, 200)

    again = run_job(job, echo=lines.append)  # nothing left to do
    assert again.rows_this_run == 0 and again.rows_out == 202 and again.replicas == {}
    assert any("nothing to do" in line for line in lines)
    ids = pq.read_table(str(out), columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 202


def test_duplicates_are_split_alike_in_one_task_and_through_shuffles(ray_local, tiny_model, tmp_path, monkeypatch):
    """Up to 1M samples the representatives are chosen in one task and each block of samples checked against them;
    a larger job shuffles (a group-by and two joins): both give the same duplicates, representatives and samples to
    do (no model run: the split alone)."""
    from pipeline.run import dedup
    from pipeline.run.runner import plan_job
    from pipeline.stages.dedup import REP_COLUMN

    images = tmp_path / "images"
    images.mkdir()
    for k in range(12):
        distinct_picture(k % 5, images / f"{k:02d}.png")  # 5 distinct pictures, 7 copies
    (images / "bad.png").write_bytes(b"not a picture")  # no key: never a duplicate
    job = parse_job({"task": "caption", "input": str(images), "output": str(tmp_path / "out"), "model": str(tiny_model),
                     "dedup": "exact"})
    splits = []
    for partitions in (1, 2):
        monkeypatch.setattr(dedup, "partitions_for", lambda rows, n=partitions: n)
        plan = plan_job(job, echo=lambda _: None)
        dups = dedup.split_duplicates(job, plan, echo=lambda _: None)
        splits.append((dups.found, dups.todo_samples, plan.samples_todo,
                       sorted((r["id"], r[REP_COLUMN]) for r in dups.todo.take_all()),
                       sorted(r["id"] for r in plan.todo.take_all())))
    assert splits[0] == splits[1]
    found, waiting, todo, pairs, left = splits[0]
    assert (found, waiting, todo, len(pairs), len(left)) == (7, 7, 6, 7, 6)
    ids = {r["uri"].rsplit("/", 1)[-1]: r["id"] for r in plan.inputs.samples.take_all()}
    groups: dict[int, list[str]] = {}
    for k in range(12):
        groups.setdefault(k % 5, []).append(ids[f"{k:02d}.png"])
    assert pairs == sorted((i, min(g)) for g in groups.values() for i in g if i != min(g))  # the smallest id computes
