"""Chat on a tiny random OPT through the official openai client: the reply is what the
completions endpoint gives for the rendered template, cut at the template's stop string."""

import openai
import pytest

from optkit.serve import BackgroundServer, Limits, serve_app
from optkit.serve.chat import PLAIN

pytestmark = pytest.mark.xdist_group("serve-model")

NAME = "jax/opt-tiny"


@pytest.fixture(scope="module")
def srv(tiny_model):
    app = serve_app(tiny_model, name=NAME, max_num_seqs=4, max_len=128,
                    limits=Limits(max_queue=16), warmup=False)
    with BackgroundServer(app) as s:
        yield s


def test_chat_equals_completion_of_the_template(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    prompt = PLAIN.render([(m["role"], m["content"]) for m in messages])
    kw = dict(max_tokens=24, temperature=0, seed=3)
    ref = c.completions.create(model=NAME, prompt=prompt, stop=list(PLAIN.stop), **kw)
    r = c.chat.completions.create(model=NAME, messages=messages, **kw)
    (ch,) = r.choices
    assert ch.message.content == ref.choices[0].text.lstrip()
    assert ch.finish_reason == ref.choices[0].finish_reason
    assert "\nUser:" not in ch.message.content
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens
    streamed = list(c.chat.completions.create(model=NAME, messages=messages, stream=True,
                                              **kw))
    assert "".join(k.choices[0].delta.content or "" for k in streamed) == ch.message.content
    assert streamed[-1].choices[0].finish_reason == ch.finish_reason
    # sampled with a seed: the same reply streamed and not
    kw = dict(max_tokens=12, temperature=0.9, seed=11)
    a = c.chat.completions.create(model=NAME, messages=messages, **kw).choices[0]
    b = "".join(k.choices[0].delta.content or "" for k in c.chat.completions.create(
        model=NAME, messages=messages, stream=True, **kw))
    assert a.message.content == b
