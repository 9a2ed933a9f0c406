"""The job's inputs as Ray Data datasets: manifests read by Ray Data's readers, prefixes and globs listed in
parallel (a top level in bounded parts, `pipeline/io/ranges.py`, then by sub-prefix), S3 Inventory reports read as
listings; incremental runs keep only objects absent from the
state (an anti-join). Rows reach the driver only as counts; ids are derived in the workers (`pipeline/io/inputs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.config import JobConfig
from pipeline.errors import InputError
from pipeline.io.inputs import (
    LISTING_SCHEMA, MANIFEST_TEXT_TYPES, SKIPPED_SCHEMA, add_counts, check_manifest_columns, input_kind, is_media,
    manifest_base, manifest_rows, media_rows, skipped_counts,
)
from pipeline.io.output import OutputFolder
from pipeline.io.listing import (inventory_listing, inventory_spec, list_level, list_tree, manifest_sizes,
                                  parquet_rows)
from pipeline.io.ranges import KeyRange, level_mode, list_range, look_up_names, scan_names
from pipeline.io.schema import OUTPUT_SCHEMA, WRITE_FIELDS
from pipeline.io.storage import MANIFEST_EXTENSIONS, extension, get_filesystem
from pipeline.run.shuffles import known_rows, one_table, partitions_for, unchanged

LIST_CPUS = 0.25  # listing a prefix waits on the object store, not the CPU
LIST_KEYS = 100_000  # entries one listing task holds at most (~10 MB as a listing block), whatever the prefix's size
LIST_WORKERS = 32  # listing tasks in flight (Ray runs as many as LIST_CPUS allow)
BROADCAST_ROWS = 2_000_000  # incremental state rows checked in every listing task (~120 MB); beyond: a hash join
FIELD_TYPES = {f.name: f.type for f in [*OUTPUT_SCHEMA, *WRITE_FIELDS]}  # columns older shards may lack
SHARD_COLUMN, POSITION_COLUMN, SIZE_COLUMN = "__shard", "__position", "__size"  # where a row is (`source`)
SAMPLE_KEYS = ("id", "uri", "uris", "question", "questions")  # what ids and expected rows are derived from
SMALL_MANIFEST_BYTES = 1 << 20  # a manifest of up to this much text (~10k rows) is read once, kept in the object store
PARQUET_RATIO = 8  # a Parquet manifest's rows take about this many times its bytes once read


@dataclass
class Listing:
    """A listed prefix or glob as a dataset, and how its top level was listed (for the plan's output)."""

    rows: Any  # ray.data.Dataset of (uri, version), materialized
    mode: str  # ranges | scan | whole (see pipeline/io/ranges.py)
    tasks: int  # tasks that listed the top level
    largest: int  # most entries one of them held
    ranged: bool = True  # False: the store ignored StartAfter, one task listed the whole level

    def note(self) -> str | None:
        """A line for the plan's output when the top level was split, or could not be."""
        if self.mode == "whole" or not self.ranged:
            why = "the store ignores StartAfter" if self.mode == "ranges" else "this store has no ranged listing"
            return f"listing: {why}: its top level was listed by one task"
        if self.tasks > 1:
            return f"listing: the top level in {self.tasks} parts of at most {self.largest} entries ({self.mode})"
        return None


@dataclass
class Inputs:
    """The samples of a run as a dataset, and what its listing counted."""

    samples: Any  # ray.data.Dataset of input rows: id, uri (or uris), question(s), passthrough columns
    kind: str  # files | manifest | inventory
    skipped: dict[str, int] = field(default_factory=dict)  # listed files that are not media, by extension
    objects_listed: int | None = None  # incremental: media objects in the listing
    keys: Any = None  # the samples with only the columns ids come from (a manifest's read pruned to them)
    listing: Listing | None = None  # a listed prefix or glob: how its top level was listed
    taken: Any = None  # incremental: the listing rows (uri, version) the state records, where not the samples' own
    gather: bool = True  # few samples may be gathered in the driver (not when their rows carry the pictures)
    counted: int | None = None  # the samples, where counted before their rows are read (a listing, Parquet footers)

    def state_rows(self) -> Any:
        """Incremental: the (uri, version) rows this run takes, for the state (WebDataset: its shards)."""
        if self.taken is not None:
            return self.taken
        return self.samples.select_columns(["uri", "source_version"]).rename_columns({"source_version": "version"})


def arrow_fs(url: str, options: Any) -> tuple[Any, str]:
    """A pyarrow filesystem over the job's fsspec filesystem (Ray Data's readers take these), and the path."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = get_filesystem(url, options)
    return PyFileSystem(FSSpecHandler(fs)), path


def read_files(files: list[str], options: Any, *, columns: list[str] | None = None, csv_names: list[str] | None = None,
               csv_types: dict[str, Any] | None = None) -> Any:
    """Parquet / JSONL / CSV(.gz) files as one dataset, read in parallel by Ray Data (Parquet columns pruned)."""
    import ray

    fs, _ = arrow_fs(files[0], options)
    paths = [get_filesystem(f, options)[1] for f in files]
    ext = extension(files[0].removesuffix(".gz"))
    if ext == ".parquet":
        return ray.data.read_parquet(paths, filesystem=fs, columns=columns)
    if ext == ".jsonl":
        ds = ray.data.read_json(paths, filesystem=fs)  # Arrow's JSON reader reads JSON Lines
    else:
        ds = ray.data.read_csv(paths, filesystem=fs, read_options=pacsv.ReadOptions(column_names=csv_names),
                               convert_options=pacsv.ConvertOptions(column_types=csv_types or MANIFEST_TEXT_TYPES))
    return ds.select_columns(columns) if columns else ds


def _read_shards(batch: dict[str, Any], options: Any, columns: list[str] | None, source: bool = False,
                 sizes: bool = False) -> pa.Table:
    import pyarrow.parquet as pq

    tables = []
    for url in batch["path"]:
        fs, path = get_filesystem(str(url), options)
        if columns is None:  # every column (files this tool wrote, of one schema)
            tables.append(pq.read_table(path, filesystem=fs))
            continue
        names = pq.read_schema(path, filesystem=fs).names
        table = pq.read_table(path, columns=[c for c in columns if c in names], filesystem=fs)
        for c in columns:  # a column later versions added (`attempt`): null in shards written before
            if c not in names:
                table = table.append_column(c, pa.nulls(table.num_rows, FIELD_TYPES.get(c, pa.string())))
        table = table.select(columns)
        if source:
            n = table.num_rows
            table = table.append_column(SHARD_COLUMN, pa.array([path.rsplit("/", 1)[-1]] * n, pa.string()))
            table = table.append_column(POSITION_COLUMN, pa.array(range(n), pa.int64()))
        if sizes:
            table = table.append_column(SIZE_COLUMN, pa.array([fs.size(path)] * table.num_rows, pa.int64()))
        tables.append(table)
    return pa.concat_tables(tables)


def read_shards(files: list[str], options: Any, columns: list[str], *, source: bool = False, sizes: bool = False) -> Any:
    """Output shards read one task per file with fsspec: every file is read or the read fails (Ray Data's own listing
    silently skips a file an object store reports as empty, which an accounting must never do). `source`: each row
    also says which shard it is in and where (SHARD_COLUMN, POSITION_COLUMN); `sizes`: and the shard's size in bytes
    (SIZE_COLUMN)."""
    import ray

    items = ray.data.from_items([{"path": f} for f in files], override_num_blocks=min(len(files), 1024))
    return items.map_batches(_read_shards, fn_kwargs={"options": options, "columns": columns, "source": source,
                                                       "sizes": sizes},
                             batch_size=1, batch_format="numpy", num_cpus=LIST_CPUS)


def read_own_files(files: list[str], options: Any) -> Any:
    """Parquet files this tool wrote beside the shards (state deltas, the shard index: small, many) read like the
    shards, one task per file, every column: Ray Data's Parquet reader plans and samples files first, seconds of
    fixed cost on every call, which pays off on a user's large manifests only."""
    return read_shards(files, options, None)


def read_once(sizes: dict[str, int | None]) -> bool:
    """Whether manifest files of these sizes are small enough to read once and keep in the object store (up to
    SMALL_MANIFEST_BYTES once read; unknown sizes: no)."""
    if None in sizes.values():
        return False
    read = sum(n * (PARQUET_RATIO if extension(f) == ".parquet" else 1) for f, n in sizes.items())
    return read <= SMALL_MANIFEST_BYTES


def read_manifest(job: JobConfig) -> Inputs:
    """A manifest (one file, a folder or a glob of them): rows validated and ids derived in the workers. A small one
    (`read_once`) is read once into the object store and counted: the plan's passes over it (its columns, its ids,
    the estimate's first rows) would each read it again, seconds of fixed cost each on an object store."""
    sizes = manifest_sizes(job.input, job.storage)
    files = sorted(sizes)
    rows = {"fn_kwargs": {"url": job.input, "base": manifest_base(job.input)}, "batch_format": "pyarrow", "batch_size": None}
    samples = read_files(files, job.storage)
    once = read_once(sizes)
    if once:
        samples = samples.materialize()
    names = samples.schema().names
    check_manifest_columns(job.input, names)
    if once:
        samples = samples.map_batches(manifest_rows, **rows).materialize()
        return Inputs(samples=samples, keys=samples, kind="manifest")
    keys = read_files(files, job.storage, columns=[c for c in SAMPLE_KEYS if c in names])
    counted = parquet_rows(files, job.storage) if extension(files[0]) == ".parquet" else None
    return Inputs(samples=samples.map_batches(manifest_rows, **rows), keys=keys.map_batches(manifest_rows, **rows),
                  kind="manifest", counted=counted)


def _list_prefixes(batch: dict[str, Any], options: Any, pattern: str) -> pa.Table:
    tables = [list_tree(p, options, pattern) for p in batch["prefix"]]
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def listing_limits() -> tuple[int, int]:
    """Entries one listing task holds at most, and listing tasks in flight (INTERNVL_BATCH_LIST_KEYS and
    INTERNVL_BATCH_LIST_WORKERS override them: tests make the cap small, the bench the workers few)."""
    import os

    return (int(os.environ.get("INTERNVL_BATCH_LIST_KEYS", LIST_KEYS)),
            int(os.environ.get("INTERNVL_BATCH_LIST_WORKERS", LIST_WORKERS)))


def _list_ranges(job: JobConfig, cap: int, workers: int) -> tuple[list[Any], list[str], Listing]:
    """An S3 prefix's top level by key ranges: each task lists one range and hands back the rest of it split; the
    driver keeps the blocks' references, the ranges to list and the sub-prefix names."""
    import ray

    task = ray.remote(num_cpus=LIST_CPUS, num_returns=2)(list_range)
    todo, running, blocks, dirs = [KeyRange()], {}, [], set()
    tasks, largest, ranged = 0, 0, True
    while todo or running:
        while todo and len(running) < workers:
            block, meta = task.remote(job.input, job.storage, todo.pop(), cap)
            running[meta] = block
            tasks += 1
        done, _ = ray.wait(list(running), num_returns=1)
        blocks.append(running.pop(done[0]))
        meta = ray.get(done[0])
        dirs.update(meta["dirs"])  # a sub-prefix cut by a range boundary is named by both ranges
        todo += meta["rest"]
        largest, ranged = max(largest, meta["keys"]), ranged and meta["ranged"]
    return blocks, sorted(dirs), Listing(None, "ranges", tasks, largest, ranged)


def _scan_folder(job: JobConfig, cap: int, workers: int) -> tuple[list[Any], list[str], Listing]:
    """A local folder's top level: one task reads its names in blocks, tasks look each block up in parallel."""
    import ray

    scan = ray.remote(num_cpus=LIST_CPUS, num_returns="streaming",
                      _generator_backpressure_num_objects=2 * workers)(scan_names)
    look_up = ray.remote(num_cpus=LIST_CPUS, num_returns=2)(look_up_names)
    running, blocks, dirs, held = {}, [], [], [0]

    def collect(n: int) -> None:
        done, _ = ray.wait(list(running), num_returns=n)
        for ref in done:
            blocks.append(running.pop(ref))
            meta = ray.get(ref)
            dirs.extend(meta["dirs"])
            held[0] = max(held[0], meta["keys"])

    for names in scan.remote(job.input, job.storage, cap):
        if len(running) >= workers:
            collect(1)
        block, meta = look_up.remote(names, job.input, job.storage)
        running[meta] = block
    collect(len(running))
    return blocks, sorted(dirs), Listing(None, "scan", len(blocks), held[0])


def list_objects(job: JobConfig) -> Listing:
    """A prefix or glob listed in parallel: its top level in parts of at most LIST_KEYS entries (by key range on S3,
    by blocks of one streaming read of a local folder, or in one task on other stores), then one task per
    sub-prefix. The listing (uri, version) stays in the object store (materialized: the plan and the run both read
    it); the driver gets the sub-prefix names and the parts' references only."""
    import ray

    cap, workers = listing_limits()
    mode = level_mode(job.input, job.storage)
    try:
        if mode == "ranges":
            blocks, prefixes, listing = _list_ranges(job, cap, workers)
        elif mode == "scan":
            blocks, prefixes, listing = _scan_folder(job, cap, workers)
        else:
            top, names = ray.remote(num_cpus=LIST_CPUS, num_returns=2)(list_level).remote(job.input, job.storage)
            blocks, prefixes, listing = [top], ray.get(names), Listing(None, "whole", 1, 0)
    except InputError as err:  # raised in a task: Ray's wrapper (and a failed argument's) only say where
        while isinstance(getattr(err, "cause", None), InputError):
            err = err.cause
        raise InputError(str(err)) from None
    rows = ray.data.from_arrow_refs(blocks or [ray.put(LISTING_SCHEMA.empty_table())])
    if prefixes:  # sub-prefix names only: the objects under them are listed by the tasks
        sub = ray.data.from_items([{"prefix": p} for p in prefixes], override_num_blocks=min(len(prefixes), 256))
        pattern = job.input if any(ch in job.input for ch in "*?[") else None
        rows = rows.union(sub.map_batches(_list_prefixes, fn_kwargs={"options": job.storage, "pattern": pattern},
                                          batch_size=1, batch_format="numpy", num_cpus=LIST_CPUS))
    listing.rows = rows.materialize()
    return listing


def read_inventory(job: JobConfig) -> Any:
    """An S3 Inventory report's data files (CSV.gz or Parquet) read as a listing of current objects."""
    spec = inventory_spec(job.input, job.storage)
    text = {c: pa.string() for c in spec.columns}
    rows = read_files(spec.files, job.storage, csv_names=spec.columns if spec.file_format == "CSV" else None, csv_types=text)
    protocol = job.input.split("://", 1)[0] if "://" in job.input else "s3"
    return rows.map_batches(inventory_listing, fn_kwargs={"protocol": protocol, "url_encoded": spec.file_format == "CSV"},
                            batch_format="pyarrow", batch_size=None).materialize()


def _not_taken(block: pa.Table, state: Any) -> pa.Table:
    """Ray task body: the rows of a listing block whose (uri, version) the state (a reference to one table, read
    zero-copy from the node's object store) does not hold. The block is the join's build side: probing a 1M-row
    state with a 100k-row block takes ~0.1 s."""
    import ray

    if not block.num_rows:
        return block
    taken = ray.get(state)
    return taken.join(block, keys=["uri", "version"], join_type="right anti").select(block.column_names)


def new_objects(folder: OutputFolder, listing: Any) -> Any:
    """Incremental: listing rows whose (uri, version) no successful run has taken: an anti-join with the state. A
    state of up to BROADCAST_ROWS rows is put in the object store as one table and each listing block is checked
    against it in its own task (no shuffle: Ray Data's hash join starts its aggregator actors, ~7 s of a nightly run
    on 2 CPUs); a larger one goes through the hash join, sized by the listing."""
    import ray

    deltas = folder.state.files()
    legacy = None if deltas else folder.state.legacy()
    if not deltas and legacy is None:
        return listing
    state = (read_own_files(deltas, folder.storage) if deltas else ray.data.from_arrow(legacy)).materialize()
    if state.count() <= BROADCAST_ROWS:
        whole = one_table(state.select_columns(["uri", "version"]), unchanged, LISTING_SCHEMA)
        return listing.map_batches(_not_taken, fn_kwargs={"state": whole}, batch_format="pyarrow", batch_size=None)
    listed = known_rows(listing)
    return listing.join(state, join_type="left_anti", num_partitions=partitions_for(None if listed is None else 2 * listed),
                        on=("uri", "version"))


KEPT = "*"  # count_listing's row for the files kept (no extension is spelled so)


def listing_counts(listing: pa.Table, keep: Callable[[str], bool]) -> pa.Table:
    """Ray task body: one block's skipped files by extension, and its kept files under KEPT."""
    kept = pa.table({"ext": [KEPT], "n": [sum(1 for uri in listing.column("uri").to_pylist() if keep(uri))]},
                    schema=SKIPPED_SCHEMA)
    return pa.concat_tables([skipped_counts(listing, keep), kept])


def count_listing(listing: Any, keep: Callable[[str], bool] = is_media) -> tuple[dict[str, int], int]:
    """Listed files that are not inputs (`keep`: media) by extension, and the inputs: one pass, one small table per
    block, summed here."""
    parts = listing.map_batches(listing_counts, fn_kwargs={"keep": keep}, batch_format="pyarrow",
                                batch_size=None).to_arrow_refs()
    import ray

    tables = [t for t in ray.get(parts) if t.num_rows]
    counts = add_counts({}, pa.concat_tables(tables)) if tables else {}
    return counts, counts.pop(KEPT, 0)


def only_manifests(job: JobConfig, media: int, skipped: dict[str, int]) -> bool:
    """`input_format: auto` on a prefix whose listing holds manifest files and no media: a folder of manifests,
    read as such (an incremental run needs media objects, so it is told there are none)."""
    if job.input_format != "auto" or job.incremental or not skipped or not set(skipped) <= MANIFEST_EXTENSIONS:
        return False
    return media == 0


def read_inputs(job: JobConfig, folder: OutputFolder) -> Inputs:
    """The job's samples as a dataset (incremental: only new or changed objects, materialized)."""
    kind = input_kind(job.input, job.input_format)
    if kind == "manifest":
        return read_manifest(job)
    listed_by = list_objects(job) if kind == "files" else None
    listing = listed_by.rows if listed_by else read_inventory(job)
    skipped, listed = count_listing(listing)
    media = {"batch_format": "pyarrow", "batch_size": None}
    if kind == "files" and only_manifests(job, listed, skipped):
        return read_manifest(job)
    if not job.incremental:
        samples = listing.map_batches(media_rows, **media)
        return Inputs(samples=samples, keys=samples, kind=kind, skipped=skipped, listing=listed_by,
                      counted=listed)
    samples = new_objects(folder, listing).map_batches(media_rows, fn_kwargs={"versioned": True}, **media)
    samples = samples.materialize()
    return Inputs(samples=samples, keys=samples, kind=kind, skipped=skipped, objects_listed=listed, listing=listed_by)

