"""What a run did (`RunSummary`, written as _SUCCESS.json) and how busy its model replicas were."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunTally:
    """What this run's shards add up to, folded in as each shard's stats row arrives: the driver keeps totals
    (and one record per replica), never one record per shard or per model batch.

    A replica's busy time (seconds with some batch in flight: batches in flight together, as on vLLM, count once)
    is kept by the replica itself (`busy` in each batch's timing, cumulative); here it is the largest value seen.
    Timing without it (older shards) counts each batch's own duration."""

    shards: int = 0
    rows: int = 0
    tiles: int = 0
    generated_tokens: int = 0
    deferred: int = 0  # error rows set aside for a retry pass
    per_replica: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, rows: int, tiles: int, generated_tokens: int, batches: list[dict[str, Any]], *, shard: bool = True,
            deferred: int = 0) -> None:
        self.shards += int(shard)
        self.rows += rows
        self.deferred += deferred
        self.tiles += tiles
        self.generated_tokens += generated_tokens
        for b in {(b["replica"], b["start"]): b for b in batches}.values():  # a batch's timing once
            r = self.per_replica.setdefault(b["replica"], {"batches": 0, "busy_sum": 0.0, "busy": 0.0, "ready": b["ready"],
                                                           "end": b["end"], "samples": 0, "tokens": 0})
            r["batches"] += 1
            r["busy_sum"] += b["end"] - b["start"]
            r["busy"] = max(r["busy"], b.get("busy") or 0.0)
            r["samples"] += b.get("samples") or 0
            r["tokens"] += b.get("tokens") or 0
            if b.get("cache_queries") is not None:  # vLLM's prefix cache, cumulative per replica like `busy`
                r["cache_queries"] = max(r.get("cache_queries", 0), b["cache_queries"])
                r["cache_hits"] = max(r.get("cache_hits", 0), b.get("cache_hits") or 0)
            r["ready"], r["end"] = min(r["ready"], b["ready"]), max(r["end"], b["end"])

    def replica_usage(self) -> tuple[float | None, dict[str, dict[str, float]]]:
        """Per replica: batches, seconds busy, seconds from ready to its last batch's end, samples through the model
        and generated tokens, and its rates while busy (`images_per_s`: an image set or a video counts once;
        `tokens_per_s`); on vLLM also `prefix_cache_hit_rate`, the share of prompt tokens its prefix cache served
        (prompt tokens looked up: `prefix_cache_queries`); and the busy fraction of all replicas together (None without batches). Each replica's
        times come from its own clock."""
        usage = {}
        for name, r in sorted(self.per_replica.items()):
            busy = r["busy"] or r["busy_sum"]
            usage[name] = {"batches": int(r["batches"]), "busy_s": round(busy, 3), "span_s": round(r["end"] - r["ready"], 3),
                           "samples": int(r["samples"]), "generated_tokens": int(r["tokens"]),
                           "images_per_s": round(r["samples"] / busy, 3) if busy > 0 else 0.0,
                           "tokens_per_s": round(r["tokens"] / busy, 3) if busy > 0 else 0.0}
            if "cache_queries" in r:
                usage[name].update(prefix_cache_queries=int(r["cache_queries"]), prefix_cache_hit_rate=round(
                    r["cache_hits"] / r["cache_queries"], 4) if r["cache_queries"] else 0.0)
        span = sum(u["span_s"] for u in usage.values())
        return (round(sum(u["busy_s"] for u in usage.values()) / span, 4) if span > 0 else None), usage


@dataclass
class RunSummary:
    """What a run did: counts, errors by type, throughput, and the fingerprint of its config."""

    rows_in: int
    rows_out: int
    rows_ok: int
    rows_error: int
    errors_by_type: dict[str, int]
    tiles: int
    input_tokens: int
    generated_tokens: int
    wall_s: float
    fingerprint: str
    task: str
    model: str
    output: str
    files: int
    skipped_inputs: dict[str, int] = field(default_factory=dict)
    rows_this_run: int = 0  # rows processed by this run (the rest were already in the output: resumed)
    tiles_this_run: int = 0
    tokens_this_run: int = 0
    score_histograms: dict[str, list[int]] = field(default_factory=dict)  # per criterion, 10 bins over [0, 1]
    rows_passed: int | None = None
    objects_taken: int | None = None  # incremental runs: new or changed objects this run took
    # Fraction of the model replicas' time (from loaded to their last batch) spent running batches, not waiting
    # for input: near 1 means the CPU stage keeps up; per replica: batches, busy_s, span_s, samples,
    # generated_tokens and the rates while busy, images_per_s and tokens_per_s (compare engines on your data); on
    # vLLM, prefix_cache_hit_rate (of prefix_cache_queries prompt tokens).
    model_busy_fraction: float | None = None
    replicas: dict[str, dict[str, float]] = field(default_factory=dict)
    # Retries: rows this run set aside to try again (each is counted again by the pass that retried it), and the
    # output's rows by the attempt that wrote them ("1": first tries).
    rows_retried: int = 0
    rows_repaired: int = 0  # duplicate rows this run removed from the output (one row kept per id)
    rows_updated: int = 0  # --update: rows of other settings this run replaced in place
    rows_update_failed: int = 0  # --update: rows whose new row failed, so their old row stays
    rows_by_attempt: dict[str, int] = field(default_factory=dict)
    # dedup: exact (None otherwise): the job's samples whose media and questions another sample has too, the rows
    # this run copied from their representatives, and the model time that saved (copied samples x this run's model
    # busy seconds per computed sample; None when this run computed none).
    duplicates_found: int | None = None
    rows_copied: int | None = None
    model_s_saved: float | None = None
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def samples_per_s(self) -> float:
        """Rows processed by this run per second of its wall time."""
        return self.rows_this_run / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data.update(
            samples_per_s=round(self.samples_per_s, 3),
            tokens_per_s=round(self.tokens_this_run / self.wall_s, 3) if self.wall_s > 0 else 0.0,
            tiles_per_s=round(self.tiles_this_run / self.wall_s, 3) if self.wall_s > 0 else 0.0,
        )
        return json.dumps(data, indent=2, sort_keys=True)
