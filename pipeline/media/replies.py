"""The decode child's replies: a JSON header plus raw array buffers, a format whose reading cannot run code.

The child decodes untrusted files; a decoder exploited by one may control the child and send anything. So the
caller never unpickles what comes back: it parses JSON and copies bytes into numeric numpy arrays, checking every
tag, dtype, shape and size on the way. Anything else is `BadReply`.

A value may be None, a bool, int, float or str, a list, a tuple, a dict with str keys, bytes, a numpy scalar (sent
as its Python value), a numpy array of bools, integers, floats or complex numbers (sent out of band: its buffer
lands in fresh, writable memory), or a dataclass registered with `@reply_type` (the caller makes it again only if
its own registry has that name: a reply never names a class to import). In the header a tuple is
`{"$tuple": [...]}`, a dict `{"$dict": {...}}`, bytes `{"$bytes": i}`, an array `{"$array": [i, dtype, shape]}`,
with `i` the index of its buffer after the header, and a registered dataclass `{"$record": [name, {...}]}`.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
from typing import Any, TypeVar

import numpy as np

MAX_HEADER_BYTES = 1 << 20  # the JSON part: tags, shapes, messages and tracebacks
MAX_PARTS = 4096
MAX_REPLY_BYTES = 1 << 34  # 16 GiB: no decoded sample comes near; a larger announced size is a lie
ARRAY_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex: numbers only (no objects, no records)
REPLY_FIELDS = {  # what each kind of reply holds, and of which type (the value of "ok" is checked by decoding)
    "ready": {"pid": int},
    "ok": {"value": object},
    "media_error": {"error_type": str, "message": str, "traceback": str},
    "error": {"type": str, "args": list, "traceback": str},
}


_RECORDS: dict[str, type] = {}  # dataclasses a reply may hold, by module and name (registered on import)
T = TypeVar("T", bound=type)


class BadReply(ValueError):
    """A reply that breaks the format: refused, whatever it holds."""


def reply_type(cls: T) -> T:
    """Class decorator: a dataclass a sandboxed function may return (its fields are sent as values)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    _RECORDS[_record_name(cls)] = cls
    return cls


def _record_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def encode_reply(reply: dict[str, Any]) -> list[bytes | memoryview]:
    """A reply as parts: the JSON header, then the buffers of its arrays and bytes (not copied). Raises TypeError for
    a value the format cannot carry."""
    buffers: list[bytes | memoryview] = []
    header = json.dumps({k: _encode(v, buffers) for k, v in reply.items()}).encode()
    return [header, *buffers]


def _encode(value: Any, buffers: list[bytes | memoryview]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in ARRAY_KINDS:
        return _encode(value.item(), buffers)
    if isinstance(value, np.ndarray) and value.dtype.kind in ARRAY_KINDS:
        data = np.ascontiguousarray(value)
        buffers.append(memoryview(data.reshape(-1).view(np.uint8)))
        return {"$array": [len(buffers), data.dtype.str, list(data.shape)]}
    if isinstance(value, (bytes, bytearray, memoryview)):
        buffers.append(memoryview(value).cast("B"))
        return {"$bytes": len(buffers)}
    if isinstance(value, list):
        return [_encode(v, buffers) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, buffers) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": {k: _encode(v, buffers) for k, v in value.items()}}
    if _RECORDS.get(_record_name(type(value))) is type(value):
        fields = {f.name: _encode(getattr(value, f.name), buffers) for f in dataclasses.fields(value) if f.init}
        return {"$record": [_record_name(type(value)), fields]}
    raise TypeError(f"a sandbox reply cannot carry {type(value).__name__}")


def check_frame(sizes: tuple[int, ...]) -> None:
    """The announced part sizes of a reply, checked before any memory is taken for them."""
    if not 1 <= len(sizes) <= MAX_PARTS:
        raise BadReply(f"{len(sizes)} parts (1 to {MAX_PARTS} allowed)")
    if sizes[0] > MAX_HEADER_BYTES or sum(sizes) > MAX_REPLY_BYTES:
        raise BadReply(f"announced sizes over the limits: header {sizes[0]} bytes, {sum(sizes)} in all")


def decode_reply(parts: list[bytearray]) -> dict[str, Any]:
    """The reply the parts hold, every field checked; BadReply for anything outside the format."""
    try:
        header = json.loads(bytes(parts[0]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BadReply(f"the header is not JSON ({type(err).__name__})") from None
    if not isinstance(header, dict) or header.get("reply") not in REPLY_FIELDS:
        raise BadReply("the header names no known kind of reply")
    fields = REPLY_FIELDS[header["reply"]]
    if set(header) != {"reply", *fields}:
        raise BadReply(f"a {header['reply']!r} reply with fields {sorted(header)}")
    try:
        reply = {k: _decode(v, parts) for k, v in header.items()}
    except RecursionError:
        raise BadReply("the value is nested too deeply") from None
    for name, kind in fields.items():
        if not isinstance(reply[name], kind) or isinstance(reply[name], bool) and kind is int:
            raise BadReply(f"field {name!r} of a {header['reply']!r} reply is not {kind.__name__}")
    return reply


def _decode(node: Any, parts: list[bytearray]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, parts) for v in node]
    if not (isinstance(node, dict) and len(node) == 1):
        raise BadReply(f"unexpected {type(node).__name__} in the header")
    (tag, body), = node.items()
    if tag == "$tuple" and isinstance(body, list):
        return tuple(_decode(v, parts) for v in body)
    if tag == "$dict" and isinstance(body, dict):
        return {k: _decode(v, parts) for k, v in body.items()}
    if tag == "$bytes":
        return bytes(_buffer(body, parts))
    if tag == "$array" and isinstance(body, list) and len(body) == 3:
        return _array(*body, parts)
    if tag == "$record" and isinstance(body, list) and len(body) == 2:
        return _record(*body, parts)
    raise BadReply(f"unknown tag {tag!r}")


def _record(name: Any, fields: Any, parts: list[bytearray]) -> Any:
    cls = _RECORDS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise BadReply(f"{name!r} is not a registered reply type")
    expected = {f.name for f in dataclasses.fields(cls) if f.init}
    if not (isinstance(fields, dict) and set(fields) == expected):
        raise BadReply(f"a {name} needs the fields {sorted(expected)}")
    try:
        return cls(**{k: _decode(v, parts) for k, v in fields.items()})
    except (TypeError, ValueError) as err:  # a __post_init__ that checks its values
        raise BadReply(f"a {name} that cannot be made: {err}") from None


def _buffer(index: Any, parts: list[bytearray]) -> bytearray:
    if not (type(index) is int and 1 <= index < len(parts)):
        raise BadReply(f"buffer index {index!r} out of range")
    return parts[index]


def _array(index: Any, dtype: Any, shape: Any, parts: list[bytearray]) -> np.ndarray:
    buf = _buffer(index, parts)
    try:
        kind = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        kind = None
    if kind is None or kind.kind not in ARRAY_KINDS or kind.hasobject:
        raise BadReply(f"array dtype {dtype!r} is not numeric")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise BadReply(f"array shape {shape!r} is not a list of sizes")
    if math.prod(shape) * kind.itemsize != len(buf):
        raise BadReply(f"array of shape {shape} and dtype {kind} does not fill its {len(buf)} bytes")
    return np.frombuffer(buf, dtype=kind).reshape(shape)  # a bytearray's buffer: writable, owned by the array


def remote_exception(name: str, args: list[Any]) -> Exception | None:
    """The builtin exception a reply names (ValueError, OSError...), made with its args; None for any other name
    (never a class from elsewhere, never BaseException's SystemExit or KeyboardInterrupt, never a function)."""
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    try:
        return cls(*args)
    except Exception:  # noqa: BLE001 - args that do not fit the class (UnicodeDecodeError needs five)
        return None
