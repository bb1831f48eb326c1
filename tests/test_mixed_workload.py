"""The mixed-workload load client (``bench/mixed_workload.py``, ``bench/client_pool.py``) against a
small real HTTP server that streams completions as SSE, as kvmesh's ``/v1/completions`` does.

The server (a ``ThreadingHTTPServer`` in a thread of the test process) logs when each request
arrived on the host's monotonic clock, so the client's records can be checked against what the
server saw: every request once, on the client's time origin, from every client process.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from bench.client_pool import run_load, shares
from bench.mixed_workload import Workload

WORKLOAD = Workload(concurrency=4, short_prompt=(4, 8), short_output=(4, 8), long_interval_s=0.5,
                    long_prompt=(20, 30), long_output=3, token_id_range=(10, 500), seed=7)


class _SSEHandler(BaseHTTPRequestHandler):
    """POST /v1/completions: ``max_tokens`` text chunks ``token_gap_s`` apart, a usage chunk, [DONE]
    (HTTP/1.1 chunked, so httpx keeps its connections)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - the http.server name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.log.append((time.perf_counter(), tuple(body["prompt"]), body["max_tokens"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = body["max_tokens"]
        try:
            for _ in range(n):
                time.sleep(self.server.token_gap_s)
                self._event({"choices": [{"index": 0, "text": " x"}]})
            self._event({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}})
            self._write(b"data: [DONE]\n\n")
            self._write(b"")  # the last chunk of the chunked body
        except (BrokenPipeError, ConnectionResetError):  # the client cancelled the stream
            pass

    def _event(self, chunk: dict) -> None:
        self._write(f"data: {json.dumps(chunk)}\n\n".encode())

    def _write(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


class _SSEServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SSEHandler)
        self.log: list[tuple[float, tuple[int, ...], int]] = []  # (arrival perf_counter, prompt, max_tokens)
        self.token_gap_s = 0.005

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client process that exits resets
            super().handle_error(request, client_address)  # its idle keep-alive connections


@pytest.fixture
def sse_server() -> Iterator[_SSEServer]:
    server = _SSEServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: _SSEServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("processes", [2, 1])
def test_every_request_once_on_one_time_origin(sse_server, processes):
    duration_s, drain_s = 2.5, 5.0
    probe: dict = {}
    records, elapsed = run_load(_url(sse_server), "m", WORKLOAD, duration_s, drain_s, probe=probe,
                                processes=processes)
    t0 = probe["t0_monotonic_s"]
    assert isinstance(probe["loop_lags"], list)

    # Exactly the workload's requests, each once, and nothing the server saw is missing.
    short = sorted(r.index for r in records if r.kind == "short")
    assert len(short) == len(set(short)) > 4 * WORKLOAD.concurrency
    if processes == 1:  # one counter shared by the streams, in send order
        assert short == list(range(len(short)))
    else:  # stream s sends s, s + concurrency, s + 2 * concurrency, ... with no gap
        for s in range(WORKLOAD.concurrency):
            mine = [i for i in short if i % WORKLOAD.concurrency == s]
            assert mine == list(range(s, s + WORKLOAD.concurrency * len(mine), WORKLOAD.concurrency)) and mine
    arrivals = WORKLOAD.long_arrivals(duration_s)
    assert sorted(r.index for r in records if r.kind == "long") == list(range(len(arrivals))) and len(arrivals) >= 3
    requests = {}
    for r in records:
        prompt, max_tokens = (WORKLOAD.short if r.kind == "short" else WORKLOAD.long)(r.index)
        assert (r.prompt_tokens, r.max_tokens) == (len(prompt), max_tokens)
        requests[(tuple(prompt), max_tokens)] = r
    assert len(requests) == len(records)
    assert Counter((p, m) for _, p, m in sse_server.log) == Counter(requests.keys())

    # Timed on the parent's origin: the server saw each request when the record says it was sent.
    arrived = {(p, m): at for at, p, m in sse_server.log}
    for key, r in requests.items():
        assert r.ok, r.error
        # A stream sends while less than duration_s has passed; the record's clock starts a moment
        # after that check (the request is built first), so allow a few milliseconds past it.
        assert 0.0 <= r.start_s <= duration_s + 0.02, (r.kind, r.index, r.start_s)
        assert abs(arrived[key] - (t0 + r.start_s)) < 0.25, (r.kind, r.index, arrived[key] - t0, r.start_s)
        assert r.ttft_s is not None and r.ttft_s > 0
        assert len(r.itl_s) == r.num_chunks - 1 == r.max_tokens - 1 and r.completion_tokens == r.max_tokens
        if r.kind == "long":  # sent at the seeded arrival time
            assert abs(r.start_s - arrivals[r.index]) < 0.25
    assert max(r.start_s + r.e2e_s for r in records) == elapsed <= duration_s + drain_s

    if processes == 1:
        assert "workers" not in probe
        return
    # Each worker is its own process and sent exactly its share: streams s % 2, arrivals j % 2.
    workers = probe["workers"]
    assert len({w["pid"] for w in workers}) == 2 and os.getpid() not in {w["pid"] for w in workers}
    for p, (worker, share) in enumerate(zip(workers, shares(WORKLOAD, duration_s, processes))):
        assert share.stream_ids == tuple(range(p, WORKLOAD.concurrency, 2))
        mine = [r for r in records if (r.kind == "short" and r.index % WORKLOAD.concurrency % 2 == p)
                or (r.kind == "long" and r.index % 2 == p)]
        assert worker["num_records"] == len(mine) > 0
        assert worker["num_long"] == sum(r.kind == "long" for r in mine) > 0
    assert sum(w["num_loop_lags"] for w in workers) == len(probe["loop_lags"])
    assert all(w["cpu_s"] > 0 for w in workers)  # measured inside the worker: it has exited by now


def test_requests_running_after_the_drain_are_cancelled(sse_server):
    """Streams of 400 tokens 10 ms apart never end within 1 s of load and 0.5 s of drain: each
    stream's first request and each long prompt are recorded once, as cancelled."""
    sse_server.token_gap_s = 0.01
    workload = Workload(concurrency=4, short_prompt=(4, 8), short_output=(400, 400), long_interval_s=0.4,
                        long_prompt=(20, 30), long_output=400, token_id_range=(10, 500), seed=3)
    duration_s, drain_s = 1.0, 0.5
    probe: dict = {}
    started = time.perf_counter()
    records, elapsed = run_load(_url(sse_server), "m", workload, duration_s, drain_s, probe=probe, processes=2)
    assert time.perf_counter() - started < 15
    num_long = len(workload.long_arrivals(duration_s))
    assert sorted((r.kind, r.index) for r in records) == (
        [("long", j) for j in range(num_long)] + [("short", s) for s in range(workload.concurrency)])
    assert num_long >= 1
    for r in records:
        assert not r.ok and r.error == "cancelled: still running at the end of the drain"
        assert r.ttft_s is not None and r.num_chunks > 0  # it was streaming when cancelled
    assert duration_s + drain_s <= elapsed < duration_s + drain_s + 5  # nothing finished: time to the end
