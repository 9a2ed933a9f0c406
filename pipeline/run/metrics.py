"""Prometheus counters exported through Ray's metrics agent: rows by status and error type, tiles, tokens."""

from __future__ import annotations

from typing import Any

from pipeline.stages.write import ShardStats

_METRICS: dict[str, Any] = {}


def record_metrics(shard: ShardStats) -> None:
    """Count one written shard (called in the write task, where Ray's metrics agent picks it up)."""
    from ray.util.metrics import Counter

    if not _METRICS:
        _METRICS["rows"] = Counter("internvl_batch_rows", "Output rows written.", tag_keys=("status", "error_type"))
        _METRICS["tiles"] = Counter("internvl_batch_tiles", "Image tiles fed to the model.")
        _METRICS["tokens"] = Counter("internvl_batch_generated_tokens", "Tokens generated.")
    counts = {("ok", ""): shard.ok, **{("error", kind): n for kind, n in shard.errors.items()}}
    for (status, kind), n in counts.items():
        if n:
            _METRICS["rows"].inc(n, tags={"status": status, "error_type": kind})
    if shard.tiles:
        _METRICS["tiles"].inc(shard.tiles)
    if shard.generated_tokens:
        _METRICS["tokens"].inc(shard.generated_tokens)
