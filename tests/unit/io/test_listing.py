"""Listings and inventories as tables, one batch at a time (what the run's Ray tasks call)."""

import gzip

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import InputError
from pipeline.io.inputs import is_media, manifest_base, manifest_rows, media_rows, skipped_counts
from pipeline.io import listing
from pipeline.io.listing import inventory_listing, list_level, list_tree, manifest_files, manifest_sizes, parquet_rows
from pipeline.run.sources import KEPT, listing_counts


@pytest.fixture()
def tree(tmp_path):
    for name in ["top.jpg", "a/1.png", "a/deep/2.png", "b/3.webp", "b/notes.txt", "b/.hidden.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            (tmp_path / name).write_text("x")
        else:
            Image.new("RGB", (8, 8)).save(tmp_path / name, "PNG")
    return tmp_path


def test_a_prefix_is_listed_by_its_top_level_then_each_sub_prefix(tree):
    top, prefixes = list_level(str(tree))
    assert top.column("uri").to_pylist() == [str(tree / "top.jpg")]
    assert prefixes == [str(tree / "a"), str(tree / "b")]
    parts = pa.concat_tables([top] + [list_tree(p) for p in prefixes])
    assert sorted(u.removeprefix(str(tree) + "/") for u in parts.column("uri").to_pylist()) == [
        "a/1.png", "a/deep/2.png", "b/.hidden.jpg", "b/3.webp", "b/notes.txt", "top.jpg"]
    assert all(v for v in parts.column("version").to_pylist())  # size-mtime where there is no ETag
    assert skipped_counts(parts).to_pylist() == [{"ext": ".txt", "n": 1}]  # hidden files are not counted
    assert media_rows(parts).num_rows == 4  # .hidden.jpg is left out, as markers are
    counted = listing_counts(parts, is_media).to_pylist()  # the run's one pass: skipped files and media together
    assert counted == [{"ext": ".txt", "n": 1}, {"ext": KEPT, "n": 4}]


def test_a_glob_lists_only_what_can_match(tree):
    top, prefixes = list_level(str(tree / "*.jpg"))  # one level: no sub-prefix can hold a match
    assert top.column("uri").to_pylist() == [str(tree / "top.jpg")] and prefixes == []
    top, prefixes = list_level(str(tree / "*" / "*.png"))
    rows = [u for p in prefixes for u in list_tree(p, pattern=str(tree / "*" / "*.png")).column("uri").to_pylist()]
    assert top.num_rows == 0 and rows == [str(tree / "a" / "1.png")]


def test_manifest_folder_files_and_bases(tmp_path):
    (tmp_path / "m").mkdir()
    for name in ["a.jsonl", "b.jsonl", "_SUCCESS", ".tmp"]:
        (tmp_path / "m" / name).write_text("{}")
    assert manifest_files(str(tmp_path / "m")) == [str(tmp_path / "m" / "a.jsonl"), str(tmp_path / "m" / "b.jsonl")]
    assert manifest_sizes(str(tmp_path / "m" / "*.jsonl")) == {str(tmp_path / "m" / n): 2 for n in ("a.jsonl", "b.jsonl")}
    (tmp_path / "m" / "c.csv").write_text("uri\n")
    with pytest.raises(InputError, match="all alike"):
        manifest_files(str(tmp_path / "m"))
    assert manifest_base("s3://b/m/x.jsonl") == "s3://b/m"
    assert manifest_base("s3://b/m/") == "s3://b/m" and manifest_base("s3://b/m/*.parquet") == "s3://b/m"
    assert manifest_base("s3://b/m") == "s3://b/m" and manifest_base(str(tmp_path / "m")) == str(tmp_path / "m")


def test_parquet_manifests_are_counted_from_their_footers(tmp_path, monkeypatch):
    files = []
    for i, n in enumerate((3, 5)):
        pq.write_table(pa.table({"uri": [f"s3://b/{i}-{k}.jpg" for k in range(n)]}), tmp_path / f"{i}.parquet",
                       row_group_size=2)
        files.append(str(tmp_path / f"{i}.parquet"))
    assert parquet_rows(files) == 8
    monkeypatch.setattr(listing, "FOOTER_FILES", 1)
    assert parquet_rows(files) is None  # too many files to open in the driver: not counted


def test_manifest_batches_derive_the_same_ids_in_any_batch():
    table = pa.table({"uri": ["a.jpg", "b.jpg", "c.jpg"], "id": [None, "given", None]})
    whole = manifest_rows(table, "m.jsonl", "/data")
    parts = pa.concat_tables([manifest_rows(table.slice(i, 1), "m.jsonl", "/data") for i in range(3)])
    assert whole.equals(parts) and whole.column("id")[1].as_py() == "given"
    assert whole.column("uri").to_pylist() == ["/data/a.jpg", "/data/b.jpg", "/data/c.jpg"]


def test_inventory_rows_become_a_listing_of_current_objects():
    names = ["Bucket", "Key", "Size", "LastModifiedDate", "ETag", "IsLatest", "IsDeleteMarker"]
    data = gzip.compress(b'"bkt","photos/a%20b.jpg","10","2026","e1","true","false"\n'
                         b'"bkt","photos/old.jpg","10","2025","e0","false","false"\n'
                         b'"bkt","photos/gone.jpg","0","2026","","true","true"\n'
                         b'"bkt","photos/","0","2026","e2","true","false"\n')
    batch = pacsv.read_csv(pa.py_buffer(gzip.decompress(data)), read_options=pacsv.ReadOptions(column_names=names),
                           convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}))
    listing = inventory_listing(batch)
    assert listing.to_pylist() == [{"uri": "s3://bkt/photos/a b.jpg", "version": "e1"}]
    assert inventory_listing(batch, url_encoded=False).column("uri")[0].as_py() == "s3://bkt/photos/a%20b.jpg"
