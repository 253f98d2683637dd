"""Chat completions, vLLM's sampling extensions, /tokenize, /detokenize and the favicon over
HTTP, with the official OpenAI client where it applies (fake engine: see optkit.serve.fake)."""

import math

import httpx
import openai
import pytest

from optkit import get_tokenizer
from optkit.serve import BackgroundServer, FakeEngine, HFCodec, Limits, Scheduler, create_app

HALF, QUARTER = math.log(0.5), math.log(0.25)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
PROMPT = "Be brief.\n\nUser: Hi\nAssistant:"  # the plain template; the fake continues "abc.."


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def complete(srv, **body):
    r = httpx.post(srv.url + "/v1/completions", json={"model": "fake", **body}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def test_openai_client_chat_whole_and_streamed(fake_server):
    srv, *_ = fake_server()
    c = client(srv)
    r = c.chat.completions.create(model="fake", messages=CHAT, max_tokens=5, n=2,
                                  logprobs=True, top_logprobs=2, seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert [(ch.index, ch.message.role, ch.message.content, ch.finish_reason)
            for ch in r.choices] == [(0, "assistant", "abcde", "length"),
                                     (1, "assistant", "abcde", "length")]
    lp = r.choices[0].logprobs.content
    assert [t.token for t in lp] == list("abcde") and lp[0].logprob == HALF
    assert [(t.token, t.logprob) for t in lp[0].top_logprobs] == [("a", HALF), ("b", QUARTER)]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(PROMPT), 10)

    chunks = list(c.chat.completions.create(
        model="fake", messages=CHAT, max_completion_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(k.choices[0].delta.content or "" for k in chunks[:-1]) == "abcde"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert {k.id for k in chunks} == {chunks[0].id}


def test_chat_prompt_is_the_template_and_tokenize_shows_it(fake_server):
    srv, *_ = fake_server()
    r = httpx.post(srv.url + "/tokenize", json={"model": "fake", "messages": CHAT}).json()
    assert r["tokens"] == [ord(ch) for ch in PROMPT] and r["count"] == len(PROMPT)
    assert httpx.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {
        "prompt": PROMPT}
    # the default max_tokens is the rest of the context (the fake's letters never end)
    r = client(srv).chat.completions.create(model="fake", messages=CHAT)
    assert r.usage.completion_tokens == 256 - len(PROMPT)
    assert r.choices[0].finish_reason == "length"


def test_ignore_eos_and_min_tokens_are_honoured(fake_server):
    srv, *_ = fake_server()
    assert [(ch["text"], ch["finish_reason"]) for ch in complete(srv, prompt="XY",
                                                                 max_tokens=4)] == [
        ("Z", "stop")]
    # past end-of-text (id 0, no text) the fake continues with "a", "b"
    (ch,) = complete(srv, prompt="XY", max_tokens=4, ignore_eos=True)
    assert (ch["text"], ch["finish_reason"]) == ("Zab", "length")
    # end-of-text is not chosen before 3 tokens: the next candidate "a" is
    (ch,) = complete(srv, prompt="XY", max_tokens=5, min_tokens=3)
    assert (ch["text"], ch["finish_reason"]) == ("Zabcd", "length")
    (ch,) = complete(srv, prompt="XY", max_tokens=5, min_tokens=1)
    assert (ch["text"], ch["finish_reason"]) == ("Z", "stop")
    # and through the OpenAI client's extra_body
    r = openai.OpenAI(base_url=srv.url + "/v1", api_key="x").completions.create(
        model="fake", prompt="XY", max_tokens=4, extra_body={"ignore_eos": True, "top_k": 5})
    assert r.choices[0].text == "Zab"


def test_repetition_penalty_is_honoured(fake_server):
    srv, *_ = fake_server()
    assert complete(srv, prompt="abcab", max_tokens=3)[0]["text"] == "cde"
    # "c" was seen: 3 log(1/2) < log(1/4), so "d"; log-probs stay the model's own
    (ch,) = complete(srv, prompt="abcab", max_tokens=3, repetition_penalty=3.0, logprobs=1)
    assert ch["text"] == "def"
    assert ch["logprobs"]["token_logprobs"] == [QUARTER, HALF, HALF]
    # 2 log(1/2) == log(1/4): a tie goes to the likelier token
    assert complete(srv, prompt="abcab", max_tokens=3, repetition_penalty=2.0)[0]["text"] == \
        "cde"
    r = client(srv).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "abc"}], max_tokens=3,
        extra_body={"repetition_penalty": 3.0, "min_tokens": 1, "ignore_eos": False})
    # "User: abc\nAssistant:" holds a, b, c, e: after ":" seen "a" (3 log 1/2) still beats
    # unseen "d" (log 1/16); after "a" seen "b" ties unseen "d" (log 1/8); after "b" "d" wins
    assert r.choices[0].message.content == "abd"


BAD = [
    ("/v1/completions", {"prompt": "a", "min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"prompt": "a", "min_tokens": 1.5}, "min_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": -1.0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "ignore_eos": "yes"}, "ignore_eos"),
    ("/v1/completions", {"prompt": "a", "top_k": -2}, "top_k"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"prompt": "a"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 9},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1,
                              "max_completion_tokens": 1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": []}, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 300}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 2, "stream": True, "best_of": 3},
     "best_of"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [97, 500]}, "tokens"),
    ("/detokenize", {"tokens": "ab"}, "tokens"),
]


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{b[0]} {b[1]}"[:60] for b in BAD])
def test_bad_requests_get_clear_400s(fake_server, path, body, param):
    srv, *_ = fake_server()
    r = httpx.post(srv.url + path, json={"model": "fake", **body}, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"]


def test_tokenize_round_trips_with_the_real_tokenizer():
    tok = get_tokenizer()
    sched = Scheduler(FakeEngine(), HFCodec(tok), Limits())
    text = "The best way to serve a language model is, naïvely, 😀 batching."
    with BackgroundServer(create_app(sched, sched.codec, "jax/opt-125m",
                                     aliases=("opt-125m",))) as srv:
        r = httpx.post(srv.url + "/tokenize", json={"model": "opt-125m", "prompt": text,
                                                    "return_token_strs": True}).json()
        assert r["tokens"] == tok(text)["input_ids"] and r["count"] == len(r["tokens"])
        assert r["token_strs"][:2] == ["</s>", "The"]
        back = httpx.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}).json()
        assert back == {"prompt": text}
        r = httpx.post(srv.url + "/tokenize", json={"prompt": text,
                                                    "add_special_tokens": False}).json()
        assert r["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
        r = httpx.post(srv.url + "/tokenize", json={"model": "gpt-4", "prompt": "x"})
        assert r.status_code == 404


def test_favicon_and_chat_template_in_models(fake_server):
    srv, *_ = fake_server()
    r = httpx.get(srv.url + "/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    assert r.content[:4] == b"\x00\x00\x01\x00"  # an ICO header
    (m,) = httpx.get(srv.url + "/v1/models").json()["data"]
    assert m["chat_template"] == "plain"
