"""From submitted sequences to responses: the non-streaming collector and the SSE stream.

:func:`submit` queues a :class:`~optkit.serve.requests.Plan`'s sequences; the engine
thread's outputs reach an ``asyncio.Queue`` through ``loop.call_soon_threadsafe`` (the engine
never waits on the event loop).  :func:`collect` gathers every sequence to its end and picks
the best ``n`` of ``best_of``; :func:`sse` turns outputs into ``data:`` events as they come,
ending with ``data: [DONE]``.  Both cancel every sequence of the request when they stop
early: the client went away, the response task was cancelled, or a sequence failed.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from optkit.serve.protocol import APIError
from optkit.serve.requests import Plan
from optkit.serve.responses import Result
from optkit.serve.scheduler import Handle, Output, QueueFull, Scheduler


@dataclass
class Submission:
    """A request's sequences in flight: their handles (prompt-major) and output queue."""

    handles: list[Handle]
    queue: asyncio.Queue

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()  # a no-op once finished


def submit(scheduler: Scheduler, plan: Plan, key: str | None = None) -> Submission:
    """Queue ``plan``'s sequences (all or none); call from the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Handle, Output]] = asyncio.Queue()

    def on_output(h: Handle, out: Output) -> None:  # engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (h, out))
        except RuntimeError:  # the loop is gone (shutdown)
            pass

    try:
        handles = scheduler.submit(plan.seqs, key=key, on_output=on_output)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
    except RuntimeError as e:
        raise APIError(503, str(e), "server_error") from None
    return Submission(handles, queue)


def failure(out: Output) -> APIError | None:
    """The error a finished sequence's request fails with (None for stop / length)."""
    if out.finish_reason in ("stop", "length"):
        return None
    return APIError(500 if out.finish_reason == "error" else 503,
                    out.error or f"the request was {out.finish_reason}", "server_error")


async def events(sub: Submission) -> AsyncIterator[tuple[int, Output]]:
    """(sequence index, output) pairs until every sequence has finished."""
    index = {h.id: i for i, h in enumerate(sub.handles)}
    remaining = len(sub.handles)
    while remaining:
        h, out = await sub.queue.get()
        remaining -= out.finish_reason is not None
        yield index[h.id], out


async def _watch(receive: Callable[[], Awaitable[dict]], sub: Submission) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    sub.cancel()


async def collect(sub: Submission, plan: Plan,
                  receive: Callable[[], Awaitable[dict]] | None = None) -> list[Result]:
    """Every sequence to its end -> the answered results, choice order (the ``n`` of each
    prompt's ``best_of`` with the highest cumulative log-prob).  ``receive``: the ASGI
    receive channel, watched for the client going away.  Raises the first failure."""
    watcher = asyncio.create_task(_watch(receive, sub)) if receive is not None else None
    results = [Result() for _ in sub.handles]
    try:
        async for i, out in events(sub):
            results[i].add(out)
    finally:
        if watcher is not None:
            watcher.cancel()
        sub.cancel()
    for r in results:
        err = failure(r.final)
        if err is not None:
            raise err
    if plan.best_of == plan.n:
        return results
    chosen = []
    for p in range(len(plan.prompts)):
        cands = results[p * plan.best_of:(p + 1) * plan.best_of]
        chosen += sorted(cands, key=lambda r: -r.final.cum_logprob)[:plan.n]
    return chosen


def sse_event(obj) -> str:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def sse(sub: Submission, plan: Plan, fmt) -> AsyncIterator[str]:
    """The event stream of a streamed request in ``fmt``'s shapes (a chunk per output, a
    usage chunk when asked, ``[DONE]``); a failed sequence ends it with an error event."""

    async def run():
        try:
            completion_tokens = 0
            async for i, out in events(sub):
                if out.finish_reason is not None:
                    completion_tokens += out.num_generated
                    err = failure(out)
                    if err is not None:
                        yield sse_event(err.body)
                        return
                for chunk in fmt.chunks(i, out):
                    yield sse_event(chunk)
            if plan.include_usage:
                yield sse_event(fmt.usage_chunk(completion_tokens))
            yield "data: [DONE]\n\n"
        finally:  # normal end, client gone (the response task is cancelled) or error
            sub.cancel()

    gen = run()
    # a client gone before the first byte: the generator never runs its ``finally``
    weakref.finalize(gen, Submission.cancel, sub)
    return gen
