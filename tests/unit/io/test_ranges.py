"""A top level listed in bounded parts: key ranges split by probes (the algorithm over an in-memory level, as S3
answers ListObjectsV2), and a local folder read in blocks and looked up as fs.ls does."""

import os
import random

import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import InputError
from pipeline.io.listing import list_level
from pipeline.io.ranges import KEY_MAX, KeyRange, _range_entries, local_info, look_up_names, scan_names, split_rest


class FakeLevel:
    """One level of an S3 prefix as ListObjectsV2 answers it (Delimiter '/': keys under a sub-prefix roll up into
    one entry 'name/'; StartAfter; pages of `limit`), counting the requests."""

    def __init__(self, keys: list[str], honours_start_after: bool = True):
        entries = {k.split("/", 1)[0] + "/" if "/" in k else k for k in keys}
        self.keys = sorted(keys)
        self.entries = sorted(entries)
        self.honours = honours_start_after
        self.requests = 0

    def page(self, after, limit, token=None):
        self.requests += 1
        start = int(token) if token else 0
        if not token and after and self.honours:  # S3 rolls up the keys after `after`, so a cut sub-prefix comes back
            start = next((i for i, e in enumerate(self.entries) if self.after(e, after)), len(self.entries))
        out = [(e, {"type": "directory"} if e.endswith("/") else {"type": "file", "ETag": e})
               for e in self.entries[start:start + limit]]
        return out, (str(start + limit) if start + limit < len(self.entries) else None)

    def after(self, entry, after):
        return any(k > after for k in self.keys if k.startswith(entry)) if entry.endswith("/") else entry > after

    def first_after(self, after):
        entries, _ = self.page(after, 1)
        return entries[0][0] if entries else None


def list_all(level, cap):
    """The range algorithm as the driver runs it: every task's entries, in task order."""
    todo, parts = [KeyRange()], []
    while todo:
        entries, rest = _range_entries(level, todo.pop(), cap)
        assert rest is not None and len(entries) <= cap
        parts.append([name for name, _ in entries])
        todo += rest
    return parts


@pytest.mark.parametrize("names", [
    [f"{random.Random(i).getrandbits(64):016x}.jpg" for i in range(3000)],  # hash-named
    [f"img_{i:09d}.jpg" for i in range(3000)],  # sequential
    [f"{c}{i:03d}.jpg" for c in "ab" for i in range(900)] + [f"d{i}/x.jpg" for i in range(600)] + ["z/1", "z/2"],
])
def test_every_entry_is_listed_exactly_once_by_tasks_holding_at_most_the_cap(names):
    level = FakeLevel(names)
    parts = list_all(level, cap=250)
    listed = [n for part in parts for n in part]
    assert sorted(listed) == level.entries  # each file and each sub-prefix exactly once
    assert len(parts) >= len(level.entries) // 250 and max(len(p) for p in parts) <= 250
    # probes are few next to the pages: at most a few per part
    assert level.requests <= 3 * len(parts) + len(level.entries) // 250 + 40


def test_a_split_cuts_hash_names_at_their_first_character_and_sequential_names_where_they_differ():
    hashed = FakeLevel([f"{c}{d}.jpg" for c in "0123456789abcdef" for d in "0123456789abcdef"])
    ranges = split_rest(hashed.first_after, "0f.jpg", None)
    assert [r.until for r in ranges] == [f"{c}{KEY_MAX}" for c in "123456789abcde"] + [None]
    sequential = FakeLevel([f"img_{i:05d}.jpg" for i in range(400)])
    ranges = split_rest(sequential.first_after, "img_00099.jpg", None)
    assert [r.until for r in ranges] == ["img_001" + KEY_MAX, "img_002" + KEY_MAX, None]
    assert split_rest(sequential.first_after, "img_00399.jpg", None) == []  # nothing left
    assert split_rest(sequential.first_after, "img_00099.jpg", "img_00099.jpg~") == []  # nothing left in range


def test_a_store_that_ignores_start_after_is_detected():
    level = FakeLevel([f"{i:04d}.jpg" for i in range(100)], honours_start_after=False)
    assert split_rest(level.first_after, "0010.jpg", None) is None


def test_local_info_is_what_fs_ls_says(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "a.jpg", tmp_path / "link.jpg")
    os.symlink(tmp_path / "sub", tmp_path / "dirlink")
    os.symlink(tmp_path / "gone", tmp_path / "broken.jpg")
    listed = {e["name"]: e for e in LocalFileSystem().ls(str(tmp_path), detail=True)}
    for name, info in listed.items():
        assert {k: info[k] for k in ("type", "size", "mtime")} == local_info(name), name


def test_a_local_folder_is_read_in_blocks_and_looked_up_as_one_listing(tmp_path):
    for i in range(23):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"x" * i)
    (tmp_path / "sub").mkdir()
    blocks = list(scan_names(str(tmp_path), None, 5))
    assert [b.num_rows for b in blocks] == [5, 5, 5, 5, 4]
    parts = [look_up_names(b, str(tmp_path), None) for b in blocks]
    table = pa.concat_tables([t for t, _ in parts]).sort_by("uri")
    whole, dirs = list_level(str(tmp_path))
    assert table.equals(whole.sort_by("uri")) and [d for _, m in parts for d in m["dirs"]] == dirs
    assert [m["keys"] for _, m in parts] == [5, 5, 5, 5, 4]
    glob = str(tmp_path / "1*.jpg")
    matched = [u for b in scan_names(glob, None, 5) for u in look_up_names(b, glob, None)[0].column("uri").to_pylist()]
    assert sorted(matched) == [str(tmp_path / f"1{i}.jpg") for i in range(10)]
    one = str(tmp_path / "03.jpg")
    assert [b.column("path").to_pylist() for b in scan_names(one, None, 5)] == [[one]]
    with pytest.raises(InputError, match="does not exist"):
        list(scan_names(str(tmp_path / "missing"), None, 5))
