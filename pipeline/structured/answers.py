"""Structured answers: a schema's Arrow type, parsing a generated answer into a value of its schema, and the typed
`answer` column.

    enum -> string (int64, float64, bool for enums of those), integer -> int64, number -> float64, boolean -> bool,
    string -> string, array -> list<item>, object -> struct<properties in declared order>

Pure: json, pyarrow and jsonschema; the schemas are checked first (pipeline/structured/schema.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from pipeline.errors import ErrorType, SchemaError
from pipeline.structured.schema import Resolver, child_path, effective, node_type, root_kind

__all__ = ["AnswerError", "InvalidAnswer", "TruncatedAnswer", "answer_type", "arrow_type", "parse_answer", "to_arrow"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


class AnswerError(ValueError):
    """An answer that is not a value of its schema; `error_type` is what the output row's error_type says."""

    error_type = ErrorType.INVALID_ANSWER


class TruncatedAnswer(AnswerError):
    """Generation stopped at max_new_tokens before the answer's JSON closed."""

    error_type = ErrorType.TRUNCATED


class InvalidAnswer(AnswerError):
    """The answer is not JSON, or not of its schema (should not happen under constrained decoding)."""

    error_type = ErrorType.INVALID_ANSWER


# ------------------------------------------------------------------------------------------------------------ Arrow


def arrow_type(schema: Mapping[str, Any]) -> pa.DataType:
    """The Arrow type of a schema's values (see the module docstring); raises SchemaError for unsupported schemas."""
    resolver = Resolver(schema)

    def convert(node: Any, path: str, refs: tuple[str, ...]) -> pa.DataType:
        eff, _, refs = effective(node, path, resolver, refs)
        kind, _ = node_type(eff, path)
        if kind == "object":
            props_path = child_path(path, "properties")
            return pa.struct([pa.field(name, convert(sub, child_path(props_path, name), refs))
                              for name, sub in eff["properties"].items()])
        if kind == "array":
            return pa.list_(convert(eff["items"], child_path(path, "items"), refs))
        return _SCALARS[kind]

    if not isinstance(schema, Mapping):
        raise SchemaError(f"a schema must be a JSON object, got {type(schema).__name__}")
    return convert(schema, "$", ())


def answer_type(schemas: Sequence[Mapping[str, Any]]) -> pa.DataType:
    """One `answer` column type for several schemas (a job whose questions each have their own schema).

    Equal types are kept; object schemas merge into one struct holding every schema's fields (a question's row has
    nulls in the fields of the others); anything else that differs raises SchemaError.
    """
    if not schemas:
        raise SchemaError("no schema given")
    merged = arrow_type(schemas[0])
    for k, schema in enumerate(schemas[1:], start=1):
        merged = _merge(merged, arrow_type(schema), f"schemas[{k}]")
    return merged


def _merge(a: pa.DataType, b: pa.DataType, where: str, path: str = "$") -> pa.DataType:
    if a == b:
        return a
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        fields = {a.field(i).name: a.field(i).type for i in range(a.num_fields)}
        for i in range(b.num_fields):
            f = b.field(i)
            fields[f.name] = _merge(fields[f.name], f.type, where, child_path(path, f.name)) if f.name in fields else f.type
        return pa.struct([pa.field(n, t) for n, t in fields.items()])
    if pa.types.is_list(a) and pa.types.is_list(b):
        return pa.list_(_merge(a.value_type, b.value_type, where, child_path(path, "items")))
    raise SchemaError(f"{where} gives the answer type {b} where an earlier schema gives {a}; questions sharing one "
                      f"answer column must agree on each field's type", path)


def to_arrow(values: Sequence[Any], schema: Mapping[str, Any] | pa.DataType) -> pa.Array:
    """Parsed answers (None for error rows) as an Arrow array of the schema's type (or of a given Arrow type)."""
    typ = schema if isinstance(schema, pa.DataType) else arrow_type(schema)
    return pa.array(list(values), type=typ)


# ---------------------------------------------------------------------------------------------------------- parsing


def parse_answer(text: str, schema: Mapping[str, Any], *, max_new_tokens: int, finished: bool) -> Any:
    """The answer's value, valid for its schema.

    finished: generation ended with EOS (not at max_new_tokens). An unfinished answer whose JSON is not complete raises
    TruncatedAnswer naming the limit; an answer that is not JSON or not of the schema raises InvalidAnswer.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant)
        complete = True
    except (json.JSONDecodeError, ValueError) as err:
        complete, value, why = False, None, err
    # A value ending in a delimiter ( } ] " or a literal) that parsed is whole even if cut off right after; a bare
    # number may have been cut between digits: only EOS says it ended.
    if not finished and not (complete and root_kind(schema) not in ("integer", "number")):
        raise TruncatedAnswer(f"answer cut off at max_new_tokens={max_new_tokens} before its JSON closed "
                              f"({len(text)} characters); raise generation.max_new_tokens or tighten the schema "
                              f"(maxLength, maxItems)")
    if not complete:
        raise InvalidAnswer(f"answer is not valid JSON: {why}")
    _check_value(value, schema)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _validator(schema: Mapping[str, Any]) -> Any:
    key = json.dumps(schema, sort_keys=True)
    cached = _VALIDATORS.get(key)
    if cached is None:
        from jsonschema import Draft202012Validator

        cached = _VALIDATORS[key] = Draft202012Validator(schema)
        if len(_VALIDATORS) > 256:
            _VALIDATORS.pop(next(iter(_VALIDATORS)))
    return cached


_VALIDATORS: dict[str, Any] = {}


def _check_value(value: Any, schema: Mapping[str, Any]) -> None:
    errors = sorted(_validator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        raise InvalidAnswer(f"answer does not match the schema at {path}: {err.message}")
    bad = _out_of_range(value)
    if bad:
        raise InvalidAnswer(f"answer has {bad}")


def _out_of_range(value: Any) -> str | None:
    """What Arrow's int64 / float64 cannot hold (JSON integers are unbounded)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else f"integer {value} outside int64"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"non-finite number {value}"
    if isinstance(value, dict):
        return next((r for r in map(_out_of_range, value.values()) if r), None)
    if isinstance(value, list):
        return next((r for r in map(_out_of_range, value) if r), None)
    return None
