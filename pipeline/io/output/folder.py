"""The output folder: the one object that owns an output URL's state, and the only code that spells its file names.

```
<output>/
  part-<h>.parquet        shards, named from the sha256 of their ids, each written whole or not at all
  _JOB.json               which configuration this output belongs to (written before the first shard)
  _SUCCESS.json           the last run's summary, written last: its presence means every shard is in place
  _LOCK                   the lease of the run writing here (lease.py)
  _retry/attempt-<a>/     rows waiting for retry attempt a (pending.py)
  _state/<run>/           incremental: (uri, version) of every object a successful run took (state.py)
  _runs/<run>.json        incremental: what each successful run took
  _index/<run>/           incremental: the shards each successful run committed, sizes and totals (state.py)
  _settings/<id>.json     the full settings behind each `settings` id the rows carry
  _update/                rows an update (`--update`) has made, waiting to replace their old rows (staged.py)
<output_passed>/
  part-<h>.passed.parquet the passing rows of shard part-<h>.parquet, written before it
```

Every write goes through `_write`, which checks the run's lease first (the fence) when the folder carries one
(`fenced`): a run that lost its lease writes nothing more, in whichever worker it tries. The object is small and
picklable, so the write stage and retry tasks get the same folder the driver planned with.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.output import lease
from pipeline.io.output.layout import (JOB_FILE, LOCK_FILE, OWN_DIRS, OWN_FILES, PASSED_SUFFIX, SUCCESS_FILE, basename,
                                      passed_name, settings_file, shard_name)
from pipeline.io.output.pending import PendingRows
from pipeline.io.output.staged import StagedRows
from pipeline.io.output.state import IncrementalState
from pipeline.io.storage import full_url, get_filesystem, is_local

@dataclass(frozen=True)
class OutputFolder:
    """One output URL (and its passed subset) with everything under it; see the module docstring."""

    url: str
    storage: Mapping[str, Any] | None = None
    passed_url: str | None = None
    lease_ref: lease.LeaseRef | None = None

    # --- where things are ------------------------------------------------------------------------------------

    def _fs(self, url: str | None = None) -> tuple[Any, str]:
        fs, path = get_filesystem(url or self.url, self.storage)
        return fs, path.rstrip("/")

    def child(self, *parts: str) -> str:
        """The URL of a file or folder under the output."""
        return "/".join([self.url.rstrip("/"), *parts])

    @property
    def lock_url(self) -> str:
        return self.child(LOCK_FILE)

    # --- the lease and the fence -----------------------------------------------------------------------------

    def take_lease(self, ttl_s: float, *, kind: str = "run") -> lease.Held:
        """Take this output's lease (LockedError naming the holder if another run has it)."""
        self._fs()[0].makedirs(self._fs()[1], exist_ok=True)
        return lease.acquire(self.lock_url, ttl_s, self.storage, kind=kind)

    def fenced(self, held: lease.Held) -> OutputFolder:
        """This folder for a run holding `held`: every write checks the lease first."""
        return replace(self, lease_ref=held.ref)

    def check_lease(self) -> None:
        """The fence (LeaseLostError if this run no longer holds the lease); nothing to check without a lease."""
        if self.lease_ref is not None:
            lease.check(self.lease_ref)

    def _write(self, url: str, write: Callable[[Any], None], *, binary: bool = True) -> None:
        """Write one file whole: the fence first; on disks a hidden temporary file renamed into place (object
        stores publish an object only when its upload completes)."""
        self.check_lease()
        fs, path = get_filesystem(url, self.storage)
        folder, name = path.rsplit("/", 1)
        fs.makedirs(folder, exist_ok=True)
        mode = "wb" if binary else "w"
        if is_local(url):
            tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
            with fs.open(tmp, mode) as f:
                write(f)
            fs.mv(tmp, path)
        else:
            with fs.open(path, mode) as f:
                write(f)

    def write_table(self, url: str, table: pa.Table) -> None:
        """A Parquet file under this output (or its passed subset), fenced and whole."""
        self._write(url, lambda f: pq.write_table(table, f))

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        """A JSON marker or record under this output, fenced and whole."""
        self._write(self.child(name), lambda f: f.write(json.dumps(dict(data), indent=2, sort_keys=True)), binary=False)

    def remove(self, url: str, *, recursive: bool = False) -> bool:
        """Delete a file (or folder) of this output, fenced; False if it was not there."""
        self.check_lease()
        fs, path = get_filesystem(url, self.storage)
        if not fs.exists(path):
            return False
        fs.rm(path, recursive=recursive)
        return True

    # --- reading -----------------------------------------------------------------------------------------------

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON marker under the output, or None."""
        fs, root = self._fs()
        try:
            with fs.open(f"{root}/{name}", "r") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def exists(self, url: str) -> bool:
        fs, path = get_filesystem(url, self.storage)
        return fs.exists(path)

    def find(self, url: str) -> list[str]:
        """Every file under a folder of this output (fresh: no listing cached by this process), as full URLs."""
        fs, path = get_filesystem(url, self.storage)
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        return [full_url(fs, p) for p in sorted(fs.find(path)) if not basename(p).startswith(".")]

    def _own(self, root: str, path: str) -> bool:
        rel = path[len(root) + 1:]
        top = rel.split("/", 1)[0]
        return path.endswith(".parquet") or top in OWN_FILES or top in OWN_DIRS

    def results(self, url: str | None = None) -> list[str]:
        """Files this project wrote under the output (or `url`: its passed subset): shards, markers, state."""
        fs, root = self._fs(url)
        if not fs.exists(root):
            return []
        return sorted(p for p in fs.find(root) if self._own(root, p))

    def shards(self, url: str | None = None, *, detail: bool = False) -> Any:
        """The Parquet shards (full URLs) directly meant as output: not hidden, not in `_`-folders. `detail`:
        {url: size} instead."""
        fs, root = self._fs(url)
        fs.invalidate_cache(root)
        if not fs.exists(root):
            return {} if detail else []
        found = fs.find(root, detail=True)
        keep = {full_url(fs, p): int(info.get("size") or 0) for p, info in sorted(found.items())
                if p.endswith(".parquet") and not any(part.startswith((".", "_")) for part in p[len(root) + 1:].split("/"))}
        return keep if detail else list(keep)

    def shard_url(self, name: str) -> str:
        return self.child(name)

    # --- markers -----------------------------------------------------------------------------------------------

    def job_record(self) -> dict[str, Any] | None:
        """What `_JOB.json` says this output belongs to (None: no run started here)."""
        return self.read_json(JOB_FILE)

    def success(self) -> dict[str, Any] | None:
        """The last finished run's summary (None: no run finished since the output last changed)."""
        return self.read_json(SUCCESS_FILE)

    def begin(self, record: Mapping[str, Any]) -> None:
        """Record which configuration writes here, and that the output is changing (no `_SUCCESS.json` until the
        run that changes it finishes)."""
        self.write_json(JOB_FILE, record)
        self.remove(self.child(SUCCESS_FILE))

    def record_settings(self, settings_id: str, values: Mapping[str, Any]) -> None:
        """Keep the full settings behind a `settings` id (once: the same id always names the same settings)."""
        if self.read_json(settings_file(settings_id)) is None:
            self.write_json(settings_file(settings_id), values)

    def settings(self, settings_id: str) -> dict[str, Any] | None:
        """The full settings behind a row's `settings` id."""
        return self.read_json(settings_file(settings_id))

    def finish(self, summary_json: str) -> None:
        """Write `_SUCCESS.json` last (fenced: a run that lost its lease does not claim the output is complete)."""
        self._write(self.child(SUCCESS_FILE), lambda f: f.write(summary_json), binary=False)

    def clear(self, url: str | None = None) -> int:
        """Delete every result file under the output (or `url`: its passed subset), for overwrite; how many."""
        fs, _ = self._fs(url)
        files = [p for p in self.results(url) if basename(p) != LOCK_FILE]
        self.check_lease()
        for p in files:
            fs.rm(p)
        return len(files)

    # --- shards and the passed subset -------------------------------------------------------------------------

    def write_shard(self, table: pa.Table, passed: pa.Table | None = None, *, name: str | None = None) -> str:
        """Write output rows as one shard (named from its ids unless `name`); its passing rows first, as the passed
        shard of the same name (a passed shard without its output shard is removed on resume). The shard's name."""
        name = name or shard_name(table.column("id").to_pylist())
        if passed is not None and passed.num_rows and self.passed_url:
            self.write_table(f"{self.passed_url.rstrip('/')}/{passed_name(name)}", passed)
        self.write_table(self.shard_url(name), table)
        return name

    def read_shard(self, name: str) -> pa.Table:
        fs, root = self._fs()
        return pq.read_table(f"{root}/{name}", filesystem=fs)

    def passed_orphans(self) -> list[str]:
        """Passed shards whose output shard is missing (a run died between the two writes)."""
        if not self.passed_url:
            return []
        names = {basename(s) for s in self.shards()}
        return [f for f in self.shards(self.passed_url)
                if f.endswith(PASSED_SUFFIX) and basename(f).removesuffix(PASSED_SUFFIX) + ".parquet" not in names]

    def remove_passed_orphans(self) -> int:
        """Delete the orphan passed shards before a resumed run writes their rows again; how many."""
        found = self.passed_orphans()
        for f in found:
            self.remove(f)
        return len(found)

    def passed_rows(self) -> int:
        """Rows in the passed subset, from the shards' footers."""
        fs, _ = self._fs(self.passed_url)
        return sum(pq.ParquetFile(get_filesystem(f, self.storage)[1], filesystem=fs).metadata.num_rows
                   for f in self.shards(self.passed_url))

    def check_passed(self, expected: int) -> str | None:
        """What is wrong with the passed subset, if anything: an orphan shard, or a row count other than `expected`
        (the output's passed rows)."""
        stray = self.passed_orphans()
        if stray:
            return f"{len(stray)} passed shard(s) with no output shard (e.g. {basename(stray[0])})"
        found = self.passed_rows()
        if found != expected:
            return f"{found} rows in {self.passed_url}, but {expected} passed rows in the output"
        return None

    def replace_shard(self, old: str, kept: pa.Table, passed: pa.Table | None = None) -> str | None:
        """Rewrite shard `old` (a name) as `kept` (a subset of its rows, or its rows updated), crash-safely: the new
        shard (named from its ids; its passed rows first: `passed`, else the old passed rows of the ids kept) is
        written before the old one and its passed shard are deleted; under the same name it replaces the old one
        whole. A rewrite cut short is completed by repeating it. The new shard's name (None: no row kept)."""
        name = shard_name(kept.column("id").to_pylist()) if kept.num_rows else None
        old_passed = f"{self.passed_url.rstrip('/')}/{passed_name(old)}" if self.passed_url else None
        if name:
            if passed is None and old_passed and self.exists(old_passed):
                fs, path = get_filesystem(old_passed, self.storage)
                passed = pq.read_table(path, filesystem=fs)
                passed = passed.filter(pc.is_in(passed.column("id"), value_set=kept.column("id")))
            if self.passed_url and passed is not None and passed.num_rows:
                self.write_table(f"{self.passed_url.rstrip('/')}/{passed_name(name)}", passed)
            elif name == old and old_passed:  # the same shard with no passing row left
                self.remove(old_passed)
            self.write_table(self.shard_url(name), kept)
        if name != old:
            self.remove(self.shard_url(old))
            if old_passed:
                self.remove(old_passed)
        return name

    # --- what lives beside the shards ----------------------------------------------------------------------------

    @property
    def pending(self) -> PendingRows:
        """Rows waiting for a retry (`_retry/`)."""
        return PendingRows(self)

    @property
    def state(self) -> IncrementalState:
        """Incremental runs' state (`_state/`, `_runs/`)."""
        return IncrementalState(self)

    @property
    def staged(self) -> StagedRows:
        """Rows an update made, waiting to replace their old rows (`_update/`)."""
        return StagedRows(self)
