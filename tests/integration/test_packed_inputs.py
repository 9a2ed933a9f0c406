"""Datasets read where they live, through the real pipeline with the trained tiny model: WebDataset tar shards on
SeaweedFS (one row per sample, error rows, passthrough text, right answers, a SIGKILLed run resumed exactly once;
incremental by shard version) and pictures inside a Parquet manifest (the same answers as by URI)."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.config import parse_job
from pipeline.embedded import world as W
from pipeline.embedded.tiny_model import make_tiny_model
from tests.helpers import read_output
from tests.integration.test_reliability import clean_env, start_job, wait_for
from tests.shards import cut_inside, tar_bytes

pytestmark = pytest.mark.integration

QUESTIONS = [W.CAPTION, W.VIDEO_CAPTION]  # every sample is asked both; the one for its kind has a known answer
PICTURE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def model_url(tmp_path_factory, s3_server):
    model = make_tiny_model(tmp_path_factory.mktemp("trained") / "model", trained=True)
    s3fs.S3FileSystem().put(str(model) + "/", "bucket/packed/model/", recursive=True)
    return "s3://bucket/packed/model/"


def _image(rng: np.random.Generator, i: int) -> W.DrawnImage:
    return W.draw_image(rng, tiles=W.TILE_COUNTS[i % len(W.TILE_COUNTS)], fmt=("jpeg", "png")[i % 2])


def _write_corpus(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, dict]:
    """Three shards: images with json and txt members and one corrupt picture; images and a video; a shard cut in the
    middle of its third sample's picture. Returns, per sample key, what its rows must say."""
    rng = np.random.default_rng(20261206)
    expect: dict[str, dict] = {}
    n = 0
    for s in range(3):
        members = []
        for k in range(4):
            key = f"{s:02d}{k:04d}"
            meta = {"key": key, "shard": s}
            if s == 0 and k == 3:
                members += [(f"{key}.jpg", b"\xff\xd8 not a jpeg after all"), (f"{key}.json", json.dumps(meta).encode()),
                            (f"{key}.txt", b"corrupt")]
                expect[key] = {"error": "decode_error", "json": meta, "txt": "corrupt"}
                continue
            if s == 1 and k == 2:
                v = W.draw_video(rng, size=(320, 240), fps=10, duration_s=2.0, direction=W.DIRECTIONS[n % 4])
                members += [(f"{key}.mp4", v.data), (f"{key}.json", json.dumps(meta).encode())]
                expect[key] = {"question": W.VIDEO_CAPTION, "answer": v.answers[W.VIDEO_CAPTION], "json": meta, "txt": None}
                continue
            d = _image(rng, n)
            n += 1
            caption = d.answers[W.CAPTION]
            members += [(f"{key}.{'jpg' if d.format == 'jpeg' else 'png'}", d.data),
                        (f"{key}.json", json.dumps({**meta, "caption": caption}).encode()), (f"{key}.txt", caption.encode())]
            expect[key] = {"question": W.CAPTION, "answer": caption, "json": {**meta, "caption": caption}, "txt": caption}
        shard = tar_bytes(members)
        if s == 2:  # cut inside sample 2's picture: samples 0 and 1 whole, 2 an error row, 3 gone
            shard = cut_inside(shard, next(name for name, _ in members if name.startswith("020002.")))
            expect["020002"] = {"error": "read_error", "json": None, "txt": None}
            del expect["020003"]
        fs.pipe(f"{prefix}/{s:05d}.tar", shard)
    return expect


def _shards(fs: s3fs.S3FileSystem, out: str) -> dict[str, str]:
    fs.invalidate_cache()
    return {p: fs.info(p)["ETag"] for p in fs.glob(f"{out}/part-*.parquet")}


def test_webdataset_shards_on_s3_killed_and_resumed(s3_server, ray_local, model_url, tmp_path):
    from pipeline.run.runner import plan_job

    fs = s3fs.S3FileSystem()
    expect = _write_corpus(fs, "bucket/packed/wds")
    out = "bucket/packed/wds-out"
    job = {"task": "vqa", "questions": QUESTIONS, "input": "s3://bucket/packed/wds/{00000..00002}.tar",
           "output": f"s3://{out}/", "model": model_url, "model_cache": str(tmp_path / "cache"), "rows_per_shard": 2,
           "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 12}}
    plan = plan_job(parse_job(job, source="test"), echo=lambda _: None)
    assert (plan.samples, plan.rows_expected, plan.rows_todo) == (len(expect), 2 * len(expect), 2 * len(expect))

    env = {**clean_env(), **s3_server.env()}
    first = start_job(job, tmp_path, env=env)
    try:
        wait_for(lambda: len(_shards(fs, out)) >= 1 or first.poll() is not None, 600, "a first shard")
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)  # the driver; its local Ray goes with it
        first.wait(60)
    assert first.returncode == -signal.SIGKILL, first.stdout.read()  # killed, not ended by itself
    before: dict[str, str] = {}
    wait_for(lambda: (before.update(_shards(fs, out)) or True) and time.sleep(3) is None and _shards(fs, out) == before,
             60, "the killed run's workers to stop writing")
    assert not fs.exists(f"{out}/_SUCCESS.json")
    assert 0 < read_output(out, fs, columns=["id"]).num_rows < 2 * len(expect), "the first run ended before the kill"

    second = start_job(job, tmp_path, env=env)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log
    assert "resuming:" in log
    after = _shards(fs, out)
    assert all(after.get(name) == etag for name, etag in before.items())  # the finished part was not redone

    rows = read_output(out, fs).to_pylist()
    assert len(rows) == 2 * len(expect) and len({r["id"] for r in rows}) == len(rows)  # every row exactly once
    by_key: dict[str, list[dict]] = {}
    for r in rows:
        by_key.setdefault(r["uri"].rsplit("#", 1)[1], []).append(r)
    assert sorted(by_key) == sorted(expect)  # one sample per key, the truncated shard's lost sample absent
    misses = []
    for key, want in expect.items():
        got = by_key[key]
        assert {r["question"] for r in got} == set(QUESTIONS)
        assert all((json.loads(r["json"]) if r["json"] else None) == want["json"] and r["txt"] == want["txt"] for r in got)
        assert all("__wds" not in r for r in got)
        if "error" in want:
            assert {(r["status"], r["error_type"]) for r in got} == {("error", want["error"])}, key
            continue
        row = next(r for r in got if r["question"] == want["question"])
        assert row["status"] == "ok", (key, row["error_message"])
        if row["response"].strip() != want["answer"]:
            misses.append((key, row["response"], want["answer"]))
    assert len(misses) <= 1, misses  # the trained model: exact on held-out samples (one miss allowed, as test_meaning)
    assert any(r["media_type"] == "video" for r in rows)


def test_webdataset_incremental_takes_a_changed_shard_again(ray_local, tiny_model, tmp_path):
    from pipeline.run.runner import run_job

    rng = np.random.default_rng(3)

    def shard(name: str, keys: list[str]) -> None:
        members = [(f"{k}.png", W.draw_image(rng, tiles=1, fmt="png").data) for k in keys]
        (tmp_path / "in" / name).write_bytes(tar_bytes(members))

    (tmp_path / "in").mkdir()
    shard("a.tar", ["a0", "a1"])
    shard("b.tar", ["b0"])
    job = parse_job({"task": "caption", "input": str(tmp_path / "in" / "*.tar"), "output": str(tmp_path / "out"),
                     "model": str(tiny_model), "incremental": True, "generation": {"max_new_tokens": 1}}, source="test")
    first = run_job(job, echo=lambda _: None)
    assert (first.rows_this_run, first.objects_taken) == (3, 3)
    shard("b.tar", ["b0", "b1"])  # b changes (a new sample in it): both its samples are taken again, a is not
    second = run_job(job, echo=lambda _: None)
    assert (second.rows_this_run, second.objects_taken) == (2, 2)
    keys = sorted(r["uri"].rsplit("#", 1)[1] for r in read_output(tmp_path / "out").to_pylist())
    assert keys == ["a0", "a1", "b0", "b0", "b1"]  # b0 of both versions: an incremental output keeps earlier rows
    assert run_job(job, echo=lambda _: None).rows_this_run == 0  # nothing changed: no shard is indexed again


def test_pictures_inside_parquet_answer_as_the_same_pictures_by_uri(s3_server, ray_local, model_url, tmp_path):
    from pipeline.run.runner import run_job

    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(20261207)
    by_uri, inline, truth = [], [], {}
    for i in range(6):
        d = _image(rng, i + 2)
        uri = f"s3://bucket/packed/pictures/{i}.{'jpg' if d.format == 'jpeg' else 'png'}"
        fs.pipe(uri, d.data)
        name = f"single-{i}"
        by_uri.append({"uris": [uri], "questions": [W.CAPTION], "name": name})  # one manifest: uris in every row
        inline.append({"images": [{"bytes": d.data, "path": uri if i % 2 else None}], "questions": [W.CAPTION], "name": name})
        truth[name] = d.answers[W.CAPTION]
    for i in range(2):
        pair = W.draw_pair(rng, answer=("Image-1", "Image-2")[i])
        uris = []
        for j, im in enumerate(pair.images):
            uris.append(f"s3://bucket/packed/pictures/pair-{i}-{j}.{'jpg' if im.format == 'jpeg' else 'png'}")
            fs.pipe(uris[-1], im.data)
        name = f"pair-{i}"
        by_uri.append({"uris": uris, "questions": [pair.prompt], "name": name})
        inline.append({"images": [{"bytes": im.data, "path": None} for im in pair.images], "questions": [pair.prompt],
                       "name": name})
        truth[name] = pair.answers[pair.prompt]
    fs.pipe("bucket/packed/by-uri.jsonl", "".join(json.dumps(r) + "\n" for r in by_uri).encode())
    table = pa.Table.from_pylist(inline, schema=pa.schema([("images", pa.list_(PICTURE)), ("questions", pa.list_(pa.string())),
                                                           ("name", pa.string())]))
    with fs.open("bucket/packed/inline.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=4)

    answers = {}
    for manifest, extra in (("by-uri.jsonl", {}), ("inline.parquet", {"image_column": "images"})):
        out = f"s3://bucket/packed/out-{manifest.split('.')[0]}/"
        run_job(parse_job({"task": "vqa", "input": f"s3://bucket/packed/{manifest}", "output": out, "model": model_url,
                           "model_cache": str(tmp_path / "cache"), "generation": {"max_new_tokens": 12},
                           "compute": {"batch_size": 4}, **extra}, source="test"), echo=lambda _: None)
        rows = read_output(out.removeprefix("s3://"), fs).to_pylist()
        assert all(r["status"] == "ok" for r in rows) and "images" not in rows[0]
        answers[manifest] = {r["name"]: (r["response"], r["num_tiles"], r["media_type"]) for r in rows}
    assert answers["inline.parquet"] == answers["by-uri.jsonl"] and len(answers["by-uri.jsonl"]) == 8
    right = sum(answers["by-uri.jsonl"][name][0].strip() == want for name, want in truth.items())
    assert right >= len(truth) - 1, (answers, truth)
