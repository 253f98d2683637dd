"""Graceful shutdown over real HTTP (in-process server, fake engine): requests arriving while
the server drains get 503 with ``Retry-After``, running streams finish within the grace
period, and what is still running after it ends with an error event and ``[DONE]`` (streams)
or a 503 (non-streaming).  The engine's pace is held by a gate or by its step delay, never
by the test's own timing."""

import json
import threading

import httpx

from tests.serve.conftest import gated, wait_until


class Stream(threading.Thread):
    """A streamed completion read on a thread: ``events`` (parsed ``data:`` payloads)."""

    def __init__(self, url, max_tokens):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events, self.status = [], None

    def run(self):
        body = {"model": "fake", "prompt": "a", "max_tokens": self.max_tokens, "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line:
                    assert line.startswith("data: "), line
                    data = line[len("data: "):]
                    self.events.append(data if data == "[DONE]" else json.loads(data))


class Post(threading.Thread):
    """A non-streaming completion on a thread: ``response``."""

    def __init__(self, url, max_tokens):
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.response = url, max_tokens, None

    def run(self):
        self.response = httpx.post(self.url + "/v1/completions", timeout=120, json={
            "model": "fake", "prompt": "a", "max_tokens": self.max_tokens})


def test_running_stream_finishes_in_the_grace_period_new_requests_get_503(fake_server):
    srv, sched, _ = fake_server(max_slots=2, shutdown_timeout=120)
    go = gated(sched)  # the engine steps only once ``go`` is set
    stream = Stream(srv.url, 20)
    stream.start()
    wait_until(lambda: sched.stats()["running"] == 1, timeout=60)
    stopper = threading.Thread(target=srv.stop, daemon=True)
    stopper.start()
    wait_until(lambda: sched.stats()["closed"], timeout=60)

    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"model": "fake", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "server_error"
    assert "shutting down" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 120
    health = httpx.get(srv.url + "/health", timeout=60)  # load balancers: stop sending
    assert health.status_code == 503 and health.json()["status"] == "shutting down"
    assert not stream.events  # still held by the gate

    go.set()
    stream.join(120)
    stopper.join(180)
    assert not stopper.is_alive() and not stream.is_alive()
    chunks, done = stream.events[:-1], stream.events[-1]
    assert stream.status == 200 and done == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "bcdefghijklmnopqrstu"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not sched.alive and sched.idle


def test_after_the_grace_period_streams_end_with_an_error_and_done(fake_server):
    # 0.05 s a decode step: 200 tokens take 10 s at least, far beyond the 0.5 s of grace
    srv, sched, _ = fake_server(max_slots=2, step_delay=0.05, shutdown_timeout=0.5)
    stream, running = Stream(srv.url, 200), Post(srv.url, 200)
    stream.start()
    running.start()
    wait_until(lambda: stream.events and sched.stats()["running"] == 2, timeout=60)
    waiting = Post(srv.url, 5)  # no slot left: it waits in the queue
    waiting.start()
    wait_until(lambda: sched.stats()["waiting"] == 1, timeout=60)

    srv.stop()
    for t in (stream, running, waiting):
        t.join(120)
        assert not t.is_alive()
    *chunks, error, done = stream.events
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert error["error"]["message"] == "the server is shutting down"
    assert error["error"]["type"] == "server_error"
    assert done == "[DONE]"
    for t in (running, waiting):
        assert t.response.status_code == 503
        assert t.response.json()["error"]["message"] == "the server is shutting down"
    assert not sched.alive and sched.idle and sched.stats()["blocks_used"] == 0
