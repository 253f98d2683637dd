"""Request validation and expansion (RequestPlanner) and the chat templates, without HTTP."""

import pytest
from pydantic import ValidationError

from optkit import get_tokenizer
from optkit.serve import CharCodec, FakeEngine, HFCodec, Limits, Scheduler
from optkit.serve.chat import INSTRUCT, PLAIN, get_template, template_for
from optkit.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from optkit.serve.requests import RequestPlanner

CONVERSATION = [("system", "You are terse."), ("user", "Hi there"), ("assistant", " Hello."),
                ("user", "Capital of France?")]


def planner(codec=None, max_len=64, max_queue=16, **kw):
    sched = Scheduler(FakeEngine(max_slots=2, max_len=max_len), codec or CharCodec(),
                      Limits(max_queue=max_queue))  # never started: check() needs no thread
    return RequestPlanner(sched, sched.codec, "fake", aliases=("f",), **kw)


def test_plain_template_renders_roles_and_ends_with_the_assistant_cue():
    assert PLAIN.render(CONVERSATION) == (
        "You are terse.\n\nUser: Hi there\nAssistant: Hello.\nUser: Capital of France?\n"
        "Assistant:")
    assert PLAIN.stop == ("\nUser:",)
    assert PLAIN.render([("user", "x")], add_generation_prompt=False) == "User: x\n"


def test_instruct_template_for_opt_iml_models():
    assert template_for("alpa/opt-iml-max-30b") is INSTRUCT
    assert template_for("jax/opt-1.3b") is PLAIN
    assert INSTRUCT.render(CONVERSATION[1:]) == (
        "Instruction: Hi there\n\nOutput: Hello.\n\nInstruction: Capital of France?\n\n"
        "Output:")
    assert get_template("instruct", "jax/opt-125m") is INSTRUCT
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("llama", "jax/opt-125m")


def test_completion_expands_prompt_major_with_sampling_extensions():
    p = planner()
    plan = p.completion(CompletionRequest(
        model="f", prompt=["ab", "cd"], n=2, best_of=3, max_tokens=5, temperature=0.5,
        top_k=-1, min_tokens=2, repetition_penalty=1.3, ignore_eos=True, seed=7, stop="x"))
    assert (plan.n, plan.best_of, plan.prompt_tokens) == (2, 3, 4)
    assert [s.prompt for s in plan.seqs] == [(97, 98)] * 3 + [(99, 100)] * 3
    assert [s.sampling.stream for s in plan.seqs] == [0, 1, 2, 0, 1, 2]
    s = plan.seqs[0]
    assert (s.max_tokens, s.stop, s.ignore_eos) == (5, ("x",), True)
    sp = s.sampling
    assert (sp.temperature, sp.top_k, sp.min_tokens, sp.repetition_penalty, sp.seed) == (
        0.5, 0, 2, 1.3, 7)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-5", "prompt": "a"}, 404, "model"),
    ({"model": "fake", "prompt": "a", "n": 3, "best_of": 2}, 400, "best_of"),
    ({"model": "fake", "prompt": "a", "n": 20}, 400, "n"),
    ({"model": "fake", "prompt": "a", "best_of": 2, "stream": True}, 400, "best_of"),
    ({"model": "fake", "prompt": "a", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
    ({"model": "fake", "prompt": ["a"] * 9, "n": 2}, 400, "prompt"),
    ({"model": "fake", "prompt": "a" * 60, "max_tokens": 10}, 400, "max_tokens"),
])
def test_completion_refusals(body, status, param):
    with pytest.raises(APIError) as e:
        planner().completion(CompletionRequest(**body))
    assert e.value.status == status and e.value.body["error"]["param"] == param


def test_chat_renders_the_template_adds_its_stop_and_fills_the_context():
    p = planner(max_len=64)
    body = ChatCompletionRequest(model="fake", messages=[
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], stop=["!"],
        logprobs=True, top_logprobs=2)
    plan = p.chat(body)
    (s,) = plan.seqs
    prompt = "S\n\nUser: Hi\nAssistant:"
    assert s.prompt == tuple(map(ord, prompt))
    assert s.stop == ("\nUser:", "!")
    assert s.max_tokens == 64 - len(prompt) and plan.logprobs == 2
    assert p.chat(body.model_copy(update={"max_completion_tokens": 3})).seqs[0].max_tokens == 3
    with pytest.raises(APIError, match="not both"):
        p.chat(body.model_copy(update={"max_completion_tokens": 3, "max_tokens": 3}))
    assert planner(chat_template=INSTRUCT).chat(body).seqs[0].stop == ("\n\nInstruction:",
                                                                       "!")


def test_tokenize_round_trips_with_the_tokenizer():
    tok = get_tokenizer()
    p = planner(codec=HFCodec(tok))
    text = "Paris is the capital of France. ünïcödé 😀"
    r = p.tokenize(TokenizeRequest(prompt=text, return_token_strs=True))
    assert r.tokens == tok(text)["input_ids"] and r.tokens[0] == 2  # </s> first, as fed
    assert r.count == len(r.tokens) and r.max_model_len == 64
    assert r.token_strs[0] == "</s>"
    assert p.detokenize(DetokenizeRequest(tokens=r.tokens)).prompt == text
    bare = p.tokenize(TokenizeRequest(prompt=text, add_special_tokens=False)).tokens
    assert bare == r.tokens[1:]
    chat = p.tokenize(TokenizeRequest(messages=[{"role": "user", "content": "Hi"}]))
    assert chat.tokens == tok("User: Hi\nAssistant:")["input_ids"]
    with pytest.raises(APIError, match="outside the vocabulary"):
        p.detokenize(DetokenizeRequest(tokens=[1, 10**6]))
    with pytest.raises(APIError) as e:
        p.tokenize(TokenizeRequest(model="other", prompt="x"))
    assert e.value.status == 404


@pytest.mark.parametrize("body", [
    {"prompt": "a\ud800"}, {"prompt": ["a", "\udfff"]}, {"prompt": "a", "stop": "\ud800"},
    {"prompt": "a", "user": "\ud800"}, {"prompt": ""}, {"prompt": []}, {"prompt": [[]]},
    {"prompt": [""]}, {"prompt": [-1]}, {"prompt": [[5, 2**31]]}, {"prompt": "a", "top_k": 2**31},
    {"prompt": "a", "seed": 2**32}, {"prompt": "a", "seed": -1}, {"prompt": "a", "n": 2**31},
    {"prompt": "a", "max_tokens": 2**31}, {"prompt": "a", "min_tokens": -1},
    {"prompt": "a", "logprobs": 2**31}, {"prompt": "a", "temperature": float("nan")},
    {"prompt": "a", "repetition_penalty": float("inf")}, {"prompt": "a", "n": 2.5},
    {"prompt": "a", "n": True}, {"prompt": "a", "stop": ["x"] * 9}, {"prompt": 5},
])
def test_the_schema_refuses_what_the_tokenizer_or_device_cannot_take(body):
    with pytest.raises(ValidationError):
        CompletionRequest(model="fake", **body)


def test_integral_floats_are_integers_and_bounds_are_inclusive():
    r = CompletionRequest(model="fake", prompt=[[1.0, 2**31 - 1]], n=2.0, seed=2**32 - 1,
                          top_k=-1)
    assert r.prompt == [[1, 2**31 - 1]] and type(r.n) is int and r.seed == 2**32 - 1


def test_chat_and_tokenize_refuse_surrogates_and_need_one_input():
    for bad in ([{"role": "user", "content": "\ud800"}],
                [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}],
                [{"role": "user", "content": "a", "name": "\ud800"}]):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(model="fake", messages=bad)
    for body in ({"prompt": None}, {"prompt": "\ud800"}):
        with pytest.raises(ValidationError):
            TokenizeRequest(**body)
    for body in ({}, {"prompt": "a", "messages": []}):
        with pytest.raises(APIError, match="either prompt or messages"):
            planner().tokenize(TokenizeRequest(**body))
    with pytest.raises(ValidationError):
        DetokenizeRequest(tokens=[2**31])
