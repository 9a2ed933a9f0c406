"""The plan's estimate reads a few samples' headers wherever their pictures lie: files, WebDataset shard members (by
byte range), or a Parquet manifest's picture column."""

from __future__ import annotations

import io

import pyarrow as pa

from pipeline.config import parse_job
from pipeline.io.image_column import image_rows
from pipeline.io.webdataset import index_shard
from pipeline.media.budget import tile_count
from pipeline.run.estimate import sample_tiles
from tests.conftest import pattern_image
from tests.media import make_video
from tests.shards import tar_bytes


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    pattern_image(w, h).save(buf, "PNG")
    return buf.getvalue()


def test_tiles_from_files_shard_members_and_picture_columns(tmp_path):
    job = parse_job({"task": "caption", "input": str(tmp_path / "x.tar"), "output": "o", "model": "m",
                     "image_column": "image"})
    wide = tile_count(1800, 600, min_tiles=1, max_tiles=12, thumbnail=True)
    (tmp_path / "wide.png").write_bytes(_png(1800, 600))
    assert sample_tiles(job.model_copy(update={"image_column": None}), {"uri": str(tmp_path / "wide.png")}) == wide
    shard = tmp_path / "x.tar"
    shard.write_bytes(tar_bytes([("a.png", _png(1800, 600)), ("b.mp4", make_video(4, 4)), ("c.json", b"{}")]))
    rows = index_shard(str(shard), None).to_pylist()
    assert [sample_tiles(job, r) for r in rows] == [wide, job.video.num_frames, None]  # c: no picture
    carried = image_rows(pa.table({"image": [_png(1800, 600), b"junk"]}), "m.parquet", "image").to_pylist()
    assert [sample_tiles(job, r) for r in carried] == [wide, None]
