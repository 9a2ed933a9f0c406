"""JSON Schemas the structured-annotation tests share, with the Arrow types their answers take."""

from __future__ import annotations

import pyarrow as pa

# enum, integer, boolean, array and nested object (with a bounded number and a nullable field)
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "indoor": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "where": {
            "type": "object",
            "properties": {
                "x": {"type": "number", "minimum": 0, "maximum": 100},
                "label": {"type": "string", "maxLength": 10},
                "note": {"type": ["string", "null"], "maxLength": 5},
            },
            "required": ["x", "label"],
        },
    },
    "required": ["kind", "count", "indoor", "tags", "where"],
}
SCHEMA_TYPE = pa.struct([
    ("kind", pa.string()), ("count", pa.int64()), ("indoor", pa.bool_()), ("tags", pa.list_(pa.string())),
    ("where", pa.struct([("x", pa.float64()), ("label", pa.string()), ("note", pa.string())])),
])
SMALL = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}},
         "required": ["ok", "n"]}
# a value of SCHEMA
GOOD = {"kind": "cat", "count": 3, "indoor": True, "tags": ["a b"], "where": {"x": 1.5, "label": "sofa", "note": None}}
