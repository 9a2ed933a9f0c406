"""The error taxonomy: what a bad row's `error_type` may say, and the exceptions the pipeline raises.

Rows: bad input never stops a job; it becomes an output row with `status = error` and one of `ErrorType`.
Exceptions: a job that cannot run at all stops with one of the classes below, each with a message naming the cause.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    """The `error_type` of an error row (the README's table is generated from `description`)."""

    NOT_FOUND = "not_found"
    READ_ERROR = "read_error"
    DECODE_ERROR = "decode_error"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    BAD_INPUT = "bad_input"
    UNSUPPORTED = "unsupported"
    MODEL_ERROR = "model_error"
    TOO_LONG = "too_long"
    TRUNCATED = "truncated"
    INVALID_ANSWER = "invalid_answer"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    ErrorType.NOT_FOUND: "no such object",
    ErrorType.READ_ERROR: "storage failure",
    ErrorType.DECODE_ERROR: "not a decodable image or video",
    ErrorType.TOO_LARGE: "over the pixel / duration / frame limits (checked before decoding), or over the token "
                         "budget even at `min_tiles` (an image) or at one frame (a video)",
    ErrorType.TIMEOUT: "decoding took longer than `decode.timeout_s`",
    ErrorType.CRASHED: "the decoder crashed `decode.attempts` times on this file",
    ErrorType.BAD_INPUT: "e.g. a vqa row without a question, or a URI the job may not read (`allowed_inputs`)",
    ErrorType.UNSUPPORTED: "e.g. a video where no decoder is installed",
    ErrorType.MODEL_ERROR: "one sample does not fit in device (or host) memory even alone, or the model raised on it alone "
                           "(the message names the exception; the batch's other samples complete)",
    ErrorType.TOO_LONG: "the prompt (image tokens and text) is longer than the model's context; found before the "
                        "model is called",
    ErrorType.TRUNCATED: "a `schema` answer cut off at `generation.max_new_tokens` before its JSON closed "
                         "(`response` keeps the text, `answer` is null)",
    ErrorType.INVALID_ANSWER: "a `schema` answer that is not a value of its schema, or one Arrow cannot hold (an "
                              "integer outside int64); not expected under constrained decoding",
}


class MediaError(Exception):
    """A sample that cannot be used; `error_type` says which kind of bad input it is."""

    def __init__(self, error_type: ErrorType | str, message: str) -> None:
        super().__init__(message)
        self.error_type = ErrorType(error_type)


class SchemaError(ValueError):
    """A `schema` we cannot load, enforce with the grammar backend, or map onto an Arrow type; the message names the
    construct and its JSON path (a job with one fails validation: JobError, exit code 2)."""

    def __init__(self, message: str, path: str = "$") -> None:
        self.path = path
        super().__init__(f"schema {path}: {message}")


class JobError(ValueError):
    """A job file that cannot run; the message names the file and the offending keys (exit code 2)."""


class InputError(ValueError):
    """The input cannot be listed or its manifest is malformed."""


class PromptError(ValueError):
    """A prompt that cannot be built for a row (e.g. vqa without a question)."""


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be found or loaded; the job fails fast with this cause."""


class ConversionError(ValueError):
    """The checkpoint cannot be converted faithfully; the message names the offending key, field or file."""


class LockedError(RuntimeError):
    """Another run holds the output's lease."""


class LeaseLostError(LockedError):
    """This run no longer holds the output's lease (taken over, removed, or not renewed in time): it writes nothing
    more."""


class SecretError(ValueError):
    """Something about to be sent to the cluster looks like a credential."""


class RunError(RuntimeError):
    """The run could not complete; the message says why and what to do (exit code 1)."""
