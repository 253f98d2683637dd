"""The HTTP API over the fake engine: OpenAI client, SSE, errors, limits, keys, disconnects."""

import asyncio
import json
import math

import httpx
import openai
import pytest

from optkit.serve import Limits
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
    r = httpx.get(srv.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = post(srv, "model=fake", headers={"Content-Type": "text/plain"})
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_full_queue_gets_429(fake_server):
    srv, sched, _ = fake_server(max_slots=1, step_delay=0.05, limits=Limits(max_queue=2))
    held = sched.submit([sched_req(200)])
    wait_until(lambda: sched.stats()["running"] == 1)
    held += sched.submit([sched_req(5), sched_req(5)])
    r = post(srv, {"model": "fake", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
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
