"""http(s) inputs (URL lists): whole objects fetched politely and with our own policy, not fsspec's.

requests and urllib3 do the work: a timeout to connect and for each read, retries of timeouts, lost connections,
429 and 5xx with exponential backoff and jitter (a Retry-After header is honoured, up to MAX_WAIT_S), and a pool
per host that blocks beyond `max_per_host` connections: at most that many requests in flight to one host from one
process (a worker process's CPU tasks fetch one sample at a time, so across a cluster the bound is the number of
CPU workers times this). 404 and 410 raise FileNotFoundError (`not_found` rows); other failures OSError naming
the status or the cause (`read_error` rows).

Redirects are followed by hand (at most MAX_REDIRECTS), each target checked by the caller's rule first; every
connection's peer address is checked before a byte is sent, so a name resolving to a link-local or metadata
address (io/confine.py) is refused however it was reached. Behind a proxy (HTTP(S)_PROXY) the peer is the proxy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from itertools import takewhile
from typing import Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from pipeline.io.confine import RefusedInput, refused_address

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
NOT_FOUND_STATUSES = frozenset({404, 410})
MAX_WAIT_S = 60.0  # the longest backoff, and the longest Retry-After honoured
MAX_REDIRECTS = 5
HOST_POOLS = 64  # hosts whose connections one process keeps open at once
USER_AGENT = "internvl-batch (batch image annotation)"


class HttpStatusError(OSError):
    """An http(s) answer that is neither the object nor `not found`, after the retries."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Retry(Retry):
    """urllib3's Retry, waiting before the first retry too (urllib3 does not) and capping Retry-After."""

    def get_backoff_time(self) -> float:
        errors = len(list(takewhile(lambda h: h.redirect_location is None, reversed(self.history))))
        if errors == 0:
            return 0.0
        base = min(self.backoff_max, self.backoff_factor * 2 ** (errors - 1))
        return base + random.uniform(0, base)  # jitter: workers throttled together do not return together

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), MAX_WAIT_S)


def _checked(sock: Any) -> Any:
    """The socket of a new connection, if its peer may be read from; else closed, before any request is sent."""
    reason = refused_address(sock.getpeername()[0])
    if reason:
        sock.close()
        raise RefusedInput(f"the host name resolved to {reason}")
    return sock


class _CheckedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> Any:
        return _checked(super()._new_conn())


class _CheckedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> Any:
        return _checked(super()._new_conn())


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _CheckedAdapter(HTTPAdapter):
    """requests' adapter whose pools make checked connections."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _CheckedHTTPPool, "https": _CheckedHTTPSPool}


class HttpReader:
    """GETs whole http(s) objects with the job's `http` settings; one per process and settings (`http_reader`)."""

    def __init__(self, *, timeout_s: float, attempts: int, backoff_s: float, max_per_host: int) -> None:
        self.timeout = (timeout_s, timeout_s)  # to connect, and between two reads of the answer
        self.attempts = attempts
        retry = _Retry(total=attempts - 1, status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET"}),
                       backoff_factor=backoff_s, backoff_max=MAX_WAIT_S, raise_on_status=False, redirect=False)
        adapter = _CheckedAdapter(pool_connections=HOST_POOLS, pool_maxsize=max_per_host, pool_block=True,
                                  max_retries=retry)
        self.session = requests.Session()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = USER_AGENT

    def get(self, url: str, allow: Callable[[str], str | None] = lambda url: None, limit: int | None = None) -> bytes:
        """The object's bytes (its first `limit` bytes at most, if given). `allow(url)` names why a redirect target
        may not be read (None: it may). Raises FileNotFoundError, HttpStatusError, RefusedInput or OSError
        (timeouts, lost connections)."""
        headers = {"Range": f"bytes=0-{limit - 1}"} if limit else None
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with self.session.get(url, timeout=self.timeout, allow_redirects=False, stream=True,
                                      headers=headers) as answer:
                    if not answer.is_redirect:
                        return self._content(answer, limit)
                    target = urljoin(url, answer.headers["Location"])
            except requests.RequestException as err:
                raise OSError(_cause(err)) from None
            reason = allow(target)
            if reason:
                raise RefusedInput(f"{url} redirects elsewhere: {reason}")
            url = target
        raise HttpStatusError(0, f"more than {MAX_REDIRECTS} redirects")

    def _content(self, answer: requests.Response, limit: int | None) -> bytes:
        status = answer.status_code
        if status in NOT_FOUND_STATUSES:
            raise FileNotFoundError(f"HTTP {status} {answer.reason}: {answer.url}")
        if status >= 400:
            tries = f" after {self.attempts} tries" if status in RETRY_STATUSES else ""
            raise HttpStatusError(status, f"HTTP {status} {answer.reason}{tries}")
        if limit is None:
            return answer.content
        head = bytearray()  # a server may ignore the Range header: read no further than asked
        for chunk in answer.iter_content(min(limit, 65536)):
            head += chunk
            if len(head) >= limit:
                break
        return bytes(head[:limit])


def _cause(err: requests.RequestException) -> str:
    """What made a request fail, in words (without the connection pool's repr), and after how many tries."""
    cause: Any = err.args[0] if err.args else err
    tries = isinstance(cause, MaxRetryError)
    cause = getattr(cause, "reason", None) or cause
    words = re.sub(r"^(\w+\([^)]*\)|<[^>]*>): ", "", str(cause))  # the pool or connection it happened in
    return f"{type(cause).__name__}: {words}" + (" (every try)" if tries else "")


_READERS: dict[tuple, HttpReader] = {}  # per process: one session (connection pools, per-host limits) per settings


def http_reader(**settings: Any) -> HttpReader:
    """The process's HttpReader for these settings (made on first use: a stage's constructor stays cheap)."""
    key = tuple(sorted(settings.items()))
    if key not in _READERS:
        _READERS[key] = HttpReader(**settings)
    return _READERS[key]
