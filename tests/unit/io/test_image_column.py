"""Pictures inside a Parquet manifest (no Ray): ids from paths else hashes, an id pass that never reads the bytes
where paths are there (proved on a file whose bytes pages are wrecked), and the CPU stage decoding the column's
bytes exactly as it decodes the same picture read from a URI."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job
from pipeline.errors import InputError, JobError, MediaError
from pipeline.io.image_column import cell_media, image_rows, picture_keys, read_key_rows
from pipeline.io.inputs import derive_id
from pipeline.stages.preprocess import Preprocess
from tests.conftest import pattern_image
from tests.helpers import numpy_batch

PICTURE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(w: int, h: int = 40) -> bytes:
    buf = io.BytesIO()
    pattern_image(w, h).save(buf, "PNG")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_ids_come_from_paths_else_from_the_bytes():
    a, b = _png(50), _png(60)
    struct = pa.array([{"bytes": a, "path": "s3://b/a.png"}, {"bytes": b, "path": None}, None], PICTURE)
    assert picture_keys(struct) == [["s3://b/a.png"], [_sha(b)], []]
    assert picture_keys(pa.array([a, b], pa.binary())) == [[_sha(a)], [_sha(b)]]
    listed = pa.array([[{"bytes": a, "path": "a.png"}, {"bytes": b, "path": None}], []], pa.list_(PICTURE))
    assert picture_keys(listed) == [["a.png", _sha(b)], []]

    table = pa.table({"image": struct.slice(0, 2), "question": ["what?", None]})
    rows = image_rows(table, "m.parquet", "image")
    assert rows.column_names[:2] == ["id", "uri"] and "image" in rows.column_names  # the bytes go on to the CPU stage
    assert rows.column("id").to_pylist() == [derive_id("s3://b/a.png", "what?"), derive_id(_sha(b))]
    assert rows.column("uri").to_pylist() == ["s3://b/a.png", _sha(b)]
    pairs = image_rows(pa.table({"images": listed.slice(0, 1)}), "m.parquet", "images")
    assert pairs.column("id").to_pylist() == [derive_id(f"a.png\n{_sha(b)}")]

    with pytest.raises(InputError, match="no picture"):
        image_rows(pa.table({"image": struct}), "m.parquet", "image")
    given = image_rows(pa.table({"id": ["x", "y", "z"], "image": struct}), "m.parquet", "image")
    assert given.column("id").to_pylist() == ["x", "y", "z"]  # a row without a picture, given an id: an error row later
    with pytest.raises(InputError, match="must hold binary"):
        image_rows(pa.table({"image": ["text"]}), "m.parquet", "image")
    with pytest.raises(InputError, match="has no column 'picture'"):
        image_rows(pa.table({"image": struct}), "m.parquet", "picture")


def _wreck_bytes_pages(path, row_groups: list[int]) -> None:
    """Overwrite the `image.bytes` column chunk of these row groups with junk: reading them fails from now on."""
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for rg in row_groups:
        chunk = next(meta.row_group(rg).column(j) for j in range(meta.num_columns)
                     if meta.row_group(rg).column(j).path_in_schema == "image.bytes")
        start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None and o > 0)
        data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def test_the_id_pass_reads_paths_only_and_the_bytes_only_where_a_row_has_no_path(tmp_path):
    pictures = [_png(40 + i) for i in range(6)]
    paths = [f"s3://b/{i}.png" for i in range(6)]
    paths[4] = None  # the second row group has a row without a path: its bytes are hashed
    table = pa.table({"image": pa.array([{"bytes": d, "path": p} for d, p in zip(pictures, paths)], PICTURE),
                      "questions": [["q1", "q2"]] * 6})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=3, use_dictionary=False)
    expected = image_rows(table, str(path), "image").select(["id", "questions"])
    _wreck_bytes_pages(path, [0])
    with pytest.raises(Exception):  # the wreck is real: reading the bytes of row group 0 fails
        pq.read_table(path)
    keys = read_key_rows(str(path), "image")
    assert keys.equals(expected)  # row group 0 by its paths alone; row group 1 read whole for its path-less row

    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "image": pictures[:2]}), binary)
    assert read_key_rows(str(binary), "image").column("id").to_pylist() == ["a", "b"]  # given ids: bytes not needed
    pq.write_table(pa.table({"image": pictures[:2]}), binary)
    assert read_key_rows(str(binary), "image").column("id").to_pylist() == [derive_id(_sha(d)) for d in pictures[:2]]


def test_the_cpu_stage_decodes_the_column_as_it_decodes_a_uri(tmp_path):
    a, b = _png(900, 500), _png(300)
    (tmp_path / "a.png").write_bytes(a)
    job = parse_job({"task": "caption", "input": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                     "model": "m", "image_column": "image"})
    stage = Preprocess(job)
    rows = image_rows(pa.table({"id": ["1", "2", "3"], "image": pa.array(
        [{"bytes": a, "path": "a.png"}, {"bytes": None, "path": "b.png"}, {"bytes": b, "path": None}], PICTURE)}),
        "m.parquet", "image")
    out = stage(numpy_batch(rows)).to_pylist()
    assert [(r["status"], r["error_type"]) for r in out] == [("ok", None), ("error", "bad_input"), ("ok", None)]
    assert "image" not in out[0]  # the bytes end in the CPU stage
    assert out[0]["pixels"] == stage.prepare(str(tmp_path / "a.png"))["pixels"] and out[0]["num_tiles"] == 3
    listed = image_rows(pa.table({"images": pa.array([[{"bytes": a, "path": None}, {"bytes": b, "path": None}]],
                                                     pa.list_(PICTURE))}), "m.parquet", "images")
    pair = Preprocess(parse_job({**job.model_dump(exclude_none=True), "image_column": "images"}))(numpy_batch(listed))
    assert pair.column("media_type").to_pylist() == ["images"]
    assert cell_media(b"raw", "image") == [("", b"raw")]
    with pytest.raises(MediaError, match="holds no picture"):
        cell_media(None, "image")


def test_image_column_only_for_manifests(tmp_path):
    from pipeline.run.plan import probe_input

    with pytest.raises(JobError, match="image_column: only for a Parquet manifest"):
        parse_job({"task": "caption", "input": "s3://b/x/", "input_format": "files", "output": "o", "model": "m",
                   "image_column": "image"})
    shards = parse_job({"task": "caption", "input": str(tmp_path / "{0..1}.tar"), "output": "o", "model": "m",
                        "image_column": "image"})
    with pytest.raises(InputError, match="image_column: needs a Parquet manifest as input"):
        probe_input(shards)  # preflight: before any work
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "part-0.parquet")
    probe_input(shards.model_copy(update={"input": str(tmp_path)}))  # a folder of manifests under `auto`: fine
