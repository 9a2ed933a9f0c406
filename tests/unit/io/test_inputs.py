"""Input rows: prefixes, globs and manifests become rows with stable ids; malformed manifests are named.

The run applies these functions to Ray Data blocks (pipeline/run/sources.py); here they are composed in-process on
what a listing task (list_tree) or a manifest reader returns."""

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import InputError
from pipeline.io.inputs import (MANIFEST_TEXT_TYPES, add_counts, derive_id, manifest_base, manifest_rows, media_rows,
                                skipped_counts)
from pipeline.io.listing import list_tree


def listed(url):
    """The input rows of a prefix or glob, sorted by URI, and the skipped files by extension."""
    listing = list_tree(str(url)).sort_by("uri")
    return media_rows(listing), add_counts({}, skipped_counts(listing))


def manifest(path):
    """A manifest file's input rows, read as the run's readers read it (CSV: id, uri, question as text)."""
    path = str(path)
    if path.endswith(".parquet"):
        table = pq.read_table(path)
    elif path.endswith(".jsonl"):
        table = pajson.read_json(path)
    else:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=MANIFEST_TEXT_TYPES))
    return manifest_rows(table, path, manifest_base(path))


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.png", "sub/c.webp"]:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not media")
    return tmp_path


def test_prefix_lists_media_sorted_with_stable_ids(folder):
    rows, skipped = listed(folder)
    uris = rows.column("uri").to_pylist()
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["a.png", "b.jpg", "c.webp"]
    assert skipped == {".txt": 1}
    assert rows.column("id").to_pylist() == [derive_id(u) for u in uris]
    assert listed(folder)[0].equals(rows)


def test_files_without_an_extension_are_listed_and_recognised_by_content(folder):
    """As the README says of manifests: a file without an extension is taken and decoded by its content."""
    from pipeline.config import parse_job
    from pipeline.stages.preprocess import Preprocess
    from tests.media import make_video

    (folder / "clip").write_bytes(make_video(20, 10))
    Image.new("RGB", (64, 48)).save(folder / "photo", "PNG")
    (folder / "_SUCCESS").write_text("")  # a marker another tool left: neither media nor counted
    (folder / ".hidden").write_text("x")
    rows, skipped = listed(folder)
    names = [u.rsplit("/", 1)[-1] for u in rows.column("uri").to_pylist()]
    assert names == ["a.png", "b.jpg", "clip", "photo", "c.webp"] and skipped == {".txt": 1}
    stage = Preprocess(parse_job({"task": "caption", "input": str(folder), "output": "y", "model": "m",
                                  "video": {"num_frames": 2}}))
    rows = {name: stage.prepare(str(folder / name)) for name in ("clip", "photo")}
    assert [(r["status"], r["media_type"]) for r in rows.values()] == [("ok", "video"), ("ok", "image")]


def test_glob(folder):
    rows, _ = listed(folder / "*.jpg")
    assert [u.rsplit("/", 1)[-1] for u in rows.column("uri").to_pylist()] == ["b.jpg"]


def test_missing_input(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        listed(tmp_path / "nothing-here")


def test_jsonl_manifest_passthrough_and_ids(folder, tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [
        {"uri": str(folder / "a.png"), "question": "What colour?", "source": "web", "score": 0.5},
        {"uri": str(folder / "a.png"), "question": "How many?", "source": "web", "score": 0.7},
        {"id": "given-1", "uri": str(folder / "b.jpg"), "question": "Why?", "source": "cam", "score": 0.1},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    table = manifest(path)
    ids = table.column("id").to_pylist()
    assert ids[2] == "given-1" and ids[0] != ids[1]  # same image, two questions: two ids
    assert table.column("source").to_pylist() == ["web", "web", "cam"]
    assert table.column_names[:2] == ["id", "uri"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_manifests(folder, tmp_path, fmt):
    table = pa.table({"uri": [str(folder / "a.png"), str(folder / "b.jpg")], "label": ["x", "y"]})
    path = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        path.write_text("uri,label\n" + "\n".join(f"{u},{l}" for u, l in zip(*table.to_pydict().values())))
    else:
        pq.write_table(table, path)
    out = manifest(path)
    assert out.num_rows == 2 and out.column("label").to_pylist() == ["x", "y"]


def test_manifest_without_uri(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"url": "x.jpg"}\n')
    with pytest.raises(InputError, match="no 'uri' \(or 'uris'\) column"):
        manifest(path)


def test_manifest_reserved_column(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"uri": "a.jpg", "status": "new"}\n')
    with pytest.raises(InputError, match="status"):
        manifest(path)


def test_relative_uris_resolve_against_the_manifest(folder):
    (folder / "m.csv").write_text("uri\na.png\nsub/c.webp\n")
    uris = manifest(folder / "m.csv").column("uri").to_pylist()
    assert uris == [f"{folder}/a.png", f"{folder}/sub/c.webp"]
