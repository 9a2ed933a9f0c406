"""Retries with degraded settings: the `retry` section, and which overrides each attempt runs with."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from pipeline.config.sections import _Section
from pipeline.errors import ErrorType

# Job keys a retry rung may lower: how much of a sample is read and how long its answer may be (never what is asked
# or which model answers).
RUNG_KEYS = {
    "tiling": ("max_tiles", "min_tiles", "thumbnail", "max_tokens_per_sample", "mode", "max_image_pixels"),
    "video": ("num_frames", "tiles_per_frame", "start_s", "end_s", "max_duration_s", "max_frames", "max_pixels"),
    "generation": ("max_new_tokens",),
    "decode": ("timeout_s", "attempts", "isolate"),
    "compute": ("batch_size", "max_batch_tokens"),
}
DEFAULT_RETRY_ERRORS = ("read_error", "too_large", "timeout", "crashed", "model_error", "too_long")


class RetryConfig(_Section):
    """Samples that fail with one of `errors` are tried again in the same run with each rung of `ladder` in turn.
    Not part of the fingerprint: a rung's settings are recorded per row (`attempt`, `degraded`)."""

    errors: list[str] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ERRORS),
        description="Error types worth retrying (see the error table); default: "
                    f"{', '.join(DEFAULT_RETRY_ERRORS)}.")
    ladder: list[dict[str, Any]] = Field(
        default_factory=list, max_length=8,
        description="Partial overrides tried in order, e.g. {tiling.max_tiles: 6, video.num_frames: 8}; `{}` retries "
                    "once with the job's own settings. Keys: "
                    + "; ".join(f"{s}.{{{','.join(k)}}}" for s, k in RUNG_KEYS.items()) + ".")

    @field_validator("errors")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        known = [e.value for e in ErrorType]
        bad = [v for v in value if v not in known]
        if bad:
            raise ValueError(f"unknown error type(s) {bad}; known: {', '.join(known)}")
        return value

    @field_validator("ladder")
    @classmethod
    def _rungs(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for k, rung in enumerate(value):
            for key in rung:
                section, _, name = str(key).partition(".")
                if name not in RUNG_KEYS.get(section, ()):
                    allowed = ", ".join(f"{s}.{n}" for s, names in RUNG_KEYS.items() for n in names)
                    raise ValueError(f"ladder[{k}]: {key!r} cannot be changed by a retry; allowed: {allowed}")
        return value


def rung_overrides(retry: RetryConfig | None, attempt: int) -> dict[str, Any]:
    """The overrides attempt `attempt` runs with: none for the first, then each rung of the ladder in turn (an
    attempt past the ladder, from `--retry-errors`, keeps its last rung)."""
    ladder = retry.ladder if retry else []
    if attempt <= 1 or not ladder:
        return {}
    return dict(ladder[min(attempt - 1, len(ladder)) - 1])


def max_attempt(retry: RetryConfig | None) -> int:
    """The last attempt a run makes at a sample on its own: its first try and one per rung."""
    return 1 + len(retry.ladder if retry else [])
