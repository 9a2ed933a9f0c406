"""URL lists: http(s) inputs against a local server on 127.0.0.1 (started here, stopped by the fixture, daemon
threads): 200, 404, 429 then 200 (Retry-After honoured), 5xx, a slow answer (timeout), per-host concurrency,
redirects checked by the rule, and the connected address checked before a request is sent."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from pipeline.config import parse_job
from pipeline.io import http as http_module
from pipeline.io.confine import RefusedInput
from pipeline.io.http import HttpReader, HttpStatusError, _Retry
from pipeline.stages.preprocess import Preprocess


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


class Server:
    """A local HTTP server whose answers depend on the path; it records every request (path, time)."""

    def __init__(self) -> None:
        self.image = png()
        self.requests: list[tuple[str, float]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def answer(self, status, body=b"", headers=()):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                with server.lock:
                    server.requests.append((self.path, time.monotonic()))
                    tries = sum(1 for p, _ in server.requests if p == self.path)
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    server.route(self, tries)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def route(self, handler, tries: int) -> None:
        path = handler.path
        if path.startswith("/ok"):
            return handler.answer(200, self.image, [("Content-Type", "image/png")])
        if path.startswith("/busy-once"):  # 429 with Retry-After: 1, then the image
            return handler.answer(429, b"slow down", [("Retry-After", "1")]) if tries == 1 else handler.answer(200, self.image)
        if path.startswith("/flaky"):  # 503 twice (no Retry-After: backoff), then the image
            return handler.answer(503) if tries <= 2 else handler.answer(200, self.image)
        if path.startswith("/broken"):
            return handler.answer(500, b"oops")
        if path.startswith("/forbidden"):
            return handler.answer(403)
        if path.startswith("/slow"):
            time.sleep(3)
            return handler.answer(200, self.image)
        if path.startswith("/busy"):  # a little work, to measure concurrency
            time.sleep(0.3)
            return handler.answer(200, self.image)
        if path.startswith("/redirect-here"):
            return handler.answer(302, headers=[("Location", "/ok/target.png")])
        if path.startswith("/redirect-away"):
            return handler.answer(302, headers=[("Location", "http://127.0.0.1:9/secret.png")])
        return handler.answer(404, b"no")

    def count(self, prefix: str) -> int:
        return sum(1 for p, _ in self.requests if p.startswith(prefix))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    with Server() as s:
        yield s


FAST = {"timeout_s": 0.5, "attempts": 3, "backoff_s": 0.05, "max_per_host": 8}


def test_ok_not_found_and_refused_statuses(server):
    reader = HttpReader(**FAST)
    assert reader.get(f"{server.url}/ok/a.png") == server.image
    with pytest.raises(FileNotFoundError, match="HTTP 404"):
        reader.get(f"{server.url}/missing.png")
    assert server.count("/missing") == 1  # not retried
    with pytest.raises(HttpStatusError, match="HTTP 403") as info:
        reader.get(f"{server.url}/forbidden.png")
    assert info.value.status == 403 and server.count("/forbidden") == 1
    with pytest.raises(HttpStatusError, match="HTTP 500 .*after 3 tries") as info:
        reader.get(f"{server.url}/broken.png")
    assert info.value.status == 500 and server.count("/broken") == 3


def test_a_head_reads_no_further_than_asked(server):
    """The plan's estimate reads image headers: a Range request, and no more bytes even if the server sends all."""
    assert HttpReader(**FAST).get(f"{server.url}/ok/a.png", limit=100) == server.image[:100]


def test_429_then_200_waits_as_retry_after_says(server):
    reader = HttpReader(**FAST)
    assert reader.get(f"{server.url}/busy-once.png") == server.image
    (first, t0), (second, t1) = server.requests
    assert first == second == "/busy-once.png"
    assert t1 - t0 >= 0.95  # Retry-After: 1, not the 0.05 s backoff


def test_5xx_backs_off_with_jitter(server):
    reader = HttpReader(**{**FAST, "backoff_s": 0.2})
    assert reader.get(f"{server.url}/flaky.png") == server.image
    times = [t for p, t in server.requests if p == "/flaky.png"]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4  # 0.2, then 0.4, each plus up to as much


def test_backoff_doubles_with_jitter_and_retry_after_is_capped():
    retry = _Retry(total=5, backoff_factor=1.0, backoff_max=60.0)
    for n, base in ((1, 1.0), (2, 2.0), (3, 4.0)):
        history = tuple(object.__new__(type("H", (), {"redirect_location": None})) for _ in range(n))
        waits = [retry.new(history=history).get_backoff_time() for _ in range(200)]
        assert base <= min(waits) and max(waits) <= 2 * base and len(set(waits)) > 1
    assert retry.parse_retry_after("3600") == 60.0 and retry.parse_retry_after("2") == 2


def test_a_slow_answer_times_out_after_every_try(server):
    reader = HttpReader(**{**FAST, "attempts": 2})
    with pytest.raises(OSError, match="(?i)timed out.*every try"):
        reader.get(f"{server.url}/slow.png")
    assert server.count("/slow") == 2


def test_at_most_max_per_host_requests_in_flight(server):
    reader = HttpReader(**{**FAST, "timeout_s": 10, "max_per_host": 2})
    results = []
    threads = [threading.Thread(target=lambda k=k: results.append(reader.get(f"{server.url}/busy/{k}.png")))
               for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and server.count("/busy") == 8
    assert server.most_in_flight <= 2  # (it is 2 unless the machine is too loaded to start two threads in 0.3 s)


def test_redirects_are_checked_by_the_rule(server):
    reader = HttpReader(**FAST)
    own = lambda url: None if url.startswith(server.url) else f"{url} is outside"  # noqa: E731
    assert reader.get(f"{server.url}/redirect-here.png", allow=own) == server.image
    with pytest.raises(RefusedInput, match="127.0.0.1:9/secret.png is outside"):
        reader.get(f"{server.url}/redirect-away.png", allow=own)


def test_the_connected_address_is_checked_before_a_request_is_sent(server, monkeypatch):
    """As a name resolving to 169.254.169.254 would be: here the refused address is 127.0.0.1 (no test sends
    anything off this machine), and the server sees no request."""
    monkeypatch.setattr(http_module, "refused_address",
                        lambda ip: f"{ip} is refused in this test" if ip == "127.0.0.1" else None)
    with pytest.raises(RefusedInput, match="resolved to 127.0.0.1 is refused"):
        HttpReader(**FAST).get(f"{server.url}/ok/a.png")
    assert server.requests == []


def test_a_url_list_through_the_cpu_stage(server, tmp_path):
    """The stage's rows: image, not_found, 429-then-ok, read_error with the status, read_error for a timeout, and a
    host outside the rule (another port) refused as bad_input without a request."""
    job = parse_job({"task": "caption", "input": str(tmp_path / "urls.jsonl"), "output": str(tmp_path / "out"),
                     "model": "m", "allowed_inputs": [f"{server.url}/"],
                     "http": {"timeout_s": 0.5, "attempts": 2, "backoff_s": 0.05}})
    stage = Preprocess(job)
    rows = {name: stage.prepare(f"{server.url}/{name}") for name in
            ("ok/a.png", "missing.png", "busy-once.png", "broken.png", "slow.png")}
    assert rows["ok/a.png"]["status"] == "ok" and rows["ok/a.png"]["width"] == 64
    assert rows["busy-once.png"]["status"] == "ok"
    assert (rows["missing.png"]["error_type"], rows["broken.png"]["error_type"]) == ("not_found", "read_error")
    assert "HTTP 500" in rows["broken.png"]["error_message"]
    assert rows["slow.png"]["error_type"] == "read_error" and "timed out" in rows["slow.png"]["error_message"].lower()
    other = stage.prepare("http://127.0.0.1:9/ok/a.png")
    assert other["error_type"] == "bad_input" and "outside the allowed inputs" in other["error_message"]
    assert server.count("/ok") == 1
