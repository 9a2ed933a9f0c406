"""The job file: a typed, validated, frozen description of one run, and its fingerprint.

Knows nothing of Ray or torch. Every field has a description; unknown keys are rejected with the valid ones listed.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from pipeline.credentials import is_credential_key
from pipeline.errors import JobError, SchemaError
from pipeline.jobfile import label_words, load_yaml

DEFAULT_PROMPTS = {
    "caption": "Describe the image in detail.",
    "vqa": "{question}",
    "score": "",
}



class _Section(BaseModel):
    # a dump (model_dump) is a valid job mapping again: aliased keys (`schema`) are written as a job file spells them
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)


class TilingConfig(_Section):
    max_tiles: int = Field(12, ge=1, le=64, description="Largest number of 448 px grid tiles per image.")
    min_tiles: int = Field(1, ge=1, le=64, description="Smallest number of grid tiles per image.")
    thumbnail: bool = Field(True, description="Append a 448 px thumbnail of the whole image when there is more than one tile.")
    exif_transpose: bool = Field(False, description="Rotate images by their EXIF orientation first (the cards do not).")
    max_image_pixels: int = Field(178_956_970, ge=1, description="Larger images become too_large error rows, checked before decoding.")
    mode: Literal["exact", "fast"] = Field(
        "exact", description="exact: tiles bit-identical to the cards; fast: JPEGs decoded at a reduced scale (DCT "
                             "scaling) when the tile grid is much smaller than the image (fidelity and speed: bench/fast_mode.py).")
    max_tokens_per_sample: int | None = Field(
        None, ge=256, description="Visual-token budget per sample: each sample gets the largest tile (or frame) count "
                                  "whose visual tokens (256 per tile) fit, recorded in num_tiles.")

    @model_validator(mode="after")
    def _bounds(self) -> TilingConfig:
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles ({self.min_tiles}) must not exceed max_tiles ({self.max_tiles})")
        return self


class VideoConfig(_Section):
    num_frames: int = Field(8, ge=1, le=512, description="Frames sampled per video: the middle frame of each of this many equal segments.")
    start_s: float | None = Field(None, ge=0, description="Sample only from this time on (seconds).")
    end_s: float | None = Field(None, gt=0, description="Sample only up to this time (seconds); past the end means the end.")
    tiles_per_frame: int = Field(1, ge=1, le=12, description="Tiles per frame (1: the cards' single 448 px resize).")
    max_duration_s: float = Field(3600.0, gt=0, description="Longer videos become too_large error rows.")
    max_frames: int = Field(1_000_000, ge=1, description="Videos with more frames become too_large error rows.")
    max_pixels: int = Field(3840 * 2160, ge=1, description="Videos with larger frames become too_large error rows.")

    @model_validator(mode="after")
    def _bound(self) -> VideoConfig:
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        return self


class ScaleConfig(_Section):
    min: int = Field(0, ge=0, le=99, description="Lowest rating (a digit answer).")
    max: int = Field(9, ge=1, le=100, description="Highest rating.")

    @model_validator(mode="after")
    def _order(self) -> ScaleConfig:
        if self.max <= self.min:
            raise ValueError(f"max ({self.max}) must be above min ({self.min})")
        return self

    @property
    def labels(self) -> list[str]:
        return [str(v) for v in range(self.min, self.max + 1)]


class FilterRule(_Section):
    min_score: float | None = Field(None, ge=0, le=1, description="Keep rows whose score is at least this.")
    max_score: float | None = Field(None, ge=0, le=1, description="Keep rows whose score is at most this.")
    min_rating: float | None = Field(None, description="Keep rows whose rating is at least this (scales only).")
    max_rating: float | None = Field(None, description="Keep rows whose rating is at most this (scales only).")


class Criterion(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$", description="Column suffix: score_<name>, label_<name>...")
    prompt: str = Field(min_length=1, description="The question asked of the sample.")
    labels: list[str] | None = Field(None, min_length=2, description="Answers scored (default yes/no); the score is the first's probability. Unquoted yes/no/on/off/true/false and numbers are read as the words typed.")
    scale: ScaleConfig | None = Field(None, description="Rate on a digit scale instead: rating = expected value over the digits.")
    filter: FilterRule | None = Field(None, description="What passes on this criterion.")

    @field_validator("labels", mode="before")
    @classmethod
    def _label_words(cls, value: Any) -> Any:
        return label_words(value)

    @model_validator(mode="after")
    def _labels_or_scale(self) -> Criterion:
        if self.labels is not None and self.scale is not None:
            raise ValueError("give labels or scale, not both")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        if self.filter is not None and self.scale is None and (self.filter.min_rating is not None or self.filter.max_rating is not None):
            raise ValueError("filter.min_rating / max_rating need a scale")
        return self

    @property
    def answers(self) -> list[str]:
        """The label strings whose probabilities are compared."""
        return self.scale.labels if self.scale else (self.labels or ["yes", "no"])


SCHEMA_HELP = ("a JSON Schema: an inline mapping, a JSON string, or the path (relative: from the job file's folder) or "
               "URL of a .json file")


class Question(_Section):
    question: str = Field(min_length=1, description="The question.")
    schema_value: dict[str, Any] | str | None = Field(
        None, alias="schema", description=f"This question's answer schema ({SCHEMA_HELP}); default: the job's `schema`.")


class GenerationConfig(_Section):
    max_new_tokens: int = Field(128, ge=1, le=32768, description="Most tokens generated per response.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (used when do_sample is true).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (used when do_sample is true).")
    seed: int = Field(0, description="Seed for sampling: each output row samples from its own generator, seeded from "
                                     "this and the row's id, whatever batch it lands in.")


class VLLMConfig(_Section):
    """vLLM engine options (compute.engine vllm, or auto on GPUs with vLLM installed); vLLM's own defaults apply
    where a field is left unset. Not part of the fingerprint: both engines give the same greedy tokens."""

    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of the replica's GPU memory vLLM may take for weights, activations "
                                      "and KV cache (vLLM's default 0.92; lower it when sharing a GPU).")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences in one vLLM scheduler step (vLLM's default).")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + answer in tokens (default: the checkpoint's limit); a 13-tile "
                                "image alone is 3,328 image tokens.")
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse the KV blocks of a shared prefix (several questions on one image); vLLM's default is on.")
    enable_chunked_prefill: bool | None = Field(None, description="Split long prefills across scheduler steps (vLLM's default).")
    enforce_eager: bool = Field(False, description="No CUDA graphs or torch.compile: faster start, slower steps.")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache size in bytes, instead of what gpu_memory_utilization leaves (CPU runs).")
    max_concurrent_batches: int = Field(
        4, ge=1, le=64, description="Ray Data batches in flight per replica at once, so vLLM's continuous batching "
                                    "never drains between batches.")

    def engine_options(self) -> dict[str, Any]:
        """The vLLM engine arguments this section sets (unset fields left to vLLM)."""
        return self.model_dump(exclude={"max_concurrent_batches"}, exclude_none=True)


class ComputeConfig(_Section):
    replicas: int | tuple[int, int] = Field(
        1, description="Model replicas, each holding one copy of the model: a number, or [min, max] to autoscale.")
    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel degree: devices (and processes) per replica, on one node.")
    batch_size: int = Field(8, ge=1, description="Samples per generate call in one replica.")
    max_batch_tokens: int | None = Field(
        None, ge=1, description="Token budget of one generate call: a replica's batch is split into calls of samples "
                                "of similar length whose padded prompt tokens fit, none padded by more than 25% (default: one call).")
    cpu_workers: int | None = Field(None, ge=1, description="Concurrent CPU preprocessing tasks (default: cluster CPUs not used by replicas).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses CUDA when a GPU is visible, else CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    gpus_per_replica: float = Field(1.0, gt=0, description="GPUs requested per replica when device is cuda (tp > 1: one per rank).")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Language engine: transformers, or vLLM (continuous batching; `pip install "
                            "'internvl-batch[vllm]'`); auto: vLLM when it is installed and replicas are on GPUs.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine options.")
    object_store_mb: int | None = Field(
        None, ge=64, description="Ray object-store memory the run's queues may hold (default: 8 model batches of the "
                                 "largest samples per replica, at least 256 MiB, at most half the cluster's object "
                                 "store): bounds memory however large the input.")

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"need a number >= 1 or [min, max] with 1 <= min <= max, got {list(value) if isinstance(value, tuple) else value}")
        return value

    @model_validator(mode="after")
    def _tp(self) -> ComputeConfig:
        if self.tp > 1 and self.gpus_per_replica != 1.0:
            raise ValueError("gpus_per_replica: with tp > 1 every rank holds one whole GPU; leave gpus_per_replica at 1")
        return self

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas; equal for a fixed count."""
        return (self.replicas, self.replicas) if isinstance(self.replicas, int) else tuple(self.replicas)


class DecodeConfig(_Section):
    isolate: Literal["none", "video", "all"] = Field(
        "video", description="Decode these media in a child process, so a decoder that crashes or hangs costs one "
                             "error row (crashed / timeout), never the worker.")
    timeout_s: float = Field(120.0, gt=0, description="Per-sample decode time limit for isolated media (timeout error row).")
    attempts: int = Field(2, ge=1, le=10, description="Tries of a sample whose decoder crashes before it becomes a crashed error row.")


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
        from pipeline.errors import ErrorType

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


class JobConfig(_Section):
    task: Literal["caption", "vqa", "score"] = Field(
        description="caption: one prompt for every sample; vqa: a question per row; score: label probabilities of a yes/no or rating question.")
    input: str = Field(description="Local path, s3:// prefix or glob (any fsspec URL); a .parquet/.jsonl/.csv manifest with a "
                                   "uri column (one file, a folder or a glob of them); or an S3 Inventory manifest.json.")
    input_format: Literal["auto", "files", "manifest", "inventory"] = Field(
        "auto", description="How `input` is read. auto: a .parquet/.jsonl/.csv URL or glob is a manifest, a URL ending "
                            "in manifest.json an S3 Inventory report, anything else a prefix or glob of media files; "
                            "manifest: also a folder of manifest files; files / inventory: as named.")
    output: str = Field(description="Folder or s3:// prefix for the Parquet shards and _SUCCESS.json.")
    model: str = Field(description="Native InternVL checkpoint: local directory, s3:// prefix, or hub id.")
    model_revision: str | None = Field(None, description="Hub revision (commit) of the model, recorded in the fingerprint.")
    trust_remote_code: bool = Field(
        False, description="Allow the checkpoint's own tokenizer code (InternLM2/3 original format) when converting; "
                           "needs model_revision pinned to a 40-character commit. Model code never runs.")
    prompt: str | None = Field(None, description="caption: the instruction; vqa: a template with {question} (default '{question}').")
    questions: list[Question] | None = Field(
        None, min_length=1, description="vqa: questions asked of every sample (one output row each), each a string or "
                                        "{question, schema}; rows may carry their own `questions` (strings).")
    schema_value: dict[str, Any] | str | None = Field(
        None, alias="schema",
        description=f"caption / vqa: {SCHEMA_HELP}. Decoding is constrained so every answer is JSON of it; the parsed "
                    "answer is the typed column `answer` (raw text stays in `response`). Needs the `structured` extra "
                    "(xgrammar).")
    labels: list[str] | None = Field(None, min_length=2, description="score: the answers scored (default [yes, no]); unquoted yes/no/on/off/true/false and numbers are read as the words typed, not as booleans or numbers.")
    scale: ScaleConfig | None = Field(None, description="score: rate on a digit scale {min, max}; adds a rating column.")
    criteria: list[Criterion] | None = Field(None, min_length=1, description="score: several named questions in one pass (score_<name> columns).")
    filter: FilterRule | None = Field(None, description="score: what passes (adds a passed column); with criteria, set filter per criterion.")
    output_passed: str | None = Field(None, description="score: also write the passing rows, with their input columns, here.")
    tiling: TilingConfig = Field(default_factory=TilingConfig, description="InternVL dynamic tiling (shared across a multi-image sample's images).")
    video: VideoConfig = Field(default_factory=VideoConfig, description="Frame sampling for video inputs.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Decoding parameters.")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Replicas, batching and devices.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="Crash and hang isolation of media decoding.")
    rows_per_shard: int = Field(1000, ge=1, description="Rows per output Parquet shard, at least: a shard takes whole model batches (only the run's last may hold fewer).")
    incremental: bool = Field(False, description="Process only objects new or changed (ETag, else size+mtime) since the last successful run into this output; one run at a time (a lock in the output).")
    lock_ttl_s: float = Field(300.0, ge=10, description="Lease of an incremental run's lock (`_LOCK`), in seconds: renewed every third of it while the run lives; a later run takes over a lock whose lease expired (its run died).")
    overwrite: bool = Field(False, description="Replace results already in `output` (otherwise such a run is refused).")
    storage: dict[str, Any] = Field(default_factory=dict, description="Extra fsspec/s3fs options, e.g. endpoint_url. No credentials.")
    model_cache: str | None = Field(None, description="Local folder where s3:// checkpoints are copied (default ~/.cache/internvl-batch/models).")
    retry: RetryConfig | None = Field(None, description="Retry failed samples with lighter settings (a ladder of partial overrides); not part of the fingerprint.")
    _criteria: list[Criterion] = PrivateAttr(default_factory=list)
    _schema: dict[str, Any] | None = PrivateAttr(None)  # `schema`, loaded and checked
    _question_schemas: list[dict[str, Any] | None] = PrivateAttr(default_factory=list)  # each job question's own

    @field_validator("questions", mode="before")
    @classmethod
    def _plain_questions(cls, value: Any) -> Any:
        """A question may be written as its text alone."""
        return [{"question": q} if isinstance(q, str) else q for q in value] if isinstance(value, list) else value

    @field_validator("labels", mode="before")
    @classmethod
    def _label_words(cls, value: Any) -> Any:
        return label_words(value)

    @field_validator("storage")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        def walk(d: dict[str, Any], path: str) -> None:
            for k, v in d.items():
                if is_credential_key(k):
                    raise ValueError(
                        f"'{path}{k}' looks like a credential; credentials come only from the AWS chain "
                        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles), never from the job file"
                    )
                if isinstance(v, dict):
                    walk(v, f"{path}{k}.")

        walk(value, "")
        return value

    @model_validator(mode="after")
    def _remote_code(self) -> JobConfig:
        if self.trust_remote_code and not re.fullmatch(r"[0-9a-f]{40}", self.model_revision or ""):
            raise ValueError("trust_remote_code: runs code from the checkpoint, so model_revision must pin it to a "
                             f"40-character commit hash (got {self.model_revision!r})")
        return self

    @model_validator(mode="after")
    def _prompt(self) -> JobConfig:
        if self.task == "vqa" and self.prompt is not None and "{question}" not in self.prompt:
            raise ValueError("prompt: for task vqa the prompt must contain {question}")
        score_keys = [k for k in ("labels", "scale", "criteria", "filter", "output_passed") if getattr(self, k) is not None]
        if self.task != "score" and score_keys:
            raise ValueError(f"{', '.join(score_keys)}: only for task score")
        if self.task == "score":
            self._criteria = self._normalized_criteria()  # normalised once, here
        if self.questions is not None:
            if self.task != "vqa":
                raise ValueError("questions: only task vqa asks questions")
            if any(not q.strip() for q in self.question_texts):
                raise ValueError("questions: every question must be non-empty")
        return self

    @model_validator(mode="after")
    def _schemas(self, info: ValidationInfo) -> JobConfig:
        own = [q.schema_value for q in self.questions or []]
        if self.schema_value is None and all(s is None for s in own):
            return self
        if self.task == "score":
            raise ValueError("schema: only for tasks caption and vqa (a score job's answers are label probabilities)")
        base = (info.context or {}).get("base")
        self._schema = _load_checked(self.schema_value, "", self.storage, base)
        self._question_schemas = [_load_checked(s, f"questions[{k}].", self.storage, base) for k, s in enumerate(own)]
        from pipeline.model.answers import answer_type

        try:
            answer_type(self.answer_schemas())
        except SchemaError as err:
            raise ValueError(f"schema: the questions' schemas cannot share one answer column: {err}") from None
        return self

    @model_validator(mode="after")
    def _rungs_valid(self, info: ValidationInfo) -> JobConfig:
        """Every rung of the retry ladder gives a valid job (checked now, not when a sample first fails)."""
        if self.retry is None or (info.context or {}).get("rung"):
            return self
        for k, rung in enumerate(self.retry.ladder):
            try:
                _with_overrides(self, rung)
            except ValidationError as err:
                problem = err.errors()[0]
                where = ".".join(str(p) for p in problem["loc"])
                raise ValueError(f"retry.ladder[{k}]: {where}: {problem['msg'].removeprefix('Value error, ')}") from None
        return self

    def _normalized_criteria(self) -> list[Criterion]:
        """The criteria a score job evaluates; a job without `criteria` is one criterion named '' (plain columns)."""
        if self.criteria is not None:
            if self.prompt is not None or self.labels is not None or self.scale is not None or self.filter is not None:
                raise ValueError("with criteria, put prompt, labels, scale and filter inside each criterion")
            names = [c.name for c in self.criteria]
            if len(set(names)) != len(names):
                raise ValueError(f"criteria: names must be distinct, got {names}")
            return list(self.criteria)
        if self.prompt is None:
            raise ValueError("prompt: task score needs the question in prompt (or a list of criteria)")
        single = Criterion.model_construct(name="", prompt=self.prompt, labels=self.labels, scale=self.scale, filter=self.filter)
        Criterion._labels_or_scale(single)
        return [single]

    def score_criteria(self) -> list[Criterion]:
        """The criteria a score job evaluates (normalised at validation); empty for other tasks."""
        return list(self._criteria)

    @property
    def question_texts(self) -> list[str] | None:
        """The job's questions as text (None: the rows bring theirs)."""
        return None if self.questions is None else [q.question for q in self.questions]

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        """The job's `schema`, loaded and checked: it constrains every prompt without a schema of its own."""
        return self._schema

    def questions_asked(self) -> list[tuple[str, dict[str, Any] | None]]:
        """The job's questions, each with the schema its answer follows (its own, else the job's, else none)."""
        own = self._question_schemas or [None] * len(self.questions or [])
        return [(q, s if s is not None else self._schema) for q, s in zip(self.question_texts or [], own)]

    def answer_schemas(self) -> list[dict[str, Any]]:
        """Every schema the job's answers may follow (empty: no `answer` column)."""
        return [s for s in [self._schema, *self._question_schemas] if s is not None]

    @property
    def has_filter(self) -> bool:
        return self.task == "score" and any(c.filter is not None for c in self.score_criteria())

    @property
    def effective_prompt(self) -> str:
        """The prompt (or vqa template) this job uses."""
        return self.prompt if self.prompt is not None else DEFAULT_PROMPTS[self.task]

    def fingerprint(self) -> str:
        """sha256 over everything that changes results (model, prompt, tiling, generation), not where or how fast."""
        relevant = {
            "task": self.task,
            "model": self.model,
            "model_revision": self.model_revision,
            "trust_remote_code": self.trust_remote_code,
            "prompt": self.effective_prompt,
            "questions": self.question_texts,
            "incremental": self.incremental,
            "score": [c.model_dump() for c in self.score_criteria()] if self.task == "score" else None,
            "tiling": self.tiling.model_dump(),
            "video": self.video.model_dump(),
            "generation": self.generation.model_dump(),
        }
        if self.answer_schemas():  # only then, so the fingerprints of jobs without one stay as they were
            relevant["schema"] = {"job": self._schema, "questions": self._question_schemas}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def rung_overrides(job: JobConfig, attempt: int) -> dict[str, Any]:
    """The overrides attempt `attempt` runs with: none for the first, then each rung of the ladder in turn (an
    attempt past the ladder, from `--retry-errors`, keeps its last rung)."""
    ladder = job.retry.ladder if job.retry else []
    if attempt <= 1 or not ladder:
        return {}
    return dict(ladder[min(attempt - 1, len(ladder)) - 1])


def max_attempt(job: JobConfig) -> int:
    """The last attempt a run makes at a sample on its own: its first try and one per rung."""
    return 1 + len(job.retry.ladder if job.retry else [])


def rung_job(job: JobConfig, attempt: int) -> JobConfig:
    """The job as attempt `attempt` runs it: its rung's overrides applied (each key validated as usual)."""
    overrides = rung_overrides(job, attempt)
    if not overrides:
        return job
    try:
        return _with_overrides(job, overrides)
    except ValidationError as err:
        raise JobError(format_validation_error(err, f"retry rung {attempt - 1} ({json.dumps(overrides)})")) from None


def _with_overrides(job: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """The job with dotted-key overrides, validated again (its schemas passed as the mappings already loaded)."""
    data = job.model_dump(exclude_none=True)
    if job.answer_schema is not None:
        data["schema"] = job.answer_schema
    for q, (_, schema) in zip(data.get("questions") or [], job.questions_asked()):
        if schema is not None and "schema" in q:
            q["schema"] = schema
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = value
    return JobConfig.model_validate(data, context={"base": None, "rung": True})


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a nested dict, returning a new dict."""
    result = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise JobError(f"--set {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise JobError(f"--set {item!r}: empty key")
        node = result
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise JobError(f"--set {item!r}: '{k}' is not a group")
        node[keys[-1]] = load_yaml(raw, labels=keys[-1] == "labels") if raw.strip() else ""
    return result


def _load_checked(value: Any, where: str, storage: dict[str, Any], base: str | None) -> dict[str, Any] | None:
    """A `schema` value loaded and checked: in the supported subset, and compiled by the grammar backend."""
    if value is None:
        return None
    from pipeline.model.structured import check_schema, load_schema

    try:
        schema = load_schema(value, storage, base=base)
        check_schema(schema)
        try:
            from pipeline.model.constrained import check_grammar
        except ImportError as err:
            raise ValueError(f"{where}schema: constrained decoding needs the grammar backend xgrammar, which is not "
                             f"installed ({err}); pip install 'internvl-batch[structured]'") from None
        check_grammar(schema)
    except SchemaError as err:
        raise ValueError(f"{where}{err}") from None
    return schema


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section an annotation holds: Section, Section | None, list[Section]; None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((s for a in typing.get_args(annotation) if (s := _section(a)) is not None), None)


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the section that holds the field at `loc` (for unknown-key errors)."""
    model: type[BaseModel] | None = JobConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == str(part)), None)
        model = _section(getattr(field, "annotation", None))
        if model is None:
            return []
    return sorted(f.alias or name for name, f in model.model_fields.items())


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the field by its dotted path."""
    lines = [f"{source}: invalid job file"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key; valid keys here: {', '.join(_valid_keys(e['loc']))}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # a whole-job check that names its own key (retry.ladder[k]...) needs no "(top level)"
            lines.append(f"  {msg}" if not e["loc"] and re.match(r"[a-z_]+[.\[]", msg) else f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_job(data: Any, *, source: str = "job", overrides: list[str] | None = None,
              base: str | Path | None = None) -> JobConfig:
    """Validate a job mapping (after overrides); raise JobError with every problem named. base: the folder relative
    schema paths are taken from (the job file's)."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job file must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data, context={"base": None if base is None else str(base)})
    except ValidationError as err:
        raise JobError(format_validation_error(err, source)) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a YAML job file."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except FileNotFoundError:
        raise JobError(f"{path}: no such job file") from None
    except yaml.YAMLError as err:
        raise JobError(f"{path}: not valid YAML: {err}") from None
    return parse_job(data, source=str(path), overrides=overrides, base=path.parent)
