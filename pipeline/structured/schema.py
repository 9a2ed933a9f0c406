"""A job's `schema:` (JSON Schema): loading it and checking it lies in the subset we support, naming what does not.

The supported subset is the one that maps onto Arrow types (pipeline/structured/answers.py) and that the grammar backend
(xgrammar, pipeline/structured/grammar.py, pipeline/model/constrained.py) enforces:

    type object  (properties, required, additionalProperties: false)   -> struct<...> in `properties` order
    type array   (items, minItems, maxItems)                            -> list<item>
    type string  (minLength, maxLength | pattern | format)              -> string
    type integer (minimum, maximum, exclusive*, multipleOf)             -> int64
    type number  (minimum, maximum, exclusive*)                         -> float64
    type boolean                                                        -> bool
    enum / const of strings | integers | numbers | booleans             -> string | int64 | float64 | bool
    nullable: type [T, "null"], anyOf/oneOf [T, {type: null}], enum with null -> T (Arrow fields are nullable)
    $ref to "#/$defs/..." or "#/definitions/..." (acyclic); allOf with a single subschema
    annotations anywhere: title, description, default, examples, $comment, deprecated, readOnly, writeOnly

Everything else raises SchemaError naming the construct and its JSON path, e.g.
    schema $.properties.tags: oneOf of different types (string | integer) cannot become one Arrow type

Pure: json, re, fsspec (only to read a schema file) and jsonschema (to check it is a valid JSON Schema).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import SchemaError

__all__ = ["Resolver", "check_schema", "child_path", "effective", "load_schema", "node_type", "root_kind", "subschemas"]

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id", "$defs", "definitions"})
COMMON = frozenset({"type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf"}) | ANNOTATIONS
BY_TYPE = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "boolean": frozenset(),
}
ALL_TYPE_KEYWORDS = frozenset().union(*BY_TYPE.values())
# Known JSON Schema keywords we refuse, with the reason the user sees.
UNSUPPORTED = {
    "patternProperties": "objects keyed by pattern have no fixed fields, so no Arrow struct",
    "propertyNames": "objects keyed by pattern have no fixed fields, so no Arrow struct",
    "dependentSchemas": "conditional object shapes cannot become one Arrow struct",
    "dependentRequired": "conditional required fields are not enforced by the grammar",
    "dependencies": "conditional object shapes cannot become one Arrow struct",
    "unevaluatedProperties": "use additionalProperties: false",
    "unevaluatedItems": "give items one schema",
    "minProperties": "list the fields that must be there in required",
    "maxProperties": "an object's fields are its properties",
    "prefixItems": "tuples of mixed types cannot become an Arrow list",
    "additionalItems": "tuples of mixed types cannot become an Arrow list",
    "contains": "not enforced by the grammar",
    "minContains": "not enforced by the grammar",
    "maxContains": "not enforced by the grammar",
    "uniqueItems": "not enforced by the grammar",
    "not": "not enforced by the grammar",
    "if": "conditional schemas cannot become one Arrow type",
    "then": "conditional schemas cannot become one Arrow type",
    "else": "conditional schemas cannot become one Arrow type",
    "$dynamicRef": "use $ref to #/$defs/...",
    "$recursiveRef": "recursive schemas have no finite Arrow type",
    "$anchor": "use $ref to #/$defs/...",
    "contentEncoding": "not enforced by the grammar",
    "contentMediaType": "not enforced by the grammar",
}
# String formats xgrammar enforces (the list vLLM 0.32 keeps for its xgrammar backend); others it silently ignores.
STRING_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                            "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
# Regex constructs the grammar backend ignores or rejects (xgrammar 0.2: lookaround ignored, backreferences fail).
_REGEX_UNSUPPORTED = [
    (re.compile(r"\(\?<?[=!]"), "lookahead/lookbehind"),
    (re.compile(r"\\[1-9]|\\k<"), "backreference"),
]


# --------------------------------------------------------------------------------------------------------- loading


def load_schema(value: Any, storage_options: Mapping[str, Any] | None = None, *,
                base: str | Path | None = None) -> dict[str, Any]:
    """The job's `schema:` as a dict: an inline mapping, a JSON string, or a local path or fsspec URL of a .json file.

    A relative local path is taken from `base` (the job file's folder) when given. Only loads (and checks it is a JSON
    object); check_schema says whether we support it.
    """
    if isinstance(value, Mapping):
        return copy.deepcopy(dict(value))
    if not isinstance(value, (str, bytes)) or not str(value).strip():
        raise SchemaError(f"expected a JSON Schema mapping, a JSON string or a path/URL to a .json file, "
                          f"got {type(value).__name__}")
    text = value.decode() if isinstance(value, bytes) else value
    if text.lstrip().startswith("{"):
        source = "inline JSON"
    else:
        source = text.strip()
        local = "://" not in source and not Path(source).is_absolute()
        text = _read_text(str(Path(base) / source) if local and base is not None else source, storage_options)
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        raise SchemaError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise SchemaError(f"{source} holds a JSON {type(loaded).__name__}, not a JSON Schema object")
    return loaded


def _read_text(location: str, storage_options: Mapping[str, Any] | None) -> str:
    import fsspec  # a main dependency; imported here so checking schemas never needs it

    try:
        fs, path = fsspec.core.url_to_fs(location, **dict(storage_options or {}))
        with fs.open(path, "rb") as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise SchemaError(f"schema file {location} not found") from None
    except Exception as err:  # noqa: BLE001 - any storage failure: say where and why
        raise SchemaError(f"could not read schema file {location}: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------------------------------- walking/checking


def child_path(path: str, key: str | int) -> str:
    """The JSON path of a key or index below `path`: $.a, $[0], $["a b"]."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", key) else f"{path}[{json.dumps(key)}]"


class Resolver:
    """Local $ref resolution ("#/$defs/x", "#/definitions/x", "#") with cycle detection."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def resolve(self, ref: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"$ref {ref!r}: only local references (#/$defs/...) are supported", path)
        node: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                raise SchemaError(f"$ref {ref!r} points at nothing", path)
            node = node[part]
        if not isinstance(node, Mapping):
            raise SchemaError(f"$ref {ref!r} does not point at a schema", path)
        return node


def effective(node: Any, path: str, resolver: Resolver,
              refs: tuple[str, ...]) -> tuple[Mapping[str, Any], bool, tuple[str, ...]]:
    """(the schema a node stands for, whether null is also allowed, the $refs followed) after $ref, single allOf and
    nullable unions; anything else is returned as is."""
    if node is True or node == {}:
        raise SchemaError("an unconstrained value (true or {}) has no Arrow type; give it a type", path)
    if not isinstance(node, Mapping):
        raise SchemaError(f"expected a schema object, got {json.dumps(node)}", path)
    nullable = False
    while True:
        if "$ref" in node:
            extra = set(node) - ANNOTATIONS - {"$ref"}
            if extra:
                raise SchemaError(f"$ref next to {sorted(extra)}: put those keywords in the referenced schema", path)
            ref = node["$ref"]
            if ref in refs:
                raise SchemaError(f"$ref cycle {' -> '.join([*refs[refs.index(ref):], ref])}: recursive schemas have "
                                  f"no finite Arrow type", path)
            refs = (*refs, ref)
            node = resolver.resolve(ref, path)
            continue
        if "allOf" in node:
            branches = node["allOf"]
            if not isinstance(branches, list) or len(branches) != 1 or set(node) - ANNOTATIONS - {"allOf"}:
                raise SchemaError("allOf (intersection of schemas) is not supported, except a single subschema", path)
            node = branches[0]
            if not isinstance(node, Mapping):
                raise SchemaError("allOf[0] is not a schema object", path)
            continue
        union = "anyOf" if "anyOf" in node else "oneOf" if "oneOf" in node else None
        if union:
            branches = node[union]
            if not isinstance(branches, list) or not branches:
                raise SchemaError(f"{union} must be a non-empty list of schemas", path)
            if set(node) - ANNOTATIONS - {union}:
                raise SchemaError(f"{union} next to {sorted(set(node) - ANNOTATIONS - {union})} is not supported", path)
            rest = [b for b in branches if not (isinstance(b, Mapping) and b.get("type") == "null" and len(
                set(b) - ANNOTATIONS) == 1)]
            nullable |= len(rest) < len(branches)
            if len(rest) != 1:
                kinds = " | ".join(_describe(b) for b in rest)
                raise SchemaError(f"{union} of different types ({kinds}) cannot become one Arrow type; only "
                                  f"[T, {{\"type\": \"null\"}}] unions are supported", path)
            node = rest[0]
            if not isinstance(node, Mapping):
                raise SchemaError(f"{union} branch is not a schema object", path)
            continue
        return node, nullable, refs


def _describe(node: Any) -> str:
    if isinstance(node, Mapping):
        if "type" in node:
            return "/".join(node["type"]) if isinstance(node["type"], list) else str(node["type"])
        if "enum" in node:
            return "enum"
        if "$ref" in node:
            return str(node["$ref"])
    return json.dumps(node)[:40]


def _scalar_kind(values: Sequence[Any], what: str, path: str) -> tuple[str, bool]:
    """(JSON type, nullable) of enum/const values."""
    kinds = set()
    nullable = False
    for v in values:
        if v is None:
            nullable = True
        elif isinstance(v, bool):
            kinds.add("boolean")
        elif isinstance(v, int):
            kinds.add("integer")
        elif isinstance(v, float):
            kinds.add("number")
        elif isinstance(v, str):
            kinds.add("string")
        else:
            raise SchemaError(f"{what} value {json.dumps(v)} is not a string, number or boolean; enums of objects "
                              f"or arrays have no Arrow type", path)
    if kinds == {"integer", "number"}:
        kinds = {"number"}
    if len(kinds) > 1:
        raise SchemaError(f"{what} mixes {' and '.join(sorted(kinds))} values, which cannot become one Arrow type",
                          path)
    if not kinds:
        raise SchemaError(f"{what} needs at least one non-null value", path)
    return kinds.pop(), nullable


def node_type(node: Mapping[str, Any], path: str) -> tuple[str, bool]:
    """(JSON type, nullable) of an effective (no $ref/union) schema node; checks its keywords."""
    for key in node:
        if key in UNSUPPORTED:
            raise SchemaError(f"{key} is not supported: {UNSUPPORTED[key]}", child_path(path, key))
        if key not in COMMON and key not in ALL_TYPE_KEYWORDS:
            raise SchemaError(f"unknown or unsupported keyword {key!r}", child_path(path, key))
    nullable = False
    if "enum" in node or "const" in node:
        what = "enum" if "enum" in node else "const"
        values = node["enum"] if what == "enum" else [node["const"]]
        if not isinstance(values, list) or not values:
            raise SchemaError("enum must be a non-empty list", child_path(path, what))
        kind, nullable = _scalar_kind(values, what, child_path(path, what))
        declared = node.get("type")
        if declared is not None:
            types = declared if isinstance(declared, list) else [declared]
            nonnull = [t for t in types if t != "null"]
            if nonnull and nonnull != [kind] and not (kind == "integer" and nonnull == ["number"]):
                raise SchemaError(f"{what} values are {kind} but type says {declared!r}", path)
            kind = nonnull[0] if nonnull else kind
    else:
        if "type" not in node:
            raise SchemaError("schema without a type (or enum/const) has no Arrow type", path)
        declared = node["type"]
        types = declared if isinstance(declared, list) else [declared]
        nullable = "null" in types
        nonnull = [t for t in types if t != "null"]
        if not nonnull:
            raise SchemaError('type "null" alone has no Arrow type; use [T, "null"] for a nullable T',
                              child_path(path, "type"))
        if len(nonnull) != 1:
            raise SchemaError(f"type {json.dumps(declared)}: unions of types cannot become one Arrow type; "
                              f"only [T, \"null\"] is supported", child_path(path, "type"))
        kind = nonnull[0]
        if kind not in BY_TYPE:
            raise SchemaError(f"unknown type {kind!r} (expected one of {', '.join(BY_TYPE)})", child_path(path, "type"))
    misplaced = (set(node) & ALL_TYPE_KEYWORDS) - BY_TYPE[kind]
    if misplaced:
        raise SchemaError(f"keyword(s) {sorted(misplaced)} do not apply to type {kind}", path)
    _check_keywords(node, kind, path)
    return kind, nullable


def _check_keywords(node: Mapping[str, Any], kind: str, path: str) -> None:
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in node and not (isinstance(node[key], int) and not isinstance(node[key], bool) and node[key] >= 0):
            raise SchemaError(f"{key} must be a non-negative integer", child_path(path, key))
    for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minimum", "maximum")):
        if lo in node and hi in node and node[lo] > node[hi]:
            raise SchemaError(f"{lo} {node[lo]} is greater than {hi} {node[hi]}: no value fits", path)
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        if key in node and (isinstance(node[key], bool) or not isinstance(node[key], (int, float))):
            raise SchemaError(f"{key} must be a number", child_path(path, key))
    if "multipleOf" in node and node["multipleOf"] <= 0:
        raise SchemaError("multipleOf must be positive", child_path(path, "multipleOf"))
    if "pattern" in node:
        pattern = node["pattern"]
        if not isinstance(pattern, str):
            raise SchemaError("pattern must be a string", child_path(path, "pattern"))
        for regex, what in _REGEX_UNSUPPORTED:
            if regex.search(pattern):
                raise SchemaError(f"pattern {pattern!r} uses a {what}, which the grammar backend cannot enforce",
                                  child_path(path, "pattern"))
        try:
            re.compile(pattern)
        except re.error as err:
            raise SchemaError(f"pattern {pattern!r} is not a valid regular expression: {err}",
                              child_path(path, "pattern")) from None
    lengths = [k for k in ("minLength", "maxLength") if k in node]
    if lengths and ("pattern" in node or "format" in node):
        other = "pattern" if "pattern" in node else "format"
        raise SchemaError(f"{'/'.join(lengths)} together with {other} is not enforced by the grammar backend (it "
                          f"keeps only the {other}); put the length into the pattern, e.g. ^[a-z]{{1,20}}$", path)
    if "format" in node and (not isinstance(node["format"], str) or node["format"] not in STRING_FORMATS):
        raise SchemaError(f"format {node['format']!r} is not enforced by the grammar backend (supported: "
                          f"{', '.join(sorted(STRING_FORMATS))}); use a pattern", child_path(path, "format"))
    if kind == "number" and "multipleOf" in node:
        raise SchemaError("multipleOf on a number is not enforced by the grammar backend (only on integers)",
                          child_path(path, "multipleOf"))
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, Mapping) or not props:
            raise SchemaError("object without properties (a map of arbitrary keys) cannot become an Arrow struct; "
                              "list its fields in properties", path)
        extra = node.get("additionalProperties", False)
        if extra is not False:
            raise SchemaError("additionalProperties other than false (a map of arbitrary keys) cannot become an Arrow "
                              "struct", child_path(path, "additionalProperties"))
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("required must be a list of property names", child_path(path, "required"))
        missing = [r for r in required if r not in props]
        if missing:
            raise SchemaError(f"required names {missing} that are not in properties", child_path(path, "required"))
    if kind == "array" and not isinstance(node.get("items"), Mapping):
        raise SchemaError("array needs items: one schema for every element", path)


def subschemas(schema: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(JSON path, effective schema) of every node, root first (checked as it goes; raises SchemaError)."""
    resolver = Resolver(schema)

    def walk(node: Any, path: str, refs: tuple[str, ...]) -> Iterator[tuple[str, Mapping[str, Any]]]:
        eff, _, refs = effective(node, path, resolver, refs)
        kind, _ = node_type(eff, path)
        yield path, eff
        if kind == "object":
            props_path = child_path(path, "properties")
            for name, sub in eff["properties"].items():
                yield from walk(sub, child_path(props_path, name), refs)
        elif kind == "array":
            yield from walk(eff["items"], child_path(path, "items"), refs)

    if not isinstance(schema, Mapping):
        raise SchemaError(f"a schema must be a JSON object, got {type(schema).__name__}")
    return walk(schema, "$", ())


def check_schema(schema: Mapping[str, Any]) -> None:
    """Raise SchemaError (naming the construct and its JSON path) unless the schema is in the supported subset."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError as JsonSchemaError

    for _ in subschemas(schema):
        pass
    try:
        Draft202012Validator.check_schema(schema)
    except JsonSchemaError as err:
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.path)
        raise SchemaError(f"not a valid JSON Schema: {err.message}", path) from None


def root_kind(schema: Mapping[str, Any]) -> str | None:
    """The JSON type of the schema's root value (object, array, string, integer, number, boolean); None if
    unsupported."""
    try:
        eff, _, _ = effective(schema, "$", Resolver(schema), ())
        return node_type(eff, "$")[0]
    except SchemaError:
        return None
