"""The job's sections: tiling, video, scoring criteria, questions, generation, decoding (plain values, validated)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config.jobfile import label_words


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


class DecodeConfig(_Section):
    isolate: Literal["none", "video", "all"] = Field(
        "video", description="Decode these media in a child process, so a decoder that crashes or hangs costs one "
                             "error row (crashed / timeout), never the worker.")
    timeout_s: float = Field(120.0, gt=0, description="Per-sample decode time limit for isolated media (timeout error row).")
    attempts: int = Field(2, ge=1, le=10, description="Tries of a sample whose decoder crashes before it becomes a crashed error row.")


# Job keys a retry rung may lower: how much of a sample is read and how long its answer may be (never what is asked
