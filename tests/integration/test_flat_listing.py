"""One flat prefix of a few thousand objects is listed by several tasks, each holding at most a set number of
entries, and every object exactly once: a local folder (one streaming read, looked up in parallel) and an S3 prefix
(key ranges split by probes, SeaweedFS). The cap is set small through INTERNVL_BATCH_LIST_KEYS."""

from __future__ import annotations

import random

import pytest
import s3fs

from pipeline.config import parse_job
from pipeline.errors import InputError

pytestmark = pytest.mark.integration

CAP = 300


def hash_names(n: int) -> list[str]:
    rng = random.Random(7)
    return [f"{rng.getrandbits(64):016x}.jpg" for _ in range(n)]


def listed(job_dict, monkeypatch, workers: int = 4):
    from pipeline.run.sources import list_objects

    monkeypatch.setenv("INTERNVL_BATCH_LIST_KEYS", str(CAP))
    monkeypatch.setenv("INTERNVL_BATCH_LIST_WORKERS", str(workers))
    listing = list_objects(parse_job(job_dict))
    return listing, [r["uri"] for r in listing.rows.take_all()]


def test_a_flat_local_folder_is_listed_in_bounded_blocks_each_object_once(ray_local, tiny_model, tmp_path, monkeypatch):
    from pipeline.run.runner import plan_job

    folder = tmp_path / "flat"
    folder.mkdir()
    names = hash_names(2500) + ["notes.txt"]
    for name in names:
        (folder / name).touch()
    for sub in ("a", "b"):
        (folder / sub).mkdir()
        (folder / sub / "x.jpg").touch()
    job = {"task": "caption", "input": str(folder), "output": str(tmp_path / "out"), "model": str(tiny_model)}
    listing, uris = listed(job, monkeypatch)
    assert sorted(uris) == sorted([str(folder / n) for n in names] + [str(folder / "a/x.jpg"), str(folder / "b/x.jpg")])
    assert (listing.mode, listing.tasks, listing.largest) == ("scan", 9, CAP)  # 2503 entries in blocks of 300
    lines: list[str] = []
    figures = plan_job(parse_job(job), echo=lines.append).figures()
    assert figures["samples"] == 2502 and figures["skipped"] == {".txt": 1}
    assert "listing: the top level in 9 parts of at most 300 entries (scan)" in lines
    _, uris = listed({**job, "input": str(folder / "*.jpg")}, monkeypatch, workers=1)  # a glob: same blocks, filtered
    assert sorted(uris) == sorted(str(folder / n) for n in names if n.endswith(".jpg"))
    with pytest.raises(InputError, match=r"^input '.*/missing' does not exist"):  # the task's error, unwrapped
        listed({**job, "input": str(tmp_path / "missing")}, monkeypatch)


def test_a_flat_s3_prefix_is_listed_by_key_ranges_each_object_once(ray_local, s3_server, tiny_model, tmp_path,
                                                                   monkeypatch):
    fs = s3fs.S3FileSystem()
    names = hash_names(2000) + [f"img_{i:05d}.jpg" for i in range(700)] + ["sub/a.jpg", "sub/deep/b.jpg", "zz/c.jpg"]
    fs.pipe({f"bucket/flat/{n}": b"" for n in names})
    job = {"task": "caption", "input": "s3://bucket/flat/", "output": str(tmp_path / "out"), "model": str(tiny_model)}
    listing, uris = listed(job, monkeypatch)
    assert sorted(uris) == sorted(f"s3://bucket/flat/{n}" for n in names)  # every object once, sub-prefixes included
    assert listing.mode == "ranges" and listing.ranged and listing.largest <= CAP
    assert listing.tasks >= -(-2702 // CAP), listing  # 2700 objects and 2 sub-prefixes, CAP a task at most
    _, uris = listed({**job, "input": "s3://bucket/flat/img_*.jpg"}, monkeypatch, workers=1)
    assert sorted(uris) == [f"s3://bucket/flat/img_{i:05d}.jpg" for i in range(700)]
