"""The request guard over real HTTP: body limit (Content-Length and chunked), API keys
before the body, the Host allow-list; /health keeps answering meanwhile."""

import asyncio
import http.client
import json
import statistics
import threading
import time

import httpx
import pytest
from starlette.requests import Request

from optkit.cli import build_parser, main
from optkit.commands.serve import build_app
from optkit.serve import (
    BackgroundServer,
    CharCodec,
    FakeEngine,
    Limits,
    Metrics,
    Scheduler,
    create_app,
)
from optkit.serve.guard import MAX_BODY_BYTES, Guard, host_name

MB = 2**20
BODY = {"model": "fake", "prompt": "ab", "max_tokens": 2}


@pytest.fixture
def server():
    """Factory: a fake-engine server with the guard's options -> BackgroundServer."""
    servers = []

    def make(**kw):
        sched = Scheduler(FakeEngine(max_slots=2, max_len=64), CharCodec(), Limits(),
                          weights=kw.get("api_keys"), metrics=Metrics())
        srv = BackgroundServer(create_app(sched, sched.codec, "fake", **kw)).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


def rejected(srv, reason):
    for line in httpx.get(srv.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(f'optkit_requests_rejected_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def headers_only(srv, path="/v1/completions", **headers):
    """POST with these headers and no body bytes sent: the answer can only come from
    the headers.  -> (status, JSON body, Connection header)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            conn.putheader(k.replace("_", "-"), v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, json.loads(r.read()), r.getheader("connection")
    finally:
        conn.close()


class HealthPoller:
    """GETs /health in a loop on a thread, recording each answer's latency."""

    def __init__(self, srv):
        self.url, self.latencies, self.statuses = srv.url + "/health", [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                t = time.perf_counter()
                self.statuses.append(c.get(self.url).status_code)
                self.latencies.append(time.perf_counter() - t)
                time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)

    def report(self, what):
        ms = sorted(1e3 * x for x in self.latencies)
        print(f"\n{what}: /health answered {len(ms)} times, median {statistics.median(ms):.1f}"
              f" ms, max {ms[-1]:.1f} ms")
        assert ms and set(self.statuses) == {200}


def chunks(total, size=MB, sent=None):
    """``total`` bytes of JSON-ish filler in ``size`` pieces, made lazily; counts into
    ``sent[0]`` what the client got to send."""
    piece = b" " * size
    for i in range(0, total, size):
        if sent is not None:
            sent[0] += min(size, total - i)
        yield piece[:total - i]


def test_declared_oversize_body_is_refused_from_the_headers(server):
    srv = server()
    status, body, connection = headers_only(srv, Content_Length=str(200 * MB))
    assert status == 413 and connection == "close"
    assert body["error"]["code"] == "request_too_large"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert str(MAX_BODY_BYTES) in body["error"]["message"]
    assert rejected(srv, "too_large") == 1


@pytest.mark.parametrize("size_mb", [20, 200])
def test_uploaded_oversize_body_is_refused_while_health_answers(server, size_mb):
    srv = server()
    sent = [0]
    with HealthPoller(srv) as poll:
        time.sleep(0.05)
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       content=chunks(size_mb * MB, sent=sent),
                       headers={"Content-Length": str(size_mb * MB),
                                "Content-Type": "application/json"})
        time.sleep(0.05)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    print(f"\n{size_mb} MB body with Content-Length: 413; the client sent {sent[0] / MB:.0f} MB")
    poll.report(f"{size_mb} MB Content-Length body")


def test_chunked_oversize_body_is_refused_after_the_limit(server):
    srv = server()
    sent = [0]
    with HealthPoller(srv) as poll:
        time.sleep(0.05)
        r = httpx.post(srv.url + "/v1/completions", content=chunks(200 * MB, sent=sent),
                       headers={"Content-Type": "application/json"}, timeout=60)
        time.sleep(0.05)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    assert sent[0] < 100 * MB  # the refusal stopped the upload
    print(f"\n200 MB chunked body: 413 after the client sent {sent[0] / MB:.0f} MB")
    poll.report("200 MB chunked body")
    assert rejected(srv, "too_large") == 1


def test_slow_chunked_body_does_not_block_health(server):
    srv = server()
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    piece = b"x" * MB
    with HealthPoller(srv) as poll:
        for _ in range(MAX_BODY_BYTES // MB):  # up to the limit, slowly
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            time.sleep(0.05)
        conn.send(b"1\r\nx\r\n")  # one byte over
        r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    poll.report("slow chunked body up to the limit")


def test_bodies_up_to_the_limit_pass(server):
    limit = 200
    srv = server(max_body_bytes=limit)
    exact = json.dumps(BODY).encode().ljust(limit)
    for chunked in (False, True):
        content = iter([exact]) if chunked else exact
        r = httpx.post(srv.url + "/v1/completions", content=content, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "cd"
        over = iter([exact, b" "]) if chunked else exact + b" "
        r = httpx.post(srv.url + "/v1/completions", content=over, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert ("transfer-encoding" in r.request.headers) == chunked
    assert rejected(srv, "too_large") == 2


def test_keys_are_checked_before_the_body(server):
    srv = server(api_keys={"sk-a": 1, "sk-hash#secretpart": 2})
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer sk-hash"}):
        status, body, connection = headers_only(srv, Content_Length=str(200 * MB), **auth)
        assert status == 401 and connection == "close"
        assert body["error"]["code"] == "invalid_api_key"
    status, *_ = headers_only(srv, Content_Length=str(200 * MB),
                              Authorization="Bearer sk-hash#secretpart")
    assert status == 413  # a valid key gets as far as the size check
    assert rejected(srv, "auth") == 3 and rejected(srv, "too_large") == 1
    r = httpx.post(srv.url + "/v1/completions", json=BODY, timeout=30,
                   headers={"Authorization": "Bearer sk-hash#secretpart"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "cd"


def test_the_same_routes_need_a_key(server):
    srv = server(api_keys={"sk-a": 1})
    for path in ("/", "/favicon.ico", "/health", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(srv.url + path, timeout=30).status_code == 200, path
    assert httpx.get(srv.url + "/nowhere", timeout=30).status_code == 404
    assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 401
    for path in ("/tokenize", "/detokenize", "/v1/completions", "/v1/chat/completions"):
        r = httpx.post(srv.url + path, json={}, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        r = httpx.post(srv.url + path, json={}, timeout=30,
                       headers={"Authorization": "Bearer sk-a"})
        assert r.status_code == 400, path  # past the guard: the body is validated


def test_keys_under_a_root_path():
    sched = Scheduler(FakeEngine(max_slots=2, max_len=64), CharCodec(), Limits(),
                      metrics=Metrics())
    app = create_app(sched, sched.codec, "fake", api_keys={"sk-a": 1})

    async def get(path, **headers):
        transport = httpx.ASGITransport(app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.get(path, headers=headers)).status_code

    assert asyncio.run(get("/api/v1/models")) == 401
    assert asyncio.run(get("/api/v1/models", Authorization="Bearer sk-a")) == 200
    assert asyncio.run(get("/api/health")) == 503  # open; the engine is not started here


def test_a_protected_route_the_guard_did_not_check_is_refused():
    from optkit.serve.guard import accepted_key
    from optkit.serve.protocol import APIError

    def request(state):
        return Request({"type": "http", "headers": [], "state": state})

    assert accepted_key(request({})) is None  # keys off
    assert accepted_key(request({"api_keys_on": True, "api_key": "sk-a"})) == "sk-a"
    with pytest.raises(APIError) as e:
        accepted_key(request({"api_keys_on": True}))
    assert e.value.status == 401


def test_host_allow_list_on_loopback(server):
    srv = server()
    for host in (f"localhost:{srv.port}", "localhost", f"127.0.0.1:{srv.port}",
                 f"[::1]:{srv.port}", "LOCALHOST."):
        assert httpx.get(srv.url + "/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{srv.port}", "localhost.evil.example"):
        r = httpx.get(srv.url + "/health", headers={"Host": host})
        assert r.status_code == 400, host
        assert r.json()["error"]["code"] == "invalid_host"
    assert rejected(srv, "host") == 3

    srv = server(allowed_hosts=["*"])
    assert httpx.get(srv.url + "/health", headers={"Host": "evil.example"}).status_code == 200

    srv = server(allowed_hosts=["api.example.com", "*.corp.example"])
    for host, status in [("api.example.com:443", 200), ("a.corp.example", 200),
                         (f"localhost:{srv.port}", 200), ("corp.example", 400),
                         ("evil.example", 400)]:
        r = httpx.get(srv.url + "/health", headers={"Host": host})
        assert r.status_code == status, host


async def asgi_status(guard, server_addr, host, extra_headers=()):
    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard.around(ok)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/health", "server": server_addr,
             "headers": [(b"host", host.encode()), *extra_headers]}
    await guard(scope, receive, send)
    return sent[0]["status"]


def test_non_loopback_connections_are_checked_only_with_allowed_hosts():
    def status(allowed, addr, host):
        return asyncio.run(asgi_status(Guard(None, allowed_hosts=allowed), addr, host))

    assert status(None, ("10.1.2.3", 8000), "evil.example") == 200
    assert status(None, ("127.0.0.1", 8000), "evil.example") == 400
    assert status(None, ("::1", 8000), "evil.example") == 400
    assert status(None, ("::ffff:127.0.0.1", 8000), "evil.example") == 400
    assert status(None, ("::ffff:127.0.0.1", 8000), "[::ffff:127.0.0.1]:8000") == 200
    assert status(["api.example.com"], ("10.1.2.3", 8000), "evil.example") == 400
    assert status(["api.example.com"], ("10.1.2.3", 8000), "api.example.com") == 200


def test_unreadable_content_length():
    bad = [(b"content-length", b"12x")]
    assert asyncio.run(asgi_status(Guard(None), ("127.0.0.1", 80), "localhost", bad)) == 400


@pytest.mark.parametrize("value, name", [("Example.com:8080", "example.com"),
                                         ("[::1]:80", "::1"), ("::1", "::1"),
                                         ("localhost.", "localhost")])
def test_host_name(value, name):
    assert host_name(value) == name


def test_bad_options():
    with pytest.raises(ValueError, match="max_body_bytes"):
        Guard(None, max_body_bytes=0)
    with pytest.raises(ValueError, match="allowed_hosts"):
        Guard(None, allowed_hosts=["*example.com"])


def test_cli_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--allowed-hosts" in out and "--max-body-bytes" in out
    assert f"{MAX_BODY_BYTES // MB} MiB" in out
    keys = tmp_path / "keys"
    keys.write_text("sk-hash#secretpart 2\n")
    args = build_parser().parse_args(["serve", "--fake", "--max-body-bytes", "1000",
                                      "--allowed-hosts", "api.example.com", "*.corp.example",
                                      "--api-keys", str(keys)])
    guard = build_app(args).user_middleware[0].cls.__self__
    assert isinstance(guard, Guard) and guard.max_body_bytes == 1000
    assert guard.hosts == {"api.example.com"} and guard.domains == (".corp.example",)
    assert guard.keys.match(b"sk-hash#secretpart") == "sk-hash#secretpart"
    args = build_parser().parse_args(["serve", "--fake"])
    guard = build_app(args).user_middleware[0].cls.__self__
    assert guard.max_body_bytes == MAX_BODY_BYTES and not guard.check_all_hosts
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-body-bytes", "0"])
