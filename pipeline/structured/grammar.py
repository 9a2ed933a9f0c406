"""How a job's `schema` becomes a grammar: the schema as the grammar backend (xgrammar) reads it, the options every
engine compiles it with, and the validation-time check that it compiles (no tokenizer needed, so a job file is
checked before anything runs). xgrammar is imported only by that check: the rest is plain JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipeline.errors import SchemaError
from pipeline.structured.schema import check_schema, subschemas

# Every character a JSON value of a supported schema needs, beyond the content of strings.
JSON_CHARACTERS = '{}[]",:-+.0123456789eE' + "truefalsn"
# How every engine compiles a schema: no whitespace between tokens (a weak or random model otherwise emits it until
# max_new_tokens), compact separators. vLLM's `disable_any_whitespace: True` is exactly this.
GRAMMAR_OPTIONS: dict[str, Any] = {"any_whitespace": False, "separators": (",", ":")}


def grammar_schema(schema: Any) -> Any:
    r"""The schema as we hand it to xgrammar: equal in meaning, working around xgrammar 0.2.9's length-bounded strings.

    xgrammar turns a string with minLength/maxLength (and no pattern/format) into the rule  [^"\\\r\n]{min,max}
    between quotes, which lets raw control characters U+0000-U+001F through: invalid JSON (the tiny model emits U+0013
    within 20 samples). The same string written as the pattern  ^[^\x00-\x1f"\\]{min,max}$  compiles correctly (no
    escapes, as before).
    """
    if isinstance(schema, list):
        return [grammar_schema(v) for v in schema]
    if not isinstance(schema, Mapping):
        return schema
    node = {k: grammar_schema(v) for k, v in schema.items()}
    types = node.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    if is_string and ("minLength" in node or "maxLength" in node) and "pattern" not in node and "format" not in node:
        low, high = node.pop("minLength", 0), node.pop("maxLength", "")
        node["pattern"] = '^[^\\x00-\\x1f"\\\\]{' + f"{low},{high}" + "}$"
    return node


def schema_text(schema: Mapping[str, Any]) -> str:
    """The schema as xgrammar reads it; keys keep their order (properties are generated in declared order)."""
    return json.dumps(grammar_schema(schema), separators=(",", ":"), ensure_ascii=False)


def backend_message(err: Exception) -> str:
    """xgrammar's RuntimeError text without its '[time] /project/cpp/file.cc:NN: ' prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


def check_grammar(schema: Mapping[str, Any]) -> None:
    """SchemaError unless the schema is supported (schema.check_schema) and xgrammar compiles it. No tokenizer
    needed: this is the validation-time check. The failing construct is located by compiling each subschema."""
    import xgrammar as xgr

    check_schema(schema)
    try:
        xgr.Grammar.from_json_schema(schema_text(schema), **GRAMMAR_OPTIONS)
        return
    except Exception as err:  # noqa: BLE001 - xgrammar raises RuntimeError with a C++ location prefix
        whole = err
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    culprit = "$"
    for path, sub in subschemas(schema):  # root first: the last one that fails is the deepest
        try:
            xgr.Grammar.from_json_schema(schema_text({**defs, **sub}), **GRAMMAR_OPTIONS)
        except Exception:  # noqa: BLE001
            culprit = path
    raise SchemaError(f"the grammar backend (xgrammar) cannot compile this schema: {backend_message(whole)}", culprit)
