"""Structured annotation without a model: loading and checking schemas, their Arrow types, parsing answers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.errors import SchemaError
from pipeline.structured.answers import InvalidAnswer, TruncatedAnswer, answer_type, arrow_type, parse_answer, to_arrow
from pipeline.structured.schema import check_schema, load_schema
from tests.schemas import GOOD, SCHEMA, SCHEMA_TYPE


def check_grammar(schema):
    """The grammar backend's check, where xgrammar is installed."""
    pytest.importorskip("xgrammar")
    from pipeline.model.constrained import check_grammar as check

    check(schema)


# ------------------------------------------------------------------------------------------------ load_schema


def test_load_schema_inline_mapping_json_string_path_and_url(tmp_path):
    assert load_schema(SCHEMA) == SCHEMA and load_schema(SCHEMA) is not SCHEMA
    assert load_schema(json.dumps(SCHEMA)) == SCHEMA
    path = tmp_path / "answer.json"
    path.write_text(json.dumps(SCHEMA))
    assert load_schema(str(path)) == SCHEMA
    assert load_schema(path.as_uri()) == SCHEMA  # file:// URL through fsspec
    import fsspec

    with fsspec.open("memory://schemas/answer.json", "w") as f:
        f.write(json.dumps(SCHEMA))
    assert load_schema("memory://schemas/answer.json", storage_options={}) == SCHEMA
    # a relative path is taken from the job file's folder
    assert load_schema("answer.json", base=tmp_path) == SCHEMA
    with pytest.raises(SchemaError, match="schema file answer.json not found"):
        load_schema("answer.json")


@pytest.mark.parametrize("value, message", [
    ("/nonexistent/answer.json", "schema file /nonexistent/answer.json not found"),
    ('{"type": "object",', "inline JSON is not valid JSON"),
    (42, "expected a JSON Schema mapping"),
    ("", "expected a JSON Schema mapping"),
])
def test_load_schema_errors(value, message):
    with pytest.raises(SchemaError, match=message):
        load_schema(value)


def test_load_schema_file_of_a_list(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(SchemaError, match="holds a JSON list, not a JSON Schema object"):
        load_schema(str(path))


# ------------------------------------------------------------------------------------------------- arrow_type


def test_arrow_type_of_every_construct():
    assert arrow_type(SCHEMA) == SCHEMA_TYPE
    assert [f.name for f in arrow_type(SCHEMA)] == list(SCHEMA["properties"])  # declared order
    assert arrow_type({"enum": ["a", "b"]}) == pa.string()
    assert arrow_type({"enum": [1, 2]}) == pa.int64()
    assert arrow_type({"enum": [1, 2.5]}) == pa.float64()
    assert arrow_type({"enum": [True, False, None]}) == pa.bool_()
    assert arrow_type({"const": "x"}) == pa.string()
    assert arrow_type({"type": "integer"}) == pa.int64()
    assert arrow_type({"type": "number"}) == pa.float64()
    assert arrow_type({"type": "string", "format": "date"}) == pa.string()
    assert arrow_type({"type": "array", "items": {"type": "array", "items": {"type": "boolean"}}}) == \
        pa.list_(pa.list_(pa.bool_()))


def test_arrow_type_of_pydantic_style_schema():
    """$defs/$ref, titles, Optional as anyOf [T, null], default null: what pydantic's model_json_schema() emits."""
    schema = {
        "$defs": {"Box": {"type": "object", "title": "Box", "properties": {
            "w": {"type": "integer", "title": "W"}, "h": {"type": "integer", "title": "H"}}, "required": ["w", "h"]}},
        "type": "object", "title": "Answer",
        "properties": {
            "box": {"anyOf": [{"$ref": "#/$defs/Box"}, {"type": "null"}], "default": None},
            "boxes": {"type": "array", "items": {"$ref": "#/$defs/Box"}},
            "color": {"allOf": [{"enum": ["red", "blue"]}], "description": "main colour"},
        },
        "required": ["boxes", "color"],
    }
    check_schema(schema)
    check_grammar(schema)
    box = pa.struct([("w", pa.int64()), ("h", pa.int64())])
    assert arrow_type(schema) == pa.struct([("box", box), ("boxes", pa.list_(box)), ("color", pa.string())])


def test_a_pydantic_model_schema_is_supported():
    import enum
    from typing import Literal

    from pydantic import BaseModel, Field

    class Kind(str, enum.Enum):
        cat = "cat"
        dog = "dog"

    class Box(BaseModel):
        w: int = Field(ge=0, le=4096)
        h: int

    class Answer(BaseModel):
        kind: Kind
        mood: Literal["calm", "angry"]
        score: float = Field(ge=0, le=1)
        tags: list[str] = Field(max_length=3)
        box: Box | None = None
        ok: bool

    schema = Answer.model_json_schema()
    check_schema(schema)
    check_grammar(schema)
    box = pa.struct([("w", pa.int64()), ("h", pa.int64())])
    assert arrow_type(schema) == pa.struct([("kind", pa.string()), ("mood", pa.string()), ("score", pa.float64()),
                                            ("tags", pa.list_(pa.string())), ("box", box), ("ok", pa.bool_())])


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}},
     r"schema \$\.properties\.a: oneOf of different types \(string \| integer\)"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "number"}]}}},
     r"schema \$\.properties\.a: anyOf of different types"),
    ({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}},
     r"schema \$\.properties\.a\.type: type \[\"string\", \"integer\"\]: unions of types"),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}},
     r"schema \$\.patternProperties: patternProperties is not supported: objects keyed by pattern"),
    ({"type": "object", "properties": {"m": {"type": "object", "additionalProperties": {"type": "integer"}}}},
     r"schema \$\.properties\.m: object without properties"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True},
     r"schema \$\.additionalProperties: additionalProperties other than false"),
    ({"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}}, "$ref": "#/$defs/node"},
     r"schema \$\.properties\.next: \$ref cycle #/\$defs/node -> #/\$defs/node"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
     r"schema \$\.properties\.a: \$ref 'https://example.com/a.json': only local references"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
     r"schema \$\.properties\.a: \$ref '#/\$defs/missing' points at nothing"),
    ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}, r"schema \$\.prefixItems: prefixItems is not supported: tuples of mixed types"),
    ({"type": "array"}, r"schema \$: array needs items"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True},
     r"schema \$\.uniqueItems: uniqueItems is not supported: not enforced by the grammar"),
    ({"type": "object", "properties": {"a": {"enum": ["x", 1]}}},
     r"schema \$\.properties\.a\.enum: enum mixes integer and string values"),
    ({"type": "object", "properties": {"a": {"enum": [{"x": 1}]}}}, r"enum value \{\"x\": 1\} is not a string"),
    ({"type": "object", "properties": {"a": {}}}, r"schema \$\.properties\.a: an unconstrained value"),
    ({"type": "object", "properties": {"a": {"description": "no type"}}}, r"schema \$\.properties\.a: schema without a type"),
    ({"type": "strin"}, r"schema \$\.type: unknown type 'strin'"),
    ({"type": "string", "minimum": 3}, r"schema \$: keyword\(s\) \['minimum'\] do not apply to type string"),
    ({"type": "string", "pattern": "^(?=a)b$"}, r"schema \$\.pattern: .*lookahead/lookbehind"),
    ({"type": "string", "pattern": r"(a)\1"}, r"schema \$\.pattern: .*backreference"),
    ({"type": "string", "pattern": "(unclosed"}, r"schema \$\.pattern: .*not a valid regular expression"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, r"minimum 5 is greater than maximum 1"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]},
     r"schema \$\.required: required names \['b'\] that are not in properties"),
    ({"type": "object", "properties": {"a": {"type": "string", "frobnicate": 1}}},
     r"schema \$\.properties\.a\.frobnicate: unknown or unsupported keyword 'frobnicate'"),
    ({"not": {"type": "string"}}, r"schema \$\.not: not is not supported: not enforced"),
    ({"type": "number", "multipleOf": 0.5}, r"schema \$\.multipleOf: multipleOf on a number is not enforced"),
    ({"type": "string", "format": "phone"}, r"schema \$\.format: format 'phone' is not enforced by the grammar"),
    ({"type": "object", "properties": {"a.b": {"type": "null"}}},
     r"schema \$\.properties\[\"a\.b\"\]\.type: type \"null\" alone has no Arrow type"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, r"schema \$: maxLength together with pattern is not"),
])
def test_check_schema_names_the_construct_and_its_path(schema, message):
    with pytest.raises(SchemaError, match=message):
        check_schema(schema)
    with pytest.raises(SchemaError):
        arrow_type(schema)


def test_answer_type_merges_per_question_schemas():
    a = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "n": {"type": "integer"}}}
    b = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}}
    assert answer_type([a, b]) == pa.struct([("kind", pa.string()), ("n", pa.int64()), ("ok", pa.bool_())])
    assert answer_type([SCHEMA, SCHEMA]) == SCHEMA_TYPE
    c = {"type": "object", "properties": {"n": {"type": "string"}}}
    with pytest.raises(SchemaError, match=r"schema \$\.n: schemas\[1\] gives the answer type string where an earlier "
                                          r"schema gives int64"):
        answer_type([a, c])


# ----------------------------------------------------------------------------------------------- parse_answer


def test_parse_answer_valid():
    assert parse_answer(json.dumps(GOOD), SCHEMA, max_new_tokens=100, finished=True) == GOOD
    # a closed object that met the limit exactly (EOS would have been next) is complete, not truncated
    assert parse_answer(json.dumps(GOOD), SCHEMA, max_new_tokens=100, finished=False) == GOOD


@pytest.mark.parametrize("text", ['{"kind": "cat", "cou', '{"kind": "cat"', '', '{"kind": "ca'])
def test_parse_answer_cut_off_is_truncated_naming_the_limit(text):
    with pytest.raises(TruncatedAnswer, match="max_new_tokens=7") as info:
        parse_answer(text, SCHEMA, max_new_tokens=7, finished=False)
    assert info.value.error_type == "truncated"


def test_parse_answer_number_root_needs_eos():
    assert parse_answer("12", {"type": "integer"}, max_new_tokens=2, finished=True) == 12
    with pytest.raises(TruncatedAnswer):  # "12" may have been cut off before its next digit
        parse_answer("12", {"type": "integer"}, max_new_tokens=2, finished=False)
    assert parse_answer('"x"', {"type": "string"}, max_new_tokens=2, finished=False) == "x"


@pytest.mark.parametrize("text, message", [
    ('{"kind": "cat"', "not valid JSON"),
    (json.dumps({**GOOD, "kind": "cow"}), r"at \$\.kind: 'cow' is not one of"),
    (json.dumps({**GOOD, "count": 30}), r"at \$\.count: 30 is greater than the maximum of 20"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "indoor"}), "'indoor' is a required property"),
    (json.dumps({**GOOD, "where": {"x": 1, "label": 5}}), r"at \$\.where\.label: 5 is not of type 'string'"),
    ('{"kind": "cat"} trailing', "not valid JSON"),
    ('NaN', "not valid JSON"),
])
def test_parse_answer_invalid(text, message):
    with pytest.raises(InvalidAnswer, match=message) as info:
        parse_answer(text, SCHEMA, max_new_tokens=100, finished=True)
    assert info.value.error_type == "invalid_answer"


def test_parse_answer_values_arrow_cannot_hold():
    with pytest.raises(InvalidAnswer, match="outside int64"):
        parse_answer(str(2**70), {"type": "integer"}, max_new_tokens=30, finished=True)
    with pytest.raises(InvalidAnswer, match="non-finite"):
        parse_answer("1e999", {"type": "number"}, max_new_tokens=30, finished=True)


def test_to_arrow_writes_a_filterable_parquet_column(tmp_path):
    values = [GOOD, None, {**GOOD, "kind": "dog", "count": 0, "tags": [], "where": {"x": 2, "label": "x"}}]
    arr = to_arrow(values, SCHEMA)
    assert arr.type == SCHEMA_TYPE and arr.null_count == 1
    pq.write_table(pa.table({"id": ["a", "b", "c"], "answer": arr}), tmp_path / "part.parquet")
    table = pq.read_table(tmp_path / "part.parquet")
    answer = table.column("answer")
    assert answer.type == SCHEMA_TYPE
    dogs = table.filter(pc.equal(pc.struct_field(answer, "kind"), "dog"))
    assert dogs.column("id").to_pylist() == ["c"]
    assert pc.struct_field(pc.struct_field(answer, "where"), "x").to_pylist() == [1.5, None, 2.0]
    assert to_arrow([1, None], pa.int64()).to_pylist() == [1, None]
