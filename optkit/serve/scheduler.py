"""Continuous batching: the engine thread, the waiting queue and each sequence's bookkeeping.

Threads and queues (one engine thread; the HTTP side never waits on it)::

  asyncio event loop (uvicorn)                  engine thread "optkit-engine"
  ----------------------------                  ------------------------------------------
  POST /v1/completions                          loop:
    tokenize + validate                           1. apply cancellations: drop from the queue
    submit(seqs) --push--> [waiting: FairQueue]      or free the sequence's blocks
               (lock)       one FIFO per key  -->  2. plan a step (below)
                            weighted by key        3. engine.step(works): one forward over
    handle.cancel() -----> [cancel list]              the step's decodes and prompt chunks
    (client gone, Stop)       (lock)               4. per sequence: stop on EOS / stop string /
                                                     max_tokens, free its blocks at once,
  per-request asyncio.Queue <--------------------    send the released text + log-probs
    -> SSE chunks or JSON     call_soon_threadsafe
                              (never blocks)
  GET /health, /metrics  <-- stats(): plain reads of counters the engine thread keeps

Planning a step (``engine.max_batched_tokens`` new tokens at most; an engine whose steps
hold their decode rows beside the prompt chunks, ``decodes_in_budget`` false, gives the
chunks the whole budget):

1. every running sequence whose tokens are all in the cache but its last decodes one token
   (all of them, whatever the budget); each first gets the block its next token needs.  When
   no block is left, the most recently admitted sequence is *preempted*: its blocks are
   freed and it goes back to the front of the line, to be recomputed (prompt + what it has
   generated, as a prompt) when blocks free up -- its tokens do not change;
2. sequences still prefilling continue with the next chunk of their prompt, oldest first;
3. the budget left admits new sequences (preempted ones first, then the fair queue) while
   fewer than ``engine.max_num_seqs`` run and the blocks of their whole prompt are free,
   besides one block for each running sequence's next tokens (cached prompt blocks are
   shared instead: prefix caching).

So several short prompts prefill in one step, a long one is split over steps, and a running
stream gets a token every step whatever arrives.  While no prompt is being prefilled and
none can start (nobody waits, or ``max_num_seqs`` run), ``steps_per_dispatch`` decode steps
run in one dispatch (never past a sequence's ``max_tokens``: one ending at its length frees
its place at the dispatch's end).

Shutting down (:meth:`Scheduler.close`, then :meth:`Scheduler.stop`): ``close`` stops
admitting -- :meth:`Scheduler.submit` raises :class:`ShuttingDown`, and sequences still
waiting end at once (cancelled, with a shutting-down error) -- while running ones go on;
``stop`` ends whatever still runs the same way and joins the thread.

``policy="static"`` is Alpa's scheme, kept as the benchmark baseline: wait until
``max_num_seqs`` requests are queued (or the oldest has waited ``static_wait`` s), run them
together to completion, and only then admit the next batch.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from optkit.serve.blocks import BlockManager
from optkit.serve.engine import Engine, EngineRequest, SamplingParams, Work
from optkit.serve.queue import FairQueue
from optkit.serve.text import Codec, TextStream, TokenEntry, prompt_entries

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the server cannot run (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


#: Bounds of a Retry-After estimate (seconds).
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1, 60
#: Admissions that :func:`retry_after` estimates the admission rate from.
RATE_WINDOW = 64
#: The error that sequences ended by a shutdown carry.
SHUTTING_DOWN = "the server is shutting down"


class Refused(RuntimeError):
    """A submission refused for now; ``retry_after``: seconds until it may succeed."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_MIN):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Refused):
    """The waiting queue is at its limit (HTTP 429); ``retry_after``: until it should have
    room (:func:`retry_after`)."""


class ShuttingDown(Refused):
    """The scheduler was closed (HTTP 503); ``retry_after``: until its shutdown grace
    period ends (at least 1)."""


def retry_after(excess: int, admitted: Sequence[float], now: float) -> int:
    """Seconds until ``excess`` more sequences have left the waiting queue, at the rate of
    the recent admissions ``admitted`` (their times, oldest first, up to ``now``): the
    window's count over the time from its oldest admission to now, so the rate falls while
    nothing is admitted.  Rounded up and clipped to [1, 60]; 1 before the first admission
    (a burst at startup: the rate is known a moment later)."""
    if not admitted:
        return RETRY_AFTER_MIN
    span = now - admitted[0]
    seconds = excess * span / len(admitted) if span > 0 else 0.0
    return int(min(max(math.ceil(seconds), RETRY_AFTER_MIN), RETRY_AFTER_MAX))


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
    state: str = "waiting"          # waiting -> running (admitted; maybe preempted) -> done
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    t_done: float | None = None
    generated: int = 0
    cum_logprob: float = 0.0
    tokens: list[int] = field(default_factory=list, repr=False)  # prompt + generated
    computed: int = 0               # leading tokens whose K/V are in the blocks
    preemptions: int = 0
    admitted: bool = False
    cancel_requested: bool = False
    stream: TextStream | None = field(default=None, repr=False)
    prompt_text: str | None = field(default=None, repr=False)
    prompt_entries: list[TokenEntry] | None = field(default=None, repr=False)
    prompt_sent: bool = False
    prompt_scores: list | None = field(default=None, repr=False)  # [lp, ids, top lp] arrays
    scored: int = 0                 # prompt positions [0, scored) have their scores
    noted: int = 0                  # ... kept with their cached blocks up to here

    @property
    def cost(self) -> int:
        return len(self.request.prompt) + self.request.max_tokens

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def scoring(self) -> bool:
        """Whether the prompt's log-probs are wanted (echo + logprobs)."""
        r = self.request
        return r.echo and r.logprobs is not None and len(r.prompt) > 1

    def cancel(self) -> None:
        self.scheduler.cancel(self)


class Scheduler:
    """Feeds an :class:`~optkit.serve.engine.Engine` from a queue on its own thread.

    ``prefix_caching=False`` turns sharing of cached prompt blocks off (outputs are the
    same either way)."""

    def __init__(self, engine: Engine, codec: Codec, limits: Limits = Limits(),
                 weights: Mapping[str, float] | None = None, policy: str = "continuous",
                 static_wait: float = 0.0, steps_per_dispatch: int = 8, metrics=None,
                 prefix_caching: bool = True):
        if policy not in ("continuous", "static"):
            raise ValueError(f"policy must be 'continuous' or 'static', not {policy!r}")
        self.engine, self.codec, self.limits = engine, codec, limits
        self.policy, self.static_wait = policy, static_wait
        self.steps_per_dispatch = max(1, int(steps_per_dispatch))
        self.metrics = metrics
        self.max_prompt_len = min(limits.max_prompt_len or engine.max_len, engine.max_len)
        self.budget = limits.max_tokens_in_flight or engine.max_num_seqs * engine.max_len
        self.blocks = BlockManager(engine.num_blocks, engine.block_size,
                                   prefix_caching and engine.prefix_caching)
        self._cond = threading.Condition()
        self._queue = FairQueue(weights)
        self._cancels: list[Handle] = []
        self._active: dict[int, Handle] = {}    # waiting or running (leak checks)
        self._running: dict[int, Handle] = {}   # id -> admitted and holding blocks, in order
        self._resume: list[Handle] = []         # preempted: admitted again first
        self._reserved = 0
        self._cache_used = 0
        self._ids = itertools.count()
        self._stopping = False
        self._closed_until: float | None = None  # set by close(): the grace period's end
        self._admitted: deque[float] = deque(maxlen=RATE_WINDOW)  # times, from the queue
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.preemptions = 0

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
        if self.blocks.blocks_for(n + r.max_tokens) > self.blocks.usable:
            raise RequestError(f"prompt + max_tokens = {n + r.max_tokens} tokens do not fit "
                               f"the server's KV cache ({self.blocks.usable} blocks of "
                               f"{self.blocks.block_size})", "max_tokens")
        bad = [t for t in r.prompt if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary "
                               f"[0, {self.engine.vocab_size})", "prompt")
        if r.logprobs is not None and not 0 <= r.logprobs <= self.engine.max_logprobs:
            raise RequestError(f"logprobs must be between 0 and {self.engine.max_logprobs}",
                               "logprobs")
        if r.sampling.repetition_penalty != 1.0 and not self.engine.penalties:
            raise RequestError("this server's engine has no repetition penalty",
                               "repetition_penalty")
        if not r.sampling.repetition_penalty > 0:
            raise RequestError("repetition_penalty must be positive", "repetition_penalty")

    def submit(self, requests: Sequence[SeqRequest], key: str | None = None,
               on_output: OnOutput | None = None) -> list[Handle]:
        """Queue sequences (all or none).  Raises RequestError, QueueFull or (once
        closed) ShuttingDown."""
        for r in requests:
            self.check(r)
        if len(requests) > self.limits.max_queue:
            raise RequestError(f"the request has {len(requests)} sequences (prompts x "
                               f"best_of); this server queues at most {self.limits.max_queue}")
        with self._cond:
            now = time.perf_counter()
            if self._closed_until is not None:
                left = math.ceil(self._closed_until - now)
                raise ShuttingDown(SHUTTING_DOWN, max(left, RETRY_AFTER_MIN))
            if self._stopping or self._thread is None:
                raise RuntimeError("the scheduler is not running")
            excess = len(self._queue) + len(requests) - self.limits.max_queue
            if excess > 0:
                raise QueueFull(f"the queue is full ({len(self._queue)} waiting, limit "
                                f"{self.limits.max_queue}); retry later",
                                retry_after(excess, self._admitted, now))
            handles = [Handle(next(self._ids), r, key, on_output, self) for r in requests]
            for h in handles:
                h.tokens = list(h.request.prompt)
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
            self._stopping, self._closed_until = False, None
            self._thread = threading.Thread(target=self._loop, name="optkit-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self, grace: float = 0.0) -> None:
        """Stop admitting: :meth:`submit` raises :class:`ShuttingDown` from now on (its
        ``retry_after`` counts down the ``grace`` seconds), and sequences still waiting end
        at once, cancelled with a shutting-down error; running (and preempted) ones go on."""
        with self._cond:
            if self._closed_until is not None:
                return
            self._closed_until = time.perf_counter() + grace
            for h in self._queue.items():
                if not h.cancel_requested:
                    h.cancel_requested = True
                    self._cancels.append(h)
            self._cond.notify()

    @property
    def idle(self) -> bool:
        """No sequence is waiting or running."""
        return not self._active

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
        e, b = self.engine, self.blocks
        running = len(self._running)
        return {"waiting": len(self._queue) + len(self._resume), "running": running,
                "free_slots": e.max_num_seqs - running, "slots": e.max_num_seqs,
                "cache_tokens": self._cache_used, "cache_capacity": b.usable * b.block_size,
                "blocks_used": b.num_used, "blocks_free": b.num_free,
                "prefix_cache_queries": b.queries, "prefix_cache_hits": b.hits,
                "preemptions": self.preemptions,
                "tokens_in_flight": self._reserved, "active": len(self._active),
                "steps": self.steps, "alive": self.alive,
                "closed": self._closed_until is not None}

    # Engine thread ----------------------------------------------------------------------------
    def _ready(self, forming: bool = False) -> tuple[bool, float | None]:
        """(may admit now, seconds until that may change) -- under the lock.  ``forming``:
        a static batch is being filled."""
        if not (self._queue or self._resume) or len(self._running) >= self.engine.max_num_seqs:
            return False, None
        if self.policy == "static" and not forming:
            if self._running:
                return False, None
            if len(self._queue) < self.engine.max_num_seqs and not self._resume:
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
                        if self._stopping or self._cancels or self._running or ready:
                            break
                        self._cond.wait(wait)
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, []
                self._cancel_now(cancels)
                del cancels  # the thread sleeps in this frame: hold no finished handle
                works, handles, n = self._plan()
                if works:
                    self._step(works, handles, n)
                del works, handles
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
        for h in list(self._running.values()) + list(self._resume) + waiting:
            self._finish(h, "cancelled", error=SHUTTING_DOWN)

    def _cancel_now(self, handles: list[Handle]) -> None:
        for h in handles:
            if h.state == "waiting":
                with self._cond:
                    removed = self._queue.remove(h)
                if removed:
                    self._finish(h, "cancelled", error=self._cancel_error())
            elif h.state == "running":
                self._finish(h, "cancelled")

    def _cancel_error(self) -> str | None:
        """Why a waiting sequence was cancelled: a shutdown, or (None) its client."""
        return SHUTTING_DOWN if self._closed_until is not None else None

    # Planning -------------------------------------------------------------------------------
    def _preempt(self, h: Handle) -> None:
        """Free a running sequence's blocks; it is recomputed when admitted again."""
        self.blocks.free(h.id)
        self._running.pop(h.id, None)
        self._cache_used -= h.computed
        h.computed = 0
        h.preemptions += 1
        self.preemptions += 1
        self._resume.append(h)
        if self.metrics:
            self.metrics.preemptions.inc()

    def _work(self, h: Handle, chunk: int) -> Work:
        r = h.request
        start, end = h.computed, h.computed + chunk
        n_prompt = len(r.prompt)
        targets = ()
        if h.scoring and start < n_prompt - 1:
            targets = tuple(r.prompt[start + 1:min(end, n_prompt - 1) + 1])
        sp = r.sampling
        return Work(h.id, h.tokens[start:end], start, self.blocks.tables[h.id],
                    EngineRequest(r.prompt, r.max_tokens, sp, r.logprobs or 0, h.scoring),
                    sample=end == len(h.tokens), count=h.generated, targets=targets,
                    context=h.tokens[:end] if sp.repetition_penalty != 1.0 else ())

    def _plan(self) -> tuple[list[Work], list[Handle], int]:
        """The next step's works (see the module docstring) and its decode steps."""
        e = self.engine
        budget = e.max_batched_tokens
        with self._cond:  # nothing may start before a running sequence ends
            quiet = not self._queue or len(self._running) >= e.max_num_seqs
        decodes = [h for h in self._running.values() if len(h.tokens) - h.computed == 1]
        n = 1
        if (quiet and not self._resume and len(decodes) == len(self._running)):
            n = min([self.steps_per_dispatch]
                    + [h.request.max_tokens - h.generated for h in decodes])
            n = max(1, n)
        chosen: list[Handle] = []
        for h in decodes:
            while h.id in self._running and not self.blocks.grow(h.id, h.computed + n):
                victim = next(reversed(self._running.values()))
                self._preempt(victim)
            if h.id in self._running:
                chosen.append(h)
        works = [self._work(h, 1) for h in chosen]
        if e.decodes_in_budget:
            budget -= len(chosen)
        granule, chunks = e.chunk_granule, 0

        def chunk_size(left: int) -> int:
            """Tokens of a prompt with ``left`` to go that fit the budget: chunks take it in
            whole granules (rows of the engine's step), but the step's first chunk may have
            what is left of the budget."""
            if not e.chunked_prefill:
                return left
            room = budget // granule * granule
            return min(left, room if room or chunks else budget)

        for h in list(self._running.values()):  # prompts being prefilled, oldest first
            left = len(h.tokens) - h.computed
            chunk = chunk_size(left) if left > 1 and budget > 0 else 0
            if not chunk:
                continue
            works.append(self._work(h, chunk))
            chosen.append(h)
            budget -= -(-chunk // granule) * granule
            chunks += 1
        forming = False
        while budget > 0 and (budget >= granule or not chunks):
            action = self._next_admission(forming)
            if action is None:
                break
            kind, h = action
            if kind == "cancel":
                self._finish(h, "cancelled", error=self._cancel_error())
                continue
            forming = self.policy == "static"  # fill the batch, then run it to the end
            if kind == "trivial":
                self._start(h)  # nothing for the model to do
                continue
            hits, queries = self.blocks.hits, self.blocks.queries
            need = self._need(h)
            h.computed = self.blocks.allocate(h.id, h.tokens, need=need)
            if need is not None:
                self._cached_scores(h)
            if self.metrics:
                self.metrics.prefix_queries.inc(self.blocks.queries - queries)
                self.metrics.prefix_hits.inc(self.blocks.hits - hits)
            self._cache_used += h.computed
            self._running[h.id] = h
            chunk = chunk_size(len(h.tokens) - h.computed)
            works.append(self._work(h, chunk))
            chosen.append(h)
            budget -= -(-chunk // granule) * granule
            chunks += 1
        return works, chosen, n if all(len(w.tokens) == 1 for w in works) else 1

    def _score_k(self, h: Handle) -> int:
        """Top alternatives the engine returns for this sequence's prompt scores."""
        return self.engine.max_logprobs if h.request.logprobs else 0

    def _need(self, h: Handle):
        """Which cached blocks a sequence may take: any, unless its prompt is still to be
        scored -- then only blocks that kept the scores of their tokens (with as many top
        alternatives, and the same next token after the block)."""
        if not h.scoring or h.t_first is not None:
            return None
        k, prompt, bs = self._score_k(h), h.request.prompt, self.blocks.block_size
        return lambda i, note: (note is not None and note[0] >= k
                                and note[1] == prompt[(i + 1) * bs])

    def _next_admission(self, forming: bool) -> tuple[str, Handle] | None:
        """Take the next sequence to admit (preempted ones first) -> ("cancel" | "trivial" |
        "admit", handle), or None when none may start now."""
        with self._cond:
            ready, _ = self._ready(forming)
            if not ready or self._stopping:
                return None
            if self._resume:
                h = self._resume[0]
                if not self.blocks.can_allocate(h.tokens, True, len(self._running),
                                                self._need(h)):
                    return None
                self._resume.pop(0)
                return "admit", h
            h = self._queue.peek()
            if h.cancel_requested:
                self._queue.pop()
                h.state = "running"
                return "cancel", h
            if self._reserved + h.cost > self.budget:
                return None
            trivial = h.request.max_tokens == 0 and not h.scoring
            if not trivial:
                if self._running and self.blocks.pending(h.tokens):
                    return None  # its prompt's next block is being computed: share it
                # room for its prompt and for the next block of every running sequence
                if not self.blocks.can_allocate(h.tokens, True, len(self._running),
                                                self._need(h)):
                    return None
            self._queue.pop()
            self._admitted.append(time.perf_counter())
            h.state, h.admitted = "running", True
            self._reserved += h.cost
            return ("trivial" if trivial else "admit"), h

    # Stepping -------------------------------------------------------------------------------
    def _step(self, works: list[Work], handles: list[Handle], n: int) -> None:
        try:
            out = self.engine.step(works, n)
        except Exception:  # logged here; clients get no exception text
            log.exception("engine step failed")
            for h in handles:
                self._finish(h, "error", error="internal error: generation failed")
            return
        self.steps += n
        now = time.perf_counter()
        toks = out.tokens
        for i, (w, h) in enumerate(zip(works, handles, strict=True)):
            if h.state != "running" or h.id not in self._running:
                continue
            if w.targets and out.scores[i] is not None:
                self._keep_scores(h, w, out.scores[i])
            fed = len(w.tokens) + n - 1
            h.computed += fed
            self._cache_used += fed
            if self.metrics and w.start < len(h.request.prompt):
                self.metrics.prompt_tokens.inc(min(len(w.tokens),
                                                   len(h.request.prompt) - w.start))
            if not w.sample:
                self.blocks.commit(h.id, h.tokens, h.computed)
                if w.targets:
                    self._note_scores(h)
                continue
            first = h.t_first is None
            if first:
                if h.scoring:
                    self.blocks.commit(h.id, h.tokens, h.computed)
                    self._note_scores(h)
                self._start(h)
                if h.state == "done":
                    continue
            if h.request.logprobs is None and not h.stream.matcher:
                taken, finished = self._take_plain(h, toks.ids[:n, i], toks.logprobs[:n, i])
            else:
                finished, taken = None, 0
                for j in range(n):
                    taken += 1
                    finished = self._take(
                        h, toks.ids[j, i], toks.logprobs[j, i],
                        None if toks.top_ids is None else toks.top_ids[j, i],
                        None if toks.top_logprobs is None else toks.top_logprobs[j, i])
                    if finished:
                        break
            if self.metrics and not first:
                for _ in range(taken):
                    self.metrics.tpot.observe((now - h.t_last) / taken)
            h.t_last = now
            if finished:
                self._finish(h, finished)
            else:
                self.blocks.commit(h.id, h.tokens, h.computed)
                self._deliver(h)

    def _scores(self, h: Handle) -> list:
        """The prompt scores being filled: log-probs (m,), top ids and log-probs (m, k)."""
        if h.prompt_scores is None:
            m, k = len(h.request.prompt) - 1, self._score_k(h)
            h.prompt_scores = [np.zeros(m), np.zeros((m, k), np.int64), np.zeros((m, k))]
        return h.prompt_scores

    def _cached_scores(self, h: Handle) -> None:
        """Scores of the prompt positions in the cached blocks a sequence took."""
        lp, ids, tlp = self._scores(h)
        k, bs = ids.shape[1], self.blocks.block_size
        for i in range(h.computed // bs):
            note = self.blocks.notes[self.blocks.tables[h.id][i]]
            a = i * bs
            lp[a:a + bs] = note[2]
            ids[a:a + bs], tlp[a:a + bs] = note[3][:, :k], note[4][:, :k]
        h.scored = h.noted = h.computed

    def _keep_scores(self, h: Handle, w: Work, score) -> None:
        lp, ids, tlp = score
        keep = self._scores(h)
        k = keep[1].shape[1]
        a, b = w.start, w.start + len(lp)
        keep[0][a:b] = lp
        if k and ids is not None:
            keep[1][a:b], keep[2][a:b] = ids[:, :k], tlp[:, :k]
        h.scored = b

    def _note_scores(self, h: Handle) -> None:
        """Keep the scores of a scored prompt's full blocks with them in the cache."""
        bs, prompt = self.blocks.block_size, h.request.prompt
        lp, ids, tlp = h.prompt_scores
        # a block's last score is of the token after it: that token must be known
        end = min(h.scored, h.computed, len(prompt) - 1) // bs
        for i in range(h.noted // bs, end):
            a = i * bs
            self.blocks.annotate(h.id, i, (ids.shape[1], prompt[a + bs], lp[a:a + bs].copy(),
                                           ids[a:a + bs].copy(), tlp[a:a + bs].copy()))
        h.noted = max(h.noted, end * bs)

    def _start(self, h: Handle) -> None:
        """The first token is due (or nothing is): echo the prompt, start the text."""
        r = h.request
        if r.echo:
            lps, tops = None, None
            if r.logprobs is not None and h.prompt_scores is not None:
                lps, ids, tlps = h.prompt_scores
                k = ids.shape[-1]
                tops = [self._top(ids[i] if k else None, tlps[i] if k else None,
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
        h.tokens.append(tok)
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

    def _take_plain(self, h: Handle, ids, lps) -> tuple[int, str | None]:
        """:meth:`_take` of a step's tokens at once, for a sequence whose text needs no
        per-token work (no stop strings, no log-probs) -> (tokens taken, finish reason)."""
        r, ids = h.request, [int(t) for t in ids]
        k, reason = min(len(ids), r.max_tokens - h.generated), None
        eos = self.engine.eos_token_id
        if not r.ignore_eos and eos in ids[:k]:
            k, reason = ids.index(eos) + 1, "stop"
        elif h.generated + k >= r.max_tokens:
            reason = "length"
        for lp in lps[:k]:
            h.cum_logprob += float(lp)
        h.generated += k
        h.tokens.extend(ids[:k])
        h.stream.extend(ids[:k - 1] if reason == "stop" else ids[:k])
        return k, reason

    def _finish(self, h: Handle, reason: str, error: str | None = None) -> None:
        if h.state == "done":
            return
        h.state, h.t_done = "done", time.perf_counter()
        if h.id in self._running:
            self._running.pop(h.id)
            self._cache_used -= h.computed
        if h.id in self.blocks.tables:
            self.blocks.free(h.id)
        if h in self._resume:
            self._resume.remove(h)
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
