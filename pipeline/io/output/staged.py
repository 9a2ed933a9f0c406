"""Rows an update has made, kept beside the output until they replace their old rows (`--update`).

A run that re-runs rows whose settings changed writes every row it makes to `<output>/_update/` (named from their
ids), not to the output: while they wait there, the output still holds each id once, with its old row. The run then
places them shard by shard (`run/update.py`): a row whose id the output holds replaces it inside that shard (the
shard rewritten whole under the same name); a row the output lacks becomes part of a new shard named from its ids.
Both are the same write when repeated, so a run that dies while placing them is finished by the next one, which
places what is still waiting before it plans, then clears the folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.io.output.layout import UPDATE_DIR, shard_name

if TYPE_CHECKING:
    from pipeline.io.output.folder import OutputFolder

INPUT_COLUMNS_KEY = b"internvl_batch.input_columns"  # staged files say which of their columns came from the input


class StagedRows:
    """The `_update/` folder of one output."""

    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder

    @property
    def url(self) -> str:
        return self.folder.child(UPDATE_DIR)

    def files(self) -> list[str]:
        """The staged files, as full URLs (empty: nothing waits)."""
        return [u for u in self.folder.find(self.url) if u.endswith(".parquet")]

    def write(self, rows: pa.Table) -> str:
        """Stage rows an update made; the file's name (from their ids)."""
        name = shard_name(rows.column("id").to_pylist())
        self.folder.write_table(f"{self.url}/{name}", rows)
        return name

    def clear(self) -> None:
        """Delete the folder once every staged row is in place."""
        self.folder.remove(self.url, recursive=True)
