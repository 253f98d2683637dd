"""The HTTP API over the fake engine: OpenAI client, SSE, errors, limits, keys, disconnects."""

import asyncio
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from optkit.serve import (
    BackgroundServer,
    CharCodec,
    FakeEngine,
    Limits,
    Scheduler,
    create_app,
)
from tests.serve.conftest import wait_until

HALF, QUARTER = math.log(0.5), math.log(0.25)


def client(srv, key="none"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def post(srv, body, **kw):
    if isinstance(body, str | bytes):
        kw.setdefault("headers", {"Content-Type": "application/json"})
        return httpx.post(srv.url + "/v1/completions", content=body, timeout=10, **kw)
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=10, **kw)


def metric(srv, name):
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_openai_client_completes_streams_and_reads_logprobs(fake_server):
    srv, sched, _ = fake_server()
    c = client(srv)
    r = c.completions.create(model="fake", prompt="abc", max_tokens=5, logprobs=2)
    ch = r.choices[0]
    assert (ch.text, ch.finish_reason, ch.index) == ("defgh", "length", 0)
    assert ch.logprobs.tokens == list("defgh")
    assert ch.logprobs.token_logprobs == [HALF] * 5
    assert ch.logprobs.top_logprobs[0] == {"d": HALF, "e": QUARTER}
    assert ch.logprobs.text_offset == [0, 1, 2, 3, 4]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)
    assert r.object == "text_completion" and r.model == "fake" and r.id.startswith("cmpl-")

    chunks = list(c.completions.create(model="fake", prompt="abc", max_tokens=5, logprobs=2,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(k.choices[0].text for k in chunks[:-1]) == "defgh"
    assert [t for k in chunks[:-1] for t in k.choices[0].logprobs.tokens] == list("defgh")
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_echo_scores_the_prompt(fake_server):
    srv, *_ = fake_server()
    r = client(srv).completions.create(model="fake", prompt="abd", max_tokens=0, echo=True,
                                       logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "abd"
    assert lp.tokens == ["a", "b", "d"]
    assert lp.token_logprobs == [None, HALF, math.log(1 / 128)]  # "d" does not follow "b"
    assert lp.top_logprobs == [None, {"b": HALF}, {"c": HALF, "d": math.log(1 / 128)}]
    assert lp.text_offset == [0, 1, 2]
    # lm-eval-harness local-completions: max_tokens=1, echo, logprobs=1, [ctxlen:-1]
    r = client(srv).completions.create(model="fake", prompt=[[97, 98], [120, 121]],
                                       max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert [ch.text for ch in r.choices] == ["abc", "xyz"]
    assert [len(ch.logprobs.token_logprobs) for ch in r.choices] == [3, 3]


def test_prompt_kinds_n_and_best_of(fake_server):
    srv, *_ = fake_server()
    c = client(srv)
    r = c.completions.create(model="fake", prompt=["ab", "XY"], max_tokens=3, n=2)
    assert [(ch.index, ch.text, ch.finish_reason) for ch in r.choices] == [
        (0, "cde", "length"), (1, "cde", "length"), (2, "Z", "stop"), (3, "Z", "stop")]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3 + 3 + 2 + 2
    r = c.completions.create(model="fake", prompt=[120], max_tokens=2, n=1, best_of=3)
    assert [ch.text for ch in r.choices] == ["yz"]


def test_stop_strings_streamed_and_not(fake_server):
    srv, *_ = fake_server(steps_per_dispatch=1)
    c = client(srv)
    r = c.completions.create(model="fake", prompt="hello", max_tokens=30, stop=["uv", "zz"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("pqrst", "stop")
    chunks = list(c.completions.create(model="fake", prompt="hello", max_tokens=30,
                                       stop="rs", stream=True))
    pieces = [k.choices[0].text for k in chunks]
    assert "".join(pieces) == "pq" and chunks[-1].choices[0].finish_reason == "stop"


def test_raw_sse_ends_with_done(fake_server):
    srv, *_ = fake_server()
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=10,
                      json={"model": "fake", "prompt": "a", "max_tokens": 3,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    data = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(d["choices"][0]["text"] for d in data) == "bcd"


MALFORMED = [
    ("bad json", "{bad", 400),
    ("json array", "[]", 400),
    ("json string", '"hello"', 400),
    ("empty body", "", 400),
    ("missing prompt", {"model": "fake"}, 400),
    ("missing model", {"prompt": "a"}, 400),
    ("unknown model", {"model": "gpt-5", "prompt": "a"}, 404),
    ("unknown field", {"model": "fake", "prompt": "a", "frobnicate": 1}, 400),
    ("prompt number", {"model": "fake", "prompt": 5}, 400),
    ("prompt mixed list", {"model": "fake", "prompt": [1, "a"]}, 400),
    ("prompt float ids", {"model": "fake", "prompt": [1.5, 2]}, 400),
    ("empty prompt", {"model": "fake", "prompt": ""}, 400),
    ("empty prompt list", {"model": "fake", "prompt": []}, 400),
    ("empty token list", {"model": "fake", "prompt": [[]]}, 400),
    ("empty string in list", {"model": "fake", "prompt": ["a", ""]}, 400),
    ("negative token id", {"model": "fake", "prompt": [[-1, 5]]}, 400),
    ("token id past vocab", {"model": "fake", "prompt": [99999]}, 400),
    ("negative max_tokens", {"model": "fake", "prompt": "a", "max_tokens": -1}, 400),
    ("huge max_tokens", {"model": "fake", "prompt": "a", "max_tokens": 10**9}, 400),
    ("max_tokens string", {"model": "fake", "prompt": "a", "max_tokens": "5"}, 400),
    ("max_tokens float", {"model": "fake", "prompt": "a", "max_tokens": 1.5}, 400),
    ("prompt over context", {"model": "fake", "prompt": "a" * 300}, 400),
    ("prompt + max_tokens over context", {"model": "fake", "prompt": "a" * 200,
                                          "max_tokens": 100}, 400),
    ("negative temperature", {"model": "fake", "prompt": "a", "temperature": -0.1}, 400),
    ("temperature too high", {"model": "fake", "prompt": "a", "temperature": 3}, 400),
    ("top_p zero", {"model": "fake", "prompt": "a", "top_p": 0}, 400),
    ("top_p above one", {"model": "fake", "prompt": "a", "top_p": 1.5}, 400),
    ("top_k negative", {"model": "fake", "prompt": "a", "top_k": -2}, 400),
    ("n zero", {"model": "fake", "prompt": "a", "n": 0}, 400),
    ("n over the limit", {"model": "fake", "prompt": "a", "n": 100}, 400),
    ("best_of below n", {"model": "fake", "prompt": "a", "n": 3, "best_of": 2}, 400),
    ("best_of streamed", {"model": "fake", "prompt": "a", "best_of": 2, "stream": True}, 400),
    ("too many sequences", {"model": "fake", "prompt": ["a"] * 40, "n": 2}, 400),
    ("logprobs over max", {"model": "fake", "prompt": "a", "logprobs": 10}, 400),
    ("negative logprobs", {"model": "fake", "prompt": "a", "logprobs": -1}, 400),
    ("empty stop", {"model": "fake", "prompt": "a", "stop": ""}, 400),
    ("too many stops", {"model": "fake", "prompt": "a", "stop": list("abcdefghi")}, 400),
    ("stop number", {"model": "fake", "prompt": "a", "stop": 7}, 400),
    ("echo string", {"model": "fake", "prompt": "a", "echo": "yes"}, 400),
    ("stream int", {"model": "fake", "prompt": "a", "stream": 1}, 400),
    ("seed string", {"model": "fake", "prompt": "a", "seed": "42"}, 400),
    ("stream_options unknown", {"model": "fake", "prompt": "a", "stream": True,
                                "stream_options": {"bogus": True}}, 400),
    ("presence penalty", {"model": "fake", "prompt": "a", "presence_penalty": 0.5}, 400),
    ("logit bias", {"model": "fake", "prompt": "a", "logit_bias": {"5": 10}}, 400),
    ("suffix", {"model": "fake", "prompt": "a", "suffix": "x"}, 400),
    # what the tokenizer or the device cannot take is refused before them
    ("lone surrogate", '{"model": "fake", "prompt": "a\\ud800b"}', 400),
    ("lone surrogate in a list", '{"model": "fake", "prompt": ["ok", "\\udc00"]}', 400),
    ("lone surrogate in stop", '{"model": "fake", "prompt": "a", "stop": ["\\ud800"]}', 400),
    ("lone surrogate key", '{"model": "fake", "prompt": "a", "\\ud800": 1}', 400),
    ("top_k past int32", {"model": "fake", "prompt": "a", "top_k": 2**31}, 400),
    ("seed negative", {"model": "fake", "prompt": "a", "seed": -1}, 400),
    ("seed past uint32", {"model": "fake", "prompt": "a", "seed": 2**32}, 400),
    ("token id past int32", {"model": "fake", "prompt": [2**31]}, 400),
    ("token id 2**64", {"model": "fake", "prompt": [[1, 2**64]]}, 400),
    ("max_tokens past int32", {"model": "fake", "prompt": "a", "max_tokens": 2**31}, 400),
    ("min_tokens past int32", {"model": "fake", "prompt": "a", "min_tokens": 2**31}, 400),
    ("n past int32", {"model": "fake", "prompt": "a", "n": 2**31}, 400),
    ("best_of past int32", {"model": "fake", "prompt": "a", "best_of": 2**40}, 400),
    ("logprobs past int32", {"model": "fake", "prompt": "a", "logprobs": 2**31}, 400),
    ("NaN temperature", '{"model": "fake", "prompt": "a", "temperature": NaN}', 400),
    ("infinite penalty", '{"model": "fake", "prompt": "a", "repetition_penalty": 1e999}', 400),
    ("Infinity top_p", '{"model": "fake", "prompt": "a", "top_p": Infinity}', 400),
    ("integer 1.5", {"model": "fake", "prompt": "a", "n": 1.5}, 400),
]


@pytest.fixture(scope="module")
def shared_fake_server():
    from optkit.serve import BackgroundServer, CharCodec, FakeEngine, Scheduler, create_app

    sched = Scheduler(FakeEngine(max_slots=2, max_len=256), CharCodec(), Limits(max_queue=64))
    with BackgroundServer(create_app(sched, sched.codec, "fake", max_n=16)) as srv:
        yield srv


@pytest.mark.parametrize("name, body, status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_errors(shared_fake_server, name, body, status):
    srv = shared_fake_server
    r = post(srv, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    # and the server keeps serving
    ok = post(srv, {"model": "fake", "prompt": "ab", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "cd"


def test_other_http_errors_are_openai_objects(shared_fake_server):
    srv = shared_fake_server
    for r, status in [(httpx.get(srv.url + "/v1/completions"), 405),
                      (httpx.get(srv.url + "/v1/nothing"), 404),
                      (post(srv, "model=fake", headers={"Content-Type": "text/plain"}), 400),
                      (post(srv, "{bad"), 400)]:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] is None or isinstance(err["code"], str)
        assert len(r.headers["x-request-id"]) == 32
    assert r.json()["error"]["code"] == "json_invalid"


def test_integer_fields_take_integral_json_numbers(shared_fake_server):
    r = post(shared_fake_server, {"model": "fake", "prompt": [97.0, 98], "max_tokens": 2.0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "cd"


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", '{"model": "fake", "messages": [{"role": "user", '
                             '"content": "hi \\ud83d"}]}'),
    ("/v1/chat/completions", '{"model": "fake", "messages": [{"role": "user", "content": '
                             '[{"type": "text", "text": "\\udfff"}]}]}'),
    ("/v1/chat/completions", '{"model": "fake", "messages": [{"role": "user", "content": '
                             '"hi"}], "stop": "\\ud800"}'),
    ("/tokenize", '{"prompt": "a\\ud800"}'),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800", "name": "x"}]}'),
    ("/detokenize", '{"tokens": [1, 2147483648]}'),
])
def test_other_routes_refuse_what_the_tokenizer_or_device_cannot_take(shared_fake_server,
                                                                      path, body):
    with httpx.Client(base_url=shared_fake_server.url, timeout=10) as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert c.get("/health").status_code == 200  # the same connection serves on


class FailingCodec(CharCodec):
    def encode(self, text, add_special_tokens=True):
        raise RuntimeError("secret detail of the failure")


class FailingEngine(FakeEngine):
    def step(self, works, num_steps=1):
        raise RuntimeError("secret detail of the failure")


@pytest.mark.parametrize("what", ["planner", "engine"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_500_names_a_request_id_not_the_exception(what, stream, caplog):
    engine = FailingEngine() if what == "engine" else FakeEngine()
    codec = FailingCodec() if what == "planner" else CharCodec()
    sched = Scheduler(engine, codec, Limits())
    body = {"model": "fake", "prompt": "ab", "max_tokens": 2, "stream": stream}
    with (BackgroundServer(create_app(sched, codec, "fake")) as srv,
          httpx.Client(base_url=srv.url, timeout=10) as c):
        r = c.post("/v1/completions", json=body)
        rid = r.headers["x-request-id"]
        if what == "planner":  # fails before the response starts
            assert r.status_code == 500
            err = r.json()["error"]
            assert err["message"] == f"internal error (request id {rid})"
            assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
        elif stream:  # the stream ends with an error event, then [DONE]
            assert r.status_code == 200
            events = [e.strip() for e in r.text.split("data: ")[1:]]
            assert events[-1] == "[DONE]"
            err = json.loads(events[-2])["error"]
        else:
            assert r.status_code == 500
            err = r.json()["error"]
        assert err["type"] == "server_error" and err["message"].startswith("internal error")
        assert "secret" not in r.text and "RuntimeError" not in r.text
        assert c.get("/health").status_code == 200  # and the connection serves on


class BlockingCodec(CharCodec):
    """Encoding waits until released: a long tokenization held as long as a test needs."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, text, add_special_tokens=True):
        self.started.set()
        assert self.release.wait(30)
        return super().encode(text, add_special_tokens)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "fake", "prompt": "ab", "max_tokens": 2}),
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "a"}],
                              "max_tokens": 2}),
    ("/tokenize", {"prompt": "ab"}),
])
def test_health_answers_while_a_request_is_being_tokenized(path, body):
    codec = BlockingCodec()
    sched = Scheduler(FakeEngine(), codec, Limits())
    with BackgroundServer(create_app(sched, codec, "fake")) as srv:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, srv.url + path, json=body, timeout=30)
            try:
                assert codec.started.wait(10)
                t0 = time.perf_counter()
                health = httpx.get(srv.url + "/health", timeout=10)
                print(f"/health during {path}'s tokenizing: "
                      f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
                assert health.status_code == 200 and not pending.done()
            finally:
                codec.release.set()
            assert pending.result().status_code == 200


def test_health_latency_while_a_2mb_prompt_is_tokenized():
    """The real tokenizer on a 2 MB prompt (/tokenize: 430k tokens back); /health is polled
    meanwhile and its latencies printed (no bound asserted: the machine may be busy)."""
    from optkit import get_tokenizer
    from optkit.serve import HFCodec

    codec = HFCodec(get_tokenizer())
    sched = Scheduler(FakeEngine(), codec, Limits())
    prompt = "Paris is the capital and largest city of France. " * 42000  # 2.06 MB
    with (BackgroundServer(create_app(sched, codec, "fake")) as srv,
          ThreadPoolExecutor(1) as pool, httpx.Client(base_url=srv.url, timeout=30) as c):
        t0 = time.perf_counter()
        pending = pool.submit(httpx.post, srv.url + "/tokenize", json={"prompt": prompt},
                              timeout=120)
        latencies = []
        while not pending.done():
            t = time.perf_counter()
            assert c.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.02)
        r = pending.result()
        took = time.perf_counter() - t0
    assert r.status_code == 200 and r.json()["count"] > 400_000
    print(f"/tokenize of {len(prompt) / 1e6:.2f} MB took {took:.2f} s; /health answered "
          f"{len(latencies)} times meanwhile, max {max(latencies, default=0) * 1e3:.1f} ms, "
          f"median {sorted(latencies)[len(latencies) // 2] * 1e3 if latencies else 0:.1f} ms")


def test_full_queue_gets_429(fake_server):
    srv, sched, _ = fake_server(max_slots=1, step_delay=0.05, limits=Limits(max_queue=2))
    held = sched.submit([sched_req(200)])
    wait_until(lambda: sched.stats()["running"] == 1)
    held += sched.submit([sched_req(5), sched_req(5)])
    r = post(srv, {"model": "fake", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["Retry-After"]) <= 60  # seconds, from the admission rate
    with pytest.raises(openai.RateLimitError):
        client(srv).completions.create(model="fake", prompt="a", max_tokens=1)
    for h in held:
        h.cancel()
    wait_until(lambda: sched.stats()["active"] == 0)
    assert post(srv, {"model": "fake", "prompt": "a", "max_tokens": 1}).status_code == 200
    assert metric(srv, 'optkit_requests_rejected_total{reason="queue_full"}') == 2


def sched_req(max_tokens):
    from optkit.serve import SeqRequest

    return SeqRequest((97,), max_tokens=max_tokens)


def test_api_keys(fake_server):
    srv, sched, _ = fake_server(api_keys={"key-a": 3, "key-b": 1})
    with pytest.raises(openai.AuthenticationError):
        client(srv, "wrong").completions.create(model="fake", prompt="a", max_tokens=1)
    r = post(srv, {"model": "fake", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client(srv, "key-b").completions.create(model="fake", prompt="a", max_tokens=2)
    assert r.choices[0].text == "bc"
    assert httpx.get(srv.url + "/health").status_code == 200  # open without a key
    assert httpx.get(srv.url + "/v1/models").status_code == 401


def test_keys_are_off_by_default(fake_server):
    srv, *_ = fake_server()
    r = post(srv, {"model": "fake", "prompt": "a", "max_tokens": 1},
             headers={"Authorization": "Bearer anything"})
    assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("where", ["running", "waiting"])
def test_client_disconnect_cancels_and_frees_the_slot(fake_server, stream, where):
    srv, sched, engine = fake_server(max_slots=1, step_delay=0.05, steps_per_dispatch=1)
    blocker = sched.submit([sched_req(250)]) if where == "waiting" else []
    if blocker:
        wait_until(lambda: sched.stats()["running"] == 1)

    async def go():
        async with httpx.AsyncClient(timeout=10) as c:
            body = {"model": "fake", "prompt": "a", "max_tokens": 200, "stream": stream}
            task = asyncio.create_task(c.post(srv.url + "/v1/completions", json=body))
            await asyncio.to_thread(wait_until, lambda: sched.stats()["active"] ==
                                    1 + len(blocker))
            if where == "running":
                await asyncio.to_thread(wait_until, lambda: sched.stats()["cache_tokens"] > 5)
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    wait_until(lambda: sched.stats()["active"] == len(blocker))
    assert metric(srv, 'optkit_sequences_finished_total{reason="cancelled"}') == 1
    for h in blocker:
        h.cancel()
    wait_until(lambda: sched.stats()["active"] == 0)
    st = sched.stats()
    assert (st["free_slots"], st["cache_tokens"], st["tokens_in_flight"]) == (1, 0, 0)
    assert sched.steps < 200  # nothing ran to the end


def test_models_health_metrics_and_page(fake_server):
    srv, *_ = fake_server()
    client(srv).completions.create(model="fake", prompt="ab", max_tokens=4)
    m = client(srv).models.list().data
    assert [x.id for x in m] == ["fake"]
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["free_slots"] == 4
    text = httpx.get(srv.url + "/metrics").text
    for name in ("optkit_queue_depth", "optkit_running_sequences", "optkit_cache_usage_ratio",
                 "optkit_time_to_first_token_seconds_bucket",
                 "optkit_time_per_output_token_seconds_bucket"):
        assert name in text
    assert metric(srv, "optkit_generation_tokens_total") == 4
    assert metric(srv, "optkit_prompt_tokens_total") == 2
    assert metric(srv, "optkit_time_to_first_token_seconds_count") == 1
    assert metric(srv, "optkit_time_per_output_token_seconds_count") == 3
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and "<textarea" in page.text


def test_streams_from_concurrent_clients_interleave(fake_server):
    """Requests join a running batch between steps; every stream gets its own text."""
    srv, sched, engine = fake_server(max_slots=4, step_delay=0.002, steps_per_dispatch=1)
    prompts = ["a", "g", "m", "s", "ab", "XY", "hello", "Q"] * 2

    async def one(c, p):
        text = ""
        async with c.stream("POST", srv.url + "/v1/completions", json={
                "model": "fake", "prompt": p, "max_tokens": 12, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def go():
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    texts = asyncio.run(go())
    alone = [post(srv, {"model": "fake", "prompt": p, "max_tokens": 12}).json()
             ["choices"][0]["text"] for p in prompts]
    assert texts == alone
    assert alone[0] == "bcdefghijklm" and alone[5] == "Z"
    assert engine.calls["prefill"] == 2 * len(prompts)  # each prompt started once a run
