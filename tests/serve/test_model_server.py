"""The server on a tiny random OPT: the official openai client, lm-eval-style prompt scoring,
and a load test with clients that disconnect mid-stream."""

import asyncio
import gc
import json
import random
import threading

import httpx
import jax
import numpy as np
import openai
import pytest

from optkit import get_tokenizer
from optkit.serve import BackgroundServer, Limits, serve_app
from optkit.serve.scheduler import Handle
from tests.serve.conftest import ENGINE, wait_until

#: one xdist worker compiles the tiny model for all these modules (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("serve-model")

NAME = "jax/opt-tiny"


@pytest.fixture(scope="module")
def served(tiny_model):
    app = serve_app(tiny_model, name=NAME, **ENGINE,
                    limits=Limits(max_queue=128), warmup=False)
    with BackgroundServer(app) as srv:
        yield srv, app.state.scheduler


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_completes_streams_and_reads_logprobs(served):
    srv, _ = served
    c = client(srv)
    kw = dict(model=NAME, prompt="Paris is the capital city of", max_tokens=10, temperature=0)
    r = c.completions.create(logprobs=3, **kw)
    ch = r.choices[0]
    assert ch.finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 3 <= len(top) <= 4
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy picks the top
    assert "".join(lp.tokens) == ch.text
    streamed = list(c.completions.create(stream=True, **kw))
    assert "".join(k.choices[0].text for k in streamed) == ch.text
    assert streamed[-1].choices[0].finish_reason == ch.finish_reason
    # the short name works too
    assert c.completions.create(**{**kw, "model": "opt-tiny"}).choices[0].text == ch.text


def test_echo_logprobs_score_the_prompt_like_the_model(served, tiny_model, tok):
    srv, _ = served
    prompts = ["The quick brown fox jumps over the lazy dog", "Hello world"]
    r = client(srv).completions.create(model=NAME, prompt=prompts, echo=True, logprobs=2,
                                       max_tokens=0)
    ids = [tok(p).input_ids for p in prompts]
    t = max(map(len, ids))
    batch = np.array([[1] * (t - len(x)) + x for x in ids])
    mask = np.array([[0] * (t - len(x)) + [1] * len(x) for x in ids])
    logits = np.asarray(tiny_model(batch, attention_mask=mask).logits, np.float32)
    lps = np.asarray(jax.nn.log_softmax(logits, -1))
    for i, (p, x, ch) in enumerate(zip(prompts, ids, r.choices, strict=True)):
        assert ch.text == p and ch.index == i and ch.finish_reason == "length"
        got = ch.logprobs
        assert len(got.tokens) == len(x) and got.tokens[0] == "</s>"
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        rows = lps[i, t - len(x):]
        want = rows[np.arange(len(x) - 1), x[1:]]
        np.testing.assert_allclose(got.token_logprobs[1:], want, atol=1e-4)
        for top, row in zip(got.top_logprobs[1:], rows[:-1], strict=True):
            assert max(top.values()) == pytest.approx(row.max(), abs=1e-4)
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 0
    # lm-eval-harness local-completions: token ids, max_tokens=1, echo, logprobs=1, [ctx:-1]
    r2 = client(srv).completions.create(model=NAME, prompt=ids, echo=True, logprobs=1,
                                        max_tokens=1, temperature=0, seed=1234)
    for x, ch, ch0 in zip(ids, r2.choices, r.choices, strict=True):
        assert len(ch.logprobs.token_logprobs) == len(x) + 1
        np.testing.assert_allclose(ch.logprobs.token_logprobs[1:len(x)],
                                   ch0.logprobs.token_logprobs[1:], atol=1e-5)


def own_threads() -> int:
    """Live threads besides the HTTP worker pool's (anyio keeps idle workers a while)."""
    return sum(not t.name.startswith("AnyIO worker") for t in threading.enumerate())


def test_many_streaming_clients_some_disconnecting(served):
    srv, sched = served
    url = srv.url + "/v1/completions"
    rng = random.Random(0)
    words = ("the of model serve batch token request Paris capital city language cache slot "
             "quickly every while").split()
    n = 32
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(n)]
    max_tokens = [rng.randint(8, 40) for _ in range(n)]
    drop = set(range(0, n, 4))  # these clients leave after two chunks
    httpx.post(url, json={"model": NAME, "prompt": "warm", "max_tokens": 2}, timeout=300)
    threads_before = own_threads()
    cache_bytes = sched.engine.cache_bytes()

    def body(i, stream):
        return {"model": NAME, "prompt": prompts[i], "max_tokens": max_tokens[i],
                "temperature": 0, "stream": stream}

    async def one(c, i):
        text, finish, chunks = "", None, 0
        async with c.stream("POST", url, json=body(i, True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text, chunks = text + choice["text"], chunks + 1
                finish = choice["finish_reason"] or finish
                if i in drop and chunks == 2:
                    return None  # leaving the block closes the connection mid-stream
        return text, finish

    async def go():
        async with httpx.AsyncClient(timeout=300,
                                     limits=httpx.Limits(max_connections=2 * n)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))

    results = asyncio.run(go())
    assert all((r is None) == (i in drop) for i, r in enumerate(results))

    # every request that stayed got what the model gives it alone
    for i, res in enumerate(results):
        if res is None:
            continue
        alone = httpx.post(url, json=body(i, False), timeout=300).json()["choices"][0]
        assert res == (alone["text"], alone["finish_reason"]), i

    # cancelled ones were stopped, and nothing is left behind
    wait_until(lambda: sched.stats()["active"] == 0)
    st = sched.stats()
    assert (st["waiting"], st["running"], st["free_slots"], st["cache_tokens"],
            st["tokens_in_flight"]) == (0, 0, 8, 0, 0)
    cancelled = sched.metrics.registry.get_sample_value("optkit_sequences_finished_total",
                                                        {"reason": "cancelled"})
    assert 1 <= cancelled <= len(drop)
    assert own_threads() == threads_before
    assert sched.engine.cache_bytes() == cache_bytes
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Handle]
