"""The job: a typed, validated, frozen description of one run (JobConfig), read from a YAML file or a mapping.

Knows nothing of Ray or torch. Every field has a description; unknown keys are rejected with the valid ones listed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.config.compute import ComputeConfig
from pipeline.config.fingerprint import fingerprint as job_fingerprint
from pipeline.config.inputs import ALLOWED_INPUTS_HELP, HttpConfig, check_allowed_inputs
from pipeline.config.jobfile import format_validation_error, label_words, load_yaml
from pipeline.config.overrides import apply_overrides
from pipeline.config.retry import RetryConfig, rung_overrides
from pipeline.config.sections import (SCHEMA_HELP, Criterion, DecodeConfig, FilterRule, GenerationConfig, Question,
                                      ScaleConfig, TilingConfig, VideoConfig, _Section)
from pipeline.credentials import is_credential_key
from pipeline.errors import JobError, SchemaError

DEFAULT_PROMPTS = {
    "caption": "Describe the image in detail.",
    "vqa": "{question}",
    "score": "",
}


class JobConfig(_Section):
    task: Literal["caption", "vqa", "score"] = Field(
        description="caption: one prompt for every sample; vqa: a question per row; score: label probabilities of a yes/no or rating question.")
    input: str | None = Field(
        None, validate_default=True,
        description="Local path, s3:// prefix or glob (any fsspec URL); a .parquet/.jsonl/.csv manifest with a uri column "
                    "(one file, a folder or a glob of them); or an S3 Inventory manifest.json. Required for a run; "
                    "`annotate()` takes a dataset instead (there it only says where the rows' URIs may point).")
    input_format: Literal["auto", "files", "manifest", "inventory", "webdataset"] = Field(
        "auto", description="How `input` is read. auto: a .parquet/.jsonl/.csv URL or glob is a manifest, a URL ending "
                            "in manifest.json an S3 Inventory report, a .tar URL, glob or brace pattern WebDataset "
                            "shards, anything else a prefix or glob of media files; manifest: also a folder of manifest "
                            "files; webdataset: also a prefix of .tar shards; files / inventory: as named.")
    image_column: str | None = Field(
        None, description="A Parquet manifest's column holding the pictures themselves (binary, a {bytes, path} struct "
                          "as Hugging Face datasets store images, or a list of either), decoded in place of reading a "
                          "URI; ids from each picture's path, else a hash of its bytes (docs/inputs.md).")
    output: str | None = Field(None, validate_default=True,
                               description="Folder or s3:// prefix for the Parquet shards and _SUCCESS.json. Required for "
                                           "a run; not for `annotate()`, whose caller writes the rows.")
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
    incremental: bool = Field(False, description="Process only objects new or changed (ETag, else size+mtime) since the last successful run into this output.")
    lock_ttl_s: float = Field(300.0, ge=10, description="Length of the output's lease (`_LOCK`, held by every run that writes), in seconds: renewed every third of it while the run lives; a run stops writing once it has not renewed it for two thirds of it; a later run takes over a lease not renewed for its whole length (its run died).")
    overwrite: bool = Field(False, description="Replace results already in `output` (otherwise such a run is refused).")
    storage: dict[str, Any] = Field(default_factory=dict, description="Extra fsspec/s3fs options, e.g. endpoint_url. No credentials.")
    allowed_inputs: list[str] = Field(default_factory=list, description=ALLOWED_INPUTS_HELP)
    http: HttpConfig = Field(default_factory=HttpConfig, description="How http(s) URIs are fetched: timeout, retries with "
                                                                     "backoff for 429 and 5xx, requests per host.")
    model_cache: str | None = Field(None, description="Local folder where s3:// checkpoints are copied (default ~/.cache/internvl-batch/models).")
    dedup: Literal["none", "exact"] = Field(
        "none", description="exact: samples with byte-identical media (and the same questions) reach the model once; "
                            "the others copy its rows, naming it in a `duplicate_of` column (docs/dedup.md).")
    retry: RetryConfig | None = Field(None, description="Retry failed samples with lighter settings (a ladder of partial overrides); not part of the fingerprint.")
    _criteria: list[Criterion] = PrivateAttr(default_factory=list)
    _schema: dict[str, Any] | None = PrivateAttr(None)  # `schema`, loaded and checked
    _question_schemas: list[dict[str, Any] | None] = PrivateAttr(default_factory=list)  # each job question's own

    @field_validator("questions", mode="before")
    @classmethod
    def _plain_questions(cls, value: Any) -> Any:
        """A question may be written as its text alone."""
        return [{"question": q} if isinstance(q, str) else q for q in value] if isinstance(value, list) else value

    @field_validator("input", "output")
    @classmethod
    def _placed(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A run needs both; a job read for annotate() (`model_only`) may leave them out."""
        if value is None and not (info.context or {}).get("model_only"):
            raise PydanticCustomError("missing", "Field required")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _label_words(cls, value: Any) -> Any:
        return label_words(value)

    @field_validator("allowed_inputs")
    @classmethod
    def _allowed_inputs(cls, value: list[str]) -> list[str]:
        return check_allowed_inputs(value)

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
    def _image_column(self) -> JobConfig:
        if self.image_column is not None and self.input_format not in ("auto", "manifest"):
            raise ValueError(f"image_column: only for a Parquet manifest input (input_format is {self.input_format!r})")
        return self

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
        from pipeline.structured.answers import answer_type

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

    @property
    def question_schemas(self) -> list[dict[str, Any] | None]:
        """Each job question's own schema (None: it follows the job's), loaded and checked."""
        return list(self._question_schemas)

    def require_placed(self) -> None:
        """A run reads `input` and writes `output`: a job read for annotate() without them is refused here."""
        missing = [k for k in ("input", "output") if getattr(self, k) is None]
        if missing:
            raise JobError(f"{' and '.join(missing)}: required for a run (this job was read for annotate(), which "
                           "takes a dataset and returns one)")

    def fingerprint(self) -> str:
        """What must match for this job to resume an output (config/fingerprint.py)."""
        return job_fingerprint(self)



def rung_job(job: JobConfig, attempt: int) -> JobConfig:
    """The job as attempt `attempt` runs it: its rung's overrides applied (each key validated as usual)."""
    overrides = rung_overrides(job.retry, attempt)
    if not overrides:
        return job
    return with_overrides(job, overrides, source=f"retry rung {attempt - 1} ({json.dumps(overrides)})")


def with_overrides(job: JobConfig, overrides: dict[str, Any], *, source: str = "overrides") -> JobConfig:
    """The job with dotted-key overrides (`{"compute.replicas": 2}`), validated again; JobError naming the key."""
    try:
        return _with_overrides(job, overrides)
    except ValidationError as err:
        raise JobError(format_validation_error(err, source, JobConfig)) from None


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
    # a job read for annotate() stays one (its input and output may be missing)
    context = {"base": None, "rung": True, "model_only": job.input is None or job.output is None}
    return JobConfig.model_validate(data, context=context)



def _load_checked(value: Any, where: str, storage: dict[str, Any], base: str | None) -> dict[str, Any] | None:
    """A `schema` value loaded and checked: in the supported subset, and compiled by the grammar backend."""
    if value is None:
        return None
    from pipeline.structured.grammar import check_grammar
    from pipeline.structured.schema import check_schema, load_schema

    try:
        schema = load_schema(value, storage, base=base)
        check_schema(schema)
        try:
            check_grammar(schema)
        except ImportError as err:
            raise ValueError(f"{where}schema: constrained decoding needs the grammar backend xgrammar, which is not "
                             f"installed ({err}); pip install 'internvl-batch[structured]'") from None
    except SchemaError as err:
        raise ValueError(f"{where}{err}") from None
    return schema



def parse_job(data: Any, *, source: str = "job", overrides: list[str] | None = None,
              base: str | Path | None = None, model_only: bool = False) -> JobConfig:
    """Validate a job mapping (after overrides); raise JobError with every problem named. base: the folder relative
    schema paths are taken from (the job file's). `model_only`: a job for annotate(), which needs neither `input`
    nor `output` (a run refuses such a job: `JobConfig.require_placed`)."""
    if not isinstance(data, dict):
        raise JobError(f"{source}: a job file must be a mapping of keys, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data, context={"base": None if base is None else str(base),
                                                       "model_only": model_only})
    except ValidationError as err:
        raise JobError(format_validation_error(err, source, JobConfig)) from None


def load_job(path: str | Path, overrides: list[str] | None = None, *, model_only: bool = False) -> JobConfig:
    """Read, override and validate a YAML job file (`model_only`: as parse_job)."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except FileNotFoundError:
        raise JobError(f"{path}: no such job file") from None
    except yaml.YAMLError as err:
        raise JobError(f"{path}: not valid YAML: {err}") from None
    return parse_job(data, source=str(path), overrides=overrides, base=path.parent, model_only=model_only)
