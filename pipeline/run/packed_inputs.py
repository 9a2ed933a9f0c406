"""Inputs whose media are packed inside other files, read where they live, as Ray Data datasets: WebDataset tar
shards (indexed in Ray tasks, one shard a task) and Parquet manifests carrying the pictures themselves
(`image_column`); `read_job_inputs` is where the plan reads any job's inputs (the others: `sources.py`). The pure
work is in `pipeline/io/webdataset.py` and `pipeline/io/image_column.py`; the driver sees shard and file names only
(docs/inputs.md).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import InputError
from pipeline.io.image_column import check_image_column, image_rows, read_key_rows
from pipeline.io.inputs import input_kind
from pipeline.io.listing import manifest_files, parquet_rows
from pipeline.io.output import OutputFolder
from pipeline.io.storage import extension
from pipeline.io.webdataset import expand_braces, has_braces, index_shards, is_shard, shard_listing, stat_shards
from pipeline.run.sources import LIST_CPUS, Inputs, count_listing, list_objects, new_objects, read_files, read_inputs

# Most blocks the shard listing is cut into before indexing (one task a block): enough to keep a large cluster busy,
# few enough that Ray Data's per-block bookkeeping in the driver stays small.
INDEX_BLOCKS = 4096


def list_shards(job: JobConfig) -> tuple[Any, dict[str, int]]:
    """The shards (uri, version), materialized, and the listed files that are not shards: a brace pattern's names
    are looked up in tasks (a missing one keeps no version: its index is a not_found row); a prefix, glob or single
    .tar is listed as media files are."""
    import ray

    if has_braces(job.input):
        urls = expand_braces(job.input)
        items = ray.data.from_items([{"uri": u} for u in urls], override_num_blocks=min(len(urls), 256))
        return items.map_batches(stat_shards, fn_kwargs={"options": job.storage}, batch_format="pyarrow",
                                 batch_size=64, num_cpus=LIST_CPUS).materialize(), {}
    listing = list_objects(job).rows
    skipped, _ = count_listing(listing, keep=is_shard)
    return listing.map_batches(shard_listing, batch_format="pyarrow", batch_size=None).materialize(), skipped


def read_webdataset(job: JobConfig, folder: OutputFolder) -> Inputs:
    """Every sample of the shards (incremental: of the shards new or changed since the last successful run) as input
    rows; the index is materialized (the plan, the run and its retries read it) and holds offsets and the small
    text members, never a picture."""
    shards, skipped = list_shards(job)
    listed, taken = None, None
    if job.incremental:
        listed = shards.count()
        shards = taken = new_objects(folder, shards).materialize()
    # a task indexes the shards of one block: blocks of one shard (up to INDEX_BLOCKS of them) spread the work
    shards = shards.repartition(max(1, min(shards.count(), INDEX_BLOCKS)))
    index = shards.map_batches(index_shards, fn_kwargs={"options": job.storage, "versioned": job.incremental},
                               batch_format="pyarrow", batch_size=1, num_cpus=LIST_CPUS).materialize()
    return Inputs(samples=index, keys=index.select_columns(["id", "uri"]), kind="webdataset", skipped=skipped,
                  objects_listed=listed, taken=taken)


def _key_rows(batch: dict[str, Any], column: str, options: Any) -> Any:
    import pyarrow as pa

    return pa.concat_tables([read_key_rows(str(url), column, options) for url in batch["path"]], promote_options="default")


def read_image_manifest(job: JobConfig) -> Inputs:
    """A Parquet manifest with the pictures in `image_column`: rows (bytes included) streamed by Ray Data's Parquet
    reader to the CPU stage; the id pass one task per file, reading the pictures' paths only where they have them
    (pyarrow prunes to a nested leaf such as `image.path`; Ray Data's reader selects whole top-level columns only)."""
    import ray

    files = manifest_files(job.input, job.storage)
    if extension(files[0]) != ".parquet":
        raise InputError(f"image_column: the manifest must be Parquet (found {extension(files[0])} files)")
    column = job.image_column
    samples = read_files(files, job.storage)
    check_image_column(job.input, samples.schema().base_schema, column)
    rows = samples.map_batches(image_rows, fn_kwargs={"url": job.input, "column": column}, batch_format="pyarrow",
                               batch_size=None)
    items = ray.data.from_items([{"path": f} for f in files], override_num_blocks=min(len(files), 1024))
    keys = items.map_batches(_key_rows, fn_kwargs={"column": column, "options": job.storage}, batch_size=1,
                             batch_format="numpy", num_cpus=LIST_CPUS)
    return Inputs(samples=rows, keys=keys, kind="manifest", gather=False, counted=parquet_rows(files, job.storage))


def read_job_inputs(job: JobConfig, folder: OutputFolder) -> Inputs:
    """The job's samples as a dataset: shards and Parquet pictures read here, every other input by
    `sources.read_inputs`."""
    if job.image_column:  # a manifest, or under `auto` a folder or glob of them (preflight refused anything else)
        return read_image_manifest(job)
    if input_kind(job.input, job.input_format) == "webdataset":
        return read_webdataset(job, folder)
    return read_inputs(job, folder)
