"""One input URI's bytes, read only where the job's rule allows (io/confine.py): http(s) URLs through io/http.py
(our timeout, retry and per-host policy), any other URL or path through fsspec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.io.confine import HTTP_SCHEMES, InputRule, RefusedInput, refusal, scheme_of
from pipeline.io.http import http_reader
from pipeline.io.storage import get_filesystem, read_bytes


def read_input(uri: str, *, rule: InputRule, storage: Mapping[str, Any], http: Mapping[str, Any],
               limit: int | None = None) -> bytes:
    """The whole object (its first `limit` bytes, if given), or RefusedInput naming the rule (nothing read);
    FileNotFoundError or OSError as stores raise them. `http`: HttpReader's settings (the job's `http` section)."""
    reason = refusal(uri, rule)
    if reason:
        raise RefusedInput(reason)
    if scheme_of(uri) in HTTP_SCHEMES:
        return http_reader(**http).get(uri, allow=lambda target: refusal(target, rule), limit=limit)
    if limit is None:
        return read_bytes(uri, storage)
    fs, path = get_filesystem(uri, storage)
    return fs.cat_file(path, start=0, end=limit)
