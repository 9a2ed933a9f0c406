"""WebDataset shards indexed from their tar headers (no Ray): one row per sample, stable ids, byte ranges that read
back the members, and every kind of broken shard or member as the right error rows through the CPU stage."""

from __future__ import annotations

import io
import json

import fsspec
import pyarrow as pa
import pytest

from pipeline.config import parse_job
from pipeline.errors import InputError
from pipeline.io.inputs import derive_id, input_kind
from pipeline.io.webdataset import (WDS_COLUMN, expand_braces, index_shard, sample_media, shard_listing, split_key,
                                    stat_shards)
from pipeline.stages.preprocess import Preprocess
from tests.conftest import pattern_image
from tests.helpers import numpy_batch
from tests.media import make_video
from tests.shards import cut_inside, member_span, tar_bytes


def _png(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    pattern_image(w, h).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(w: int = 80, h: int = 60) -> bytes:
    buf = io.BytesIO()
    pattern_image(w, h).save(buf, "JPEG")
    return buf.getvalue()


VIDEO = make_video(12, 10)
MEMBERS = [
    ("000.jpg", _jpeg()), ("000.json", b'{"caption": "a", "width": 80}'), ("000.txt", "caf\u00e9".encode()),
    ("001.png", _png()), ("001.json", b'{"caption": "b"}'),
    ("002.mp4", VIDEO), ("002.txt", b"a clip"),
    ("003.jpg", b"not a jpeg at all"), ("003.txt", b"corrupt picture"),
    ("004.json", b'{"only": "text"}'),
    ("005.png", _png(32, 32)), ("005.json", b"{not json"),
    ("sub/006.jpg", _jpeg(40, 40)), ("sub/006.cls", b"7"),
]


@pytest.fixture()
def shard(tmp_path):
    path = tmp_path / "shard-00000.tar"
    path.write_bytes(tar_bytes(MEMBERS))
    return str(path)


def _job(tmp_path, **keys):
    return parse_job({"task": "caption", "input": str(tmp_path / "{0..1}.tar"), "output": str(tmp_path / "out"),
                      "model": "m", "video": {"num_frames": 2}, **keys})


def test_brace_patterns_expand_as_bash_does():
    assert expand_braces("s3://b/{00000..00003}.tar") == [f"s3://b/0000{i}.tar" for i in range(4)]
    assert expand_braces("x/{8..11}.tar") == ["x/8.tar", "x/9.tar", "x/10.tar", "x/11.tar"]
    assert expand_braces("x/{2..0}.tar") == ["x/2.tar", "x/1.tar", "x/0.tar"]
    assert expand_braces("x/{a,b}-{0..1}.tar") == ["x/a-0.tar", "x/a-1.tar", "x/b-0.tar", "x/b-1.tar"]
    assert expand_braces("x/{single}.tar") == ["x/{single}.tar"] and expand_braces("x/0.tar") == ["x/0.tar"]


def test_keys_split_as_webdataset_does():
    assert split_key("000123.jpg") == ("000123", "jpg")
    assert split_key("./dir.v1/abc.seg.PNG") == ("dir.v1/abc", "seg.png")
    assert split_key("README") is None


def test_tar_urls_are_webdataset_inputs():
    for url in ("s3://b/{00000..00009}.tar", "s3://b/shards/*.tar", "/data/one.tar"):
        assert input_kind(url) == "webdataset"
    assert input_kind("s3://b/shards/") == "files" and input_kind("s3://b/shards/", "webdataset") == "webdataset"
    listing = pa.table({"uri": ["s3://b/a.tar", "s3://b/_tmp.tar", "s3://b/x.jpg"], "version": ["1", "2", "3"]})
    assert shard_listing(listing).column("uri").to_pylist() == ["s3://b/a.tar"]


def test_one_row_per_sample_with_text_columns_and_stable_ids(shard):
    table = index_shard(shard, "v1")
    rows = {r["uri"].split("#", 1)[1]: r for r in table.to_pylist()}
    assert list(rows) == ["000", "001", "002", "003", "004", "005", "sub/006"]  # tar order
    assert [r["id"] for r in table.to_pylist()] == [derive_id(f"{shard}#{k}") for k in rows]
    assert index_shard(shard, "v2").equals(table)  # the version matters only to incremental runs
    versioned = index_shard(shard, "v2", versioned=True)
    assert versioned.column("id").to_pylist()[0] == derive_id(f"{shard}#000@v2")
    assert versioned.column("source_version").to_pylist() == ["v2"] * 7
    assert json.loads(rows["000"]["json"]) == {"caption": "a", "width": 80} and rows["000"]["txt"] == "caf\u00e9"
    assert rows["002"]["json"] is None and rows["002"]["txt"] == "a clip"
    assert [m["name"] for m in rows["002"][WDS_COLUMN]["media"]] == ["002.mp4"]
    assert rows["sub/006"][WDS_COLUMN]["media"][0]["name"] == "sub/006.jpg"  # the .cls member is left out
    # each media member reads back byte for byte from its recorded range
    for key, name in (("000", "000.jpg"), ("002", "002.mp4")):
        assert sample_media(rows[key][WDS_COLUMN]) == [(name, dict(MEMBERS)[name])]
        assert (rows[key][WDS_COLUMN]["media"][0]["offset"], rows[key][WDS_COLUMN]["media"][0]["size"]) == \
            member_span(tar_bytes(MEMBERS), name)
    # the index's verdicts on samples
    assert rows["004"][WDS_COLUMN]["error_type"] == "bad_input" and "no image or video" in rows["004"][WDS_COLUMN]["error"]
    assert rows["005"][WDS_COLUMN]["error_type"] == "bad_input" and "not valid JSON" in rows["005"][WDS_COLUMN]["error"]
    assert rows["005"]["json"] == "{not json"  # kept as it was: nothing is lost
    assert all(rows[k][WDS_COLUMN]["error"] is None for k in ("000", "001", "002", "003", "sub/006"))


def test_the_cpu_stage_decodes_members_and_turns_bad_ones_into_error_rows(shard, tmp_path):
    batch = numpy_batch(index_shard(shard, "v1"))
    out = Preprocess(_job(tmp_path))(batch).to_pylist()
    got = {r["uri"].split("#", 1)[1]: (r["status"], r["error_type"], r["media_type"]) for r in out}
    assert got == {"000": ("ok", None, "image"), "001": ("ok", None, "image"), "002": ("ok", None, "video"),
                   "003": ("error", "decode_error", None), "004": ("error", "bad_input", None),
                   "005": ("error", "bad_input", None), "sub/006": ("ok", None, "image")}
    assert WDS_COLUMN not in out[0] and out[0]["json"] and out[0]["txt"] == "caf\u00e9"  # read here, never written
    assert {r["uri"].split("#", 1)[1]: r["num_tiles"] for r in out}["002"] == 2  # two frames, one tile each
    by_uri = Preprocess(_job(tmp_path)).prepare(str(tmp_path / "same.jpg"), media=lambda: [("x.jpg", dict(MEMBERS)["000.jpg"])])
    assert by_uri["pixels"] == out[0]["pixels"]


def test_several_pictures_in_one_sample_are_one_multi_image_sample(tmp_path):
    path = tmp_path / "pairs.tar"
    path.write_bytes(tar_bytes([("k.left.jpg", _jpeg()), ("k.jpg", _jpeg(60, 80)), ("k.png", _png())]))
    table = index_shard(str(path), None)
    assert [m["name"] for m in table.column(WDS_COLUMN).to_pylist()[0]["media"]] == ["k.jpg", "k.png"]  # `left.jpg`: not a media extension
    row = Preprocess(_job(tmp_path))(numpy_batch(table)).to_pylist()[0]
    assert (row["status"], row["media_type"], len(row["tiles_per_image"])) == ("ok", "images", 2)


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    whole = tar_bytes(MEMBERS)
    cases = {
        "inside-data": cut_inside(whole, "002.mp4"),  # stops in the middle of a video
        "at-boundary": whole[:member_span(whole, "002.txt")[0] - 512],  # stops where 002.txt's header should be
        "garbage": whole[:member_span(whole, "003.jpg")[0] - 512] + b"\x7f" * 2048,  # junk where a header should be
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        rows = index_shard(str(path), None).to_pylist()
        keys = [r["uri"].split("#", 1)[1] for r in rows]
        errors = [r[WDS_COLUMN]["error_type"] for r in rows]
        assert keys == ["000", "001", "002"], name  # the last sample reached is the one the cut may have hurt
        assert errors == [None, None, "read_error"], name
        assert "ends early" in rows[-1][WDS_COLUMN]["error"], name
        out = Preprocess(_job(tmp_path))(numpy_batch(index_shard(str(path), None))).to_pylist()
        assert [r["status"] for r in out] == ["ok", "ok", "error"], name


class UnreachableStore(fsspec.AbstractFileSystem):
    """A store whose every read fails as a dropped connection does."""

    protocol = "unreachable"

    def _open(self, path, mode="rb", **kwargs):
        raise ConnectionResetError("connection reset by peer")


fsspec.register_implementation("unreachable", UnreachableStore, clobber=True)


def test_a_shard_that_cannot_be_read_is_one_error_row(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_bytes(b"hello, not a tar" * 100)
    for name, kind in (("empty.tar", "read_error"), ("text.tar", "read_error"), ("missing.tar", "not_found")):
        url = str(tmp_path / name)
        rows = index_shard(url, None).to_pylist()
        assert [(r["id"], r["uri"], r[WDS_COLUMN]["error_type"]) for r in rows] == [(derive_id(url), url, kind)], name
    with pytest.raises(InputError, match="could not read shard .*ConnectionResetError"):
        index_shard("unreachable://bucket/0.tar", None)  # a storage failure fails the plan: no row stands for it
    listed = stat_shards(pa.table({"uri": [str(tmp_path / "empty.tar"), str(tmp_path / "missing.tar")]}))
    assert listed.column("version").to_pylist()[1] is None  # a brace pattern's missing shard: kept, as a not_found row


def test_text_columns_keep_their_type_in_a_shard_where_no_row_has_them(tmp_path):
    """A shard of samples without a .txt member: numpy batches make the column null-typed, the writer types it, so
    the output's shards read back as one table."""
    import pyarrow.parquet as pq

    from pipeline.io.output import OutputFolder
    from pipeline.stages.write import WriteShards
    from tests.outputs import done_rows

    job = _job(tmp_path)
    for ids, txt in ((["a"], pa.array([None])), (["b"], pa.array(["caption"]))):
        WriteShards(job, OutputFolder(job.output), ["id", "uri", "txt"])(done_rows(ids, [f"/x/{i}" for i in ids]).append_column("txt", txt))
    shards = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert [pq.read_schema(f).field("txt").type for f in shards] == [pa.string(), pa.string()]
