"""Duplicates repaired: an id in the output twice (a shard copied under another name, a copy inside one shard, an
error row beside its ok row) ends once, by a stated rule, whether a run finds it or `internvl-batch repair` does."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import parse_job
from pipeline.io.output import OutputFolder
from pipeline.run.runner import repair_output_folder
from tests.conftest import pattern_image
from tests.helpers import output_rows
from tests.outputs import done_rows, write_done

pytestmark = pytest.mark.integration


def test_repair_keeps_one_row_per_id_by_the_rule(ray_local, tmp_path):
    out = tmp_path / "out"
    job = parse_job({"task": "caption", "input": str(tmp_path), "output": str(out), "model": "m"})
    ids = [f"r{i}" for i in range(30)]
    first, second, third = write_done(job, done_rows(ids, [f"/x/{i}.jpg" for i in ids]), rows_per_shard=10)
    shutil.copy(out / first, out / "part-copied-by-hand.parquet")  # r0..r9 twice
    table = pq.read_table(out / second)
    error = table.slice(0, 1).set_column(table.schema.get_field_index("status"), "status", pa.array(["error"]))
    pq.write_table(pa.concat_tables([error, table]), out / second)  # r10: an error row before its ok row, same shard
    (out / "_SUCCESS.json").write_text(json.dumps({"rows_out": 41, "rows_ok": 40, "rows_error": 1}))

    said = []
    done = repair_output_folder(OutputFolder(str(out)), echo=said.append)
    assert (done.ids, done.removed, done.shards) == (11, 11, 2)
    assert "ok row before an error row, then the copy in the shard whose name sorts first" in said[0]
    rows = output_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(ids) and all(r["status"] == "ok" for r in rows)
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert (success["rows_out"], success["rows_ok"], success["rows_error"], success["rows_repaired"]) == (30, 30, 0, 11)
    assert repair_output_folder(OutputFolder(str(out)), echo=said.append).ids == 0 and "nothing to do" in said[-1]


def test_a_copied_shard_is_repaired_by_the_next_run_and_by_the_command(ray_local, tiny_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        pattern_image(448 + 8 * i, 448).save(images / f"{i}.png")
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(images), "output": str(out), "model": str(tiny_model), "rows_per_shard": 2,
           "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 2}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert CliRunner().invoke(app, ["run", str(path)]).exit_code == 0
    shard = sorted(out.glob("part-*.parquet"))[0]
    shutil.copy(shard, out / "part-0000copy.parquet")
    copied = pq.read_metadata(shard).num_rows  # a shard holds at least rows_per_shard rows (whole blocks)

    again = CliRunner().invoke(app, ["run", str(path)])
    assert again.exit_code == 0, again.output
    assert f"removed {copied} duplicate row(s) from 1 shard(s)" in again.output
    rows = output_rows(out)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert json.loads((out / "_SUCCESS.json").read_text())["rows_repaired"] == copied

    shutil.copy(sorted(out.glob("part-*.parquet"))[-1], out / "part-zzzzcopy.parquet")
    fixed = CliRunner().invoke(app, ["repair", str(out)])
    assert fixed.exit_code == 0, fixed.output
    rows = output_rows(out)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
