"""The non-streaming collector, the SSE stream and the response formats, without HTTP: outputs
are put on the submission's queue by hand, as the engine thread would."""

import asyncio
import json

import pytest

from optkit.serve.engine import SamplingParams
from optkit.serve.protocol import APIError
from optkit.serve.requests import Plan
from optkit.serve.responses import ChatFormat, CompletionFormat, Result
from optkit.serve.scheduler import Output, SeqRequest
from optkit.serve.streaming import Submission, collect, sse
from optkit.serve.text import TokenEntry


class FakeHandle:
    def __init__(self, id):
        self.id, self.cancelled = id, 0

    def cancel(self):
        self.cancelled += 1


def plan(prompts=1, n=1, best_of=1, logprobs=None, include_usage=False):
    seqs = [SeqRequest((97,) * 2, 4, SamplingParams(stream=j))
            for _ in range(prompts) for j in range(best_of)]
    return Plan([[97, 97]] * prompts, seqs, n, best_of, logprobs, include_usage)


def submission(outputs, count):
    """A submission of ``count`` sequences whose queue holds ``outputs`` (seq, Output)."""
    handles = [FakeHandle(10 + i) for i in range(count)]
    q = asyncio.Queue()
    for i, out in outputs:
        q.put_nowait((handles[i], out))
    return Submission(handles, q)


def entry(c, lp=-0.5):
    return TokenEntry(c, lp, {c: lp, "z": -3.0}, 0)


def test_collect_joins_outputs_picks_best_of_and_cancels():
    async def go():
        outs = [(0, Output("ab", [])), (1, Output("xy", [])),
                (0, Output("c", [], "length", 3, cum_logprob=-5.0)),
                (2, Output("q", [], "stop", 1, cum_logprob=-0.1)),
                (1, Output("z", [], "length", 3, cum_logprob=-1.0)),
                (3, Output("r", [], "stop", 1, cum_logprob=-0.2))]
        sub = submission(outs, 4)
        results = await collect(sub, plan(prompts=2, n=1, best_of=2))
        return sub, results

    sub, results = asyncio.run(go())
    assert [r.text for r in results] == ["xyz", "q"]  # the likelier of each prompt's two
    assert [r.final.finish_reason for r in results] == ["length", "stop"]
    assert all(h.cancelled for h in sub.handles)  # finished handles: cancel is a no-op


def test_collect_raises_a_failed_sequence():
    async def go():
        sub = submission([(0, Output("", [], "error", 0, error="boom")),
                          (1, Output("a", [], "length", 1))], 2)
        await collect(sub, plan(n=2, best_of=2))

    with pytest.raises(APIError, match="boom") as e:
        asyncio.run(go())
    assert e.value.status == 500


def test_collect_cancels_when_the_client_goes_away():
    async def go():
        sub = submission([(0, Output("a", []))], 1)  # never finishes

        async def receive():
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        task = asyncio.create_task(collect(sub, plan(), receive))
        while not sub.handles[0].cancelled:
            await asyncio.sleep(0.01)
        task.cancel()
        return sub

    assert asyncio.run(go()).handles[0].cancelled


def read(gen):
    async def go():
        return [e async for e in gen]

    events = asyncio.run(go())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    return [e[6:-2] if e == "data: [DONE]\n\n" else json.loads(e[6:-2]) for e in events]


def test_sse_completion_chunks_usage_and_done():
    p = plan(logprobs=1, include_usage=True)
    sub = submission([(0, Output("a", [entry("a")])),
                      (0, Output("b", [entry("b")], "length", 2))], 1)
    events = read(sse(sub, p, CompletionFormat("m", p)))
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:2]]
    assert texts == ["a", "b"] and events[1]["choices"][0]["finish_reason"] == "length"
    assert events[0]["choices"][0]["logprobs"]["tokens"] == ["a"]
    assert events[2]["choices"] == [] and events[2]["usage"]["completion_tokens"] == 2
    assert {e["id"] for e in events[:3]} == {events[0]["id"]}
    assert events[0]["object"] == "text_completion"
    assert sub.handles[0].cancelled


def test_sse_error_event_ends_the_stream():
    p = plan(include_usage=True)
    sub = submission([(0, Output("a", [])),
                      (0, Output("", [], "cancelled", 1, error="the server is shutting down"))],
                     1)
    events = read(sse(sub, p, CompletionFormat("m", p)))
    assert events[0]["choices"][0]["text"] == "a"
    err = events[1]["error"]
    assert (err["message"], err["type"]) == ("the server is shutting down", "server_error")
    assert events[2:] == ["[DONE]"]  # no usage chunk after an error
    assert sub.handles[0].cancelled


def test_sse_chat_role_first_leading_space_dropped_logprobs():
    p = plan(n=2, best_of=2, logprobs=1)
    sub = submission([(0, Output(" ", [entry(" ")])), (1, Output(" Hi", [entry(" Hi")])),
                      (0, Output(" yo", [entry(" yo")], "stop", 2)),
                      (1, Output("", [], "length", 1))], 2)
    events = read(sse(sub, p, ChatFormat("m", p)))
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    by = {0: [], 1: []}
    for c in chunks:
        by[c["index"]].append(c)
    for cs in by.values():
        assert cs[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["delta"]["content"] or "" for c in by[0]) == "yo"  # "  yo".lstrip()
    assert "".join(c["delta"]["content"] or "" for c in by[1]) == "Hi"
    assert by[0][-1]["finish_reason"] == "stop" and by[1][-1]["finish_reason"] == "length"
    top = by[1][1]["logprobs"]["content"][0]
    assert top["token"] == " Hi" and top["bytes"] == list(b" Hi")
    assert [t["token"] for t in top["top_logprobs"]] == [" Hi"]  # k = 1 of {" Hi", "z"}


def test_whole_responses_in_both_formats():
    p = plan(n=2, best_of=2, logprobs=2)
    results = [Result(), Result()]
    results[0].add(Output(" Paris", [entry(" Paris")], "stop", 2))
    results[1].add(Output(" Lyon", [entry(" Lyon")], "length", 4))
    c = CompletionFormat("m", p).response(results)
    assert [ch.text for ch in c.choices] == [" Paris", " Lyon"]
    assert c.usage.total_tokens == 2 + 6 and c.id.startswith("cmpl-")
    assert c.choices[0].logprobs.top_logprobs == [{" Paris": -0.5, "z": -3.0}]
    chat = ChatFormat("m", p).response(results)
    assert [ch.message.content for ch in chat.choices] == ["Paris", "Lyon"]
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    assert [t.token for t in chat.choices[0].logprobs.content[0].top_logprobs] == [" Paris",
                                                                                   "z"]
