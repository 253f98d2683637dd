"""Continuous batching: the engine thread, the waiting queue and each sequence's bookkeeping.

Threads and queues (one engine thread; the HTTP side never waits on it)::

  asyncio event loop (uvicorn)                  engine thread "optkit-engine"
  ----------------------------                  ------------------------------------------
  POST /v1/completions                          loop:
    tokenize + validate                           1. apply cancellations: drop from the queue
    submit(seqs) --push--> [waiting: FairQueue]      or engine.free(slot)
               (lock)       one FIFO per key  -->  2. admit while a slot is free and the token
                            weighted by key          budget allows: engine.prefill(request)
    handle.cancel() -----> [cancel list]             -> engine.insert(prefix, slot)
    (client gone, Stop)       (lock)               3. engine.generate(n): one token per live
                                                     slot (n > 1 only while nobody waits)
  per-request asyncio.Queue <--------------------  4. per sequence: stop on EOS / stop string /
    -> SSE chunks or JSON     call_soon_threadsafe   max_tokens, free its slot at once, send
                              (never blocks)         the released text + log-probs
  GET /health, /metrics  <-- stats(): plain reads of counters the engine thread keeps

``policy="static"`` is Alpa's scheme, kept as the benchmark baseline: wait until
``max_slots`` requests are queued (or the oldest has waited ``static_wait`` s), run them
together to completion, and only then admit the next batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from optkit.serve.engine import Engine, EngineRequest, Prefix, SamplingParams
from optkit.serve.queue import FairQueue
from optkit.serve.text import Codec, TextStream, TokenEntry, prompt_entries

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the server cannot run (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFull(RuntimeError):
    """The waiting queue is at its limit (HTTP 429)."""


@dataclass(frozen=True)
class Limits:
    """User limits; ``None`` means "as large as the engine allows"."""

    max_queue: int = 256                  # waiting sequences
    max_prompt_len: int | None = None     # tokens in one prompt
    max_tokens_in_flight: int | None = None  # sum of prompt + max_tokens over running ones


@dataclass(frozen=True)
class SeqRequest:
    """One sequence to generate (a completion request with ``n`` > 1 submits several)."""

    prompt: tuple[int, ...]
    max_tokens: int = 16
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None   # None: no per-token entries; k: top-k alternatives
    echo: bool = False
    ignore_eos: bool = False


@dataclass
class Output:
    """What a sequence produced since its last output."""

    text: str
    entries: list[TokenEntry]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    num_generated: int = 0
    cum_logprob: float = 0.0
    prompt_text: str | None = None    # first output of an echo request
    prompt_entries: list[TokenEntry] | None = None
    error: str | None = None


OnOutput = Callable[["Handle", Output], None]


@dataclass(eq=False)
class Handle:
    """A submitted sequence.  ``cancel()`` may be called from any thread."""

    id: int
    request: SeqRequest
    key: str | None
    on_output: OnOutput | None = field(repr=False)
    scheduler: Scheduler = field(repr=False)
    state: str = "waiting"          # waiting -> running -> done
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    t_done: float | None = None
    generated: int = 0
    cum_logprob: float = 0.0
    slot: int | None = None
    length: int = 0                 # cache positions in use
    admitted: bool = False
    cancel_requested: bool = False
    stream: TextStream | None = field(default=None, repr=False)
    prompt_text: str | None = field(default=None, repr=False)
    prompt_entries: list[TokenEntry] | None = field(default=None, repr=False)
    prompt_sent: bool = False

    @property
    def cost(self) -> int:
        return len(self.request.prompt) + self.request.max_tokens

    @property
    def done(self) -> bool:
        return self.state == "done"

    def cancel(self) -> None:
        self.scheduler.cancel(self)


class Scheduler:
    """Feeds an :class:`~optkit.serve.engine.Engine` from a queue on its own thread."""

    def __init__(self, engine: Engine, codec: Codec, limits: Limits = Limits(),
                 weights: Mapping[str, float] | None = None, policy: str = "continuous",
                 static_wait: float = 0.0, steps_per_dispatch: int = 4, metrics=None):
        if policy not in ("continuous", "static"):
            raise ValueError(f"policy must be 'continuous' or 'static', not {policy!r}")
        self.engine, self.codec, self.limits = engine, codec, limits
        self.policy, self.static_wait = policy, static_wait
        self.steps_per_dispatch = max(1, int(steps_per_dispatch))
        self.metrics = metrics
        self.max_prompt_len = min(limits.max_prompt_len or engine.max_len, engine.max_len)
        self.budget = limits.max_tokens_in_flight or engine.max_slots * engine.max_len
        self._cond = threading.Condition()
        self._queue = FairQueue(weights)
        self._cancels: list[Handle] = []
        self._active: dict[int, Handle] = {}    # waiting or running (leak checks)
        self._live: dict[int, Handle] = {}      # slot -> running sequence (engine thread)
        self._free = list(range(engine.max_slots - 1, -1, -1))
        self._reserved = 0
        self._cache_used = 0
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # Public API (any thread) ----------------------------------------------------------------
    def check(self, r: SeqRequest) -> None:
        """Raise :class:`RequestError` for a request this server can never run."""
        n, ctx = len(r.prompt), self.engine.max_len
        if n == 0:
            raise RequestError("the prompt is empty", "prompt")
        if n > self.max_prompt_len:
            raise RequestError(f"the prompt has {n} tokens; this server takes at most "
                               f"{self.max_prompt_len}", "prompt", "context_length_exceeded")
        if n + r.max_tokens > ctx:
            raise RequestError(
                f"this model's maximum context length is {ctx} tokens, however you requested "
                f"{n + r.max_tokens} tokens ({n} in your prompt; {r.max_tokens} for the "
                "completion)", "max_tokens", "context_length_exceeded")
        if n + r.max_tokens > self.budget:
            raise RequestError(f"prompt + max_tokens = {n + r.max_tokens} exceeds the "
                               f"server's {self.budget} tokens in flight", "max_tokens")
        bad = [t for t in r.prompt if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.engine.vocab_size})", "prompt")
        if r.logprobs is not None and not 0 <= r.logprobs <= self.engine.max_logprobs:
            raise RequestError(f"logprobs must be between 0 and {self.engine.max_logprobs}",
                               "logprobs")

    def submit(self, requests: Sequence[SeqRequest], key: str | None = None,
               on_output: OnOutput | None = None) -> list[Handle]:
        """Queue sequences (all or none).  Raises RequestError or QueueFull."""
        for r in requests:
            self.check(r)
        with self._cond:
            if self._stopping or self._thread is None:
                raise RuntimeError("the scheduler is not running")
            if len(self._queue) + len(requests) > self.limits.max_queue:
                raise QueueFull(f"the queue is full ({len(self._queue)} waiting, limit "
                                f"{self.limits.max_queue}); retry later")
            handles = [Handle(next(self._ids), r, key, on_output, self) for r in requests]
            for h in handles:
                self._queue.push(h, key)
                self._active[h.id] = h
            self._cond.notify()
        return handles

    def cancel(self, handle: Handle) -> None:
        with self._cond:
            if handle.state == "done" or handle.cancel_requested:
                return
            handle.cancel_requested = True
            self._cancels.append(handle)
            self._cond.notify()

    def start(self) -> Scheduler:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="optkit-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every queued or running sequence as cancelled and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        e = self.engine
        return {"waiting": len(self._queue), "running": len(self._live),
                "free_slots": len(self._free), "slots": e.max_slots,
                "cache_tokens": self._cache_used, "cache_capacity": e.max_slots * e.max_len,
                "tokens_in_flight": self._reserved, "active": len(self._active),
                "steps": self.steps, "alive": self.alive}

    # Engine thread ----------------------------------------------------------------------------
    def _ready(self, forming: bool = False) -> tuple[bool, float | None]:
        """(may admit now, seconds until that may change) -- under the lock.  ``forming``:
        a static batch is being filled."""
        if not self._queue or not self._free:
            return False, None
        if self.policy == "static" and not forming:
            if self._live:
                return False, None
            if len(self._queue) < self.engine.max_slots:
                head = self._queue.peek()
                left = head.t_submit + self.static_wait - time.perf_counter()
                if left > 0:
                    return False, left
        return True, None

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while True:
                        ready, wait = self._ready()
                        if self._stopping or self._cancels or self._live or ready:
                            break
                        self._cond.wait(wait)
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, []
                self._cancel_now(cancels)
                del cancels  # the thread sleeps in this frame: hold no finished handle
                self._admit()
                if self._live:
                    self._step()
        except Exception:  # a bug here must not leave clients hanging
            log.exception("engine thread crashed")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            waiting = self._queue.items()
            for h in waiting:
                self._queue.remove(h)
            self._cancels = []
        for h in list(self._live.values()) + waiting:
            self._finish(h, "cancelled", error="the server is shutting down")

    def _cancel_now(self, handles: list[Handle]) -> None:
        for h in handles:
            if h.state == "waiting":
                with self._cond:
                    removed = self._queue.remove(h)
                if removed:
                    self._finish(h, "cancelled")
            elif h.state == "running":
                self._finish(h, "cancelled")

    def _admit(self) -> None:
        forming = False
        while True:
            with self._cond:
                ready, _ = self._ready(forming)
                if not ready or self._stopping:
                    return
                h = self._queue.peek()
                if self._reserved + h.cost > self.budget:
                    return
                self._queue.pop()
                h.state = "running"
            forming = self.policy == "static"  # fill the batch, then run it to the end
            if h.cancel_requested:
                self._finish(h, "cancelled")
                continue
            h.admitted = True
            self._reserved += h.cost
            r = h.request
            if r.max_tokens == 0 and not (r.echo and r.logprobs is not None):
                self._start(h, None)  # nothing for the model to do
                continue
            try:
                prefix = self.engine.prefill(EngineRequest(
                    r.prompt, r.max_tokens, r.sampling, r.logprobs or 0,
                    prompt_logprobs=r.echo and r.logprobs is not None))
            except Exception as e:
                log.exception("prefill failed")
                self._finish(h, "error", error=f"prefill failed: {e}")
                continue
            self._start(h, prefix)

    def _start(self, h: Handle, prefix: Prefix | None) -> None:
        r = h.request
        if self.metrics and prefix is not None:
            self.metrics.prompt_tokens.inc(len(r.prompt))
        if r.echo:
            lps, tops = None, None
            if r.logprobs is not None and prefix is not None:
                lps = prefix.prompt_logprobs
                ids = prefix.prompt_top_ids
                tops = [self._top(None if ids is None else ids[i],
                                  None if ids is None else prefix.prompt_top_logprobs[i],
                                  r.logprobs, tok, lps[i])
                        for i, tok in enumerate(r.prompt[1:])]
            h.prompt_text, entries = prompt_entries(self.codec, r.prompt, lps, tops)
            h.prompt_entries = entries if r.logprobs is not None else None
        start = len(h.prompt_text) if h.prompt_text is not None else 0
        h.stream = TextStream(self.codec, r.stop, start=start)
        if r.max_tokens == 0:
            self._finish(h, "length")
            return
        now = time.perf_counter()
        h.t_first = h.t_last = now
        if self.metrics:
            self.metrics.ttft.observe(now - h.t_submit)
        f = prefix.first
        finished = self._take(h, f.ids[0], f.logprobs[0],
                              None if f.top_ids is None else f.top_ids[0],
                              None if f.top_logprobs is None else f.top_logprobs[0])
        if finished:
            self._finish(h, finished)
            return
        slot = self._free.pop()
        self.engine.insert(prefix, slot)
        h.slot, h.length = slot, prefix.length + 1
        self._live[slot] = h
        self._cache_used += h.length
        self._deliver(h)

    def _top(self, ids, lps, k: int, chosen: int, chosen_lp: float) -> dict[str, float]:
        """Top-k alternatives as text -> log-prob, plus the chosen token (as OpenAI)."""
        out = {}
        if ids is not None:
            out = {self.codec.token_str(int(i)): float(lp)
                   for i, lp in zip(ids[:k], lps[:k], strict=True)}
        out.setdefault(self.codec.token_str(int(chosen)), float(chosen_lp))
        return out

    def _take(self, h: Handle, tok, lp, top_ids, top_lps) -> str | None:
        """Account one generated token; return a finish reason if the sequence is done."""
        r, tok, lp = h.request, int(tok), float(lp)
        h.generated += 1
        h.cum_logprob += lp
        if tok == self.engine.eos_token_id and not r.ignore_eos:
            return "stop"
        entry = None
        if r.logprobs is not None:
            entry = TokenEntry(self.codec.token_str(tok), lp,
                               self._top(top_ids, top_lps, r.logprobs, tok, lp), 0)
        h.stream.add(tok, entry)
        if h.stream.stopped:
            return "stop"
        if h.generated >= r.max_tokens:
            return "length"
        return None

    def _step(self) -> None:
        with self._cond:
            n = 1 if len(self._queue) else self.steps_per_dispatch
        live = list(self._live.items())
        try:
            toks = self.engine.generate(n)
        except Exception as e:
            log.exception("generate failed")
            for _, h in live:
                self._finish(h, "error", error=f"generation failed: {e}")
            return
        self.steps += n
        now = time.perf_counter()
        for slot, h in live:
            if h.state != "running":
                continue
            finished, taken = None, 0
            for i in range(n):
                taken += 1
                finished = self._take(
                    h, toks.ids[i, slot], toks.logprobs[i, slot],
                    None if toks.top_ids is None else toks.top_ids[i, slot],
                    None if toks.top_logprobs is None else toks.top_logprobs[i, slot])
                if finished:
                    break
            if self.metrics:
                for _ in range(taken):
                    self.metrics.tpot.observe((now - h.t_last) / taken)
            h.t_last = now
            h.length += taken
            self._cache_used += taken
            if finished:
                self._finish(h, finished)
            else:
                self._deliver(h)

    def _finish(self, h: Handle, reason: str, error: str | None = None) -> None:
        if h.state == "done":
            return
        h.state, h.t_done = "done", time.perf_counter()
        if h.slot is not None:
            self.engine.free(h.slot)
            self._live.pop(h.slot, None)
            self._free.append(h.slot)
            self._cache_used -= h.length
            h.slot = None
        if h.admitted:
            self._reserved -= h.cost
        if h.stream is not None and reason in ("stop", "length"):
            h.stream.finish()
            if h.stream.stopped:
                reason = "stop"
        h.finish_reason = reason
        with self._cond:
            self._active.pop(h.id, None)
        if self.metrics:
            self.metrics.finished.labels(reason).inc()
            self.metrics.generation_tokens.inc(h.generated)
            if reason in ("stop", "length"):
                self.metrics.e2e.observe(h.t_done - h.t_submit)
        self._deliver(h, final=True, error=error)

    def _deliver(self, h: Handle, final: bool = False, error: str | None = None) -> None:
        text, entries = "", []
        if h.stream is not None:
            text = h.stream.release(final)
            if h.request.logprobs is not None:
                entries = h.stream.pop_entries(final)
        first = h.prompt_text is not None and not h.prompt_sent
        if not (final or text or entries or first):
            return
        out = Output(text, entries, h.finish_reason if final else None, h.generated,
                     h.cum_logprob, error=error)
        if first:
            out.prompt_text, out.prompt_entries = h.prompt_text, h.prompt_entries
            h.prompt_sent = True
        if h.on_output is not None:
            try:
                h.on_output(h, out)
            except Exception:
                log.exception("output callback failed")

