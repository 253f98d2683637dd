"""The serving engine contract and its implementation over any optkit executor.

An engine owns a batch of ``max_slots`` decode *slots* (rows of one KV cache) and knows
nothing of HTTP, queues or text.  The scheduler drives it with three calls::

    prefix = engine.prefill(request)   # run one prompt alone (batch 1) -> its cache + 1st token
    engine.insert(prefix, slot)        # copy that cache into a free row of the batch
    step = engine.generate(n)          # advance every slot by n tokens (dead rows compute
                                       # garbage that nobody reads)
    engine.free(slot)                  # the row may be overwritten by the next insert

Sampling parameters live per slot (temperature, top-k, top-p, a seed and the sequence's
stream within its request), so one batch mixes greedy and sampled requests; the i-th token
is drawn by ``optkit.generation.sampling.sample_tokens`` with the key of (seed, stream, i),
whatever slot it sits in and whatever else runs beside it -- the same draw ``generate``
makes for row ``stream`` of a call with that seed.

:class:`ModelEngine` only calls the executor interface (``init_cache``, ``prefill``,
``insert``, and ``decode_loop`` -- or plain ``decode`` where an executor has no loop), so a
single-device, SPMD-mesh, pipeline or Ray executor serves unchanged.
:class:`optkit.serve.fake.FakeEngine` is a hand-checkable stand-in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from optkit.generation.sampling import logprobs as token_logprobs
from optkit.generation.sampling import sample_tokens

MIN_BUCKET = 16


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # <= 0: greedy
    top_p: float = 1.0
    top_k: int = 0             # <= 0: off
    seed: int = 0
    stream: int = 0            # the sequence's index within its request (``n`` > 1)
    min_tokens: int = 0        # no EOS before this many generated tokens
    repetition_penalty: float = 1.0  # 1: off; a seen token: logit / p if > 0 else logit * p


@dataclass(frozen=True)
class EngineRequest:
    """What an engine needs to start a sequence."""

    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    num_top: int = 0               # top alternatives wanted per token
    prompt_logprobs: bool = False  # also score the prompt (echo + logprobs)


@dataclass
class Tokens:
    """Tokens of ``n`` steps for ``B`` rows: ids and log-probs (n, B), top (n, B, K)."""

    ids: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@dataclass
class Prefix:
    """A prefilled prompt: engine-private state, cache positions used, its first token
    (a one-row :class:`Tokens`) and, when asked, log-probs of prompt tokens 1..T-1."""

    state: Any
    length: int
    first: Tokens
    prompt_logprobs: np.ndarray | None = None        # (T-1,)
    prompt_top_ids: np.ndarray | None = None         # (T-1, K)
    prompt_top_logprobs: np.ndarray | None = None
    request: EngineRequest | None = None


class Engine(Protocol):
    max_slots: int
    max_len: int          # most tokens (prompt + generated) one sequence may hold
    vocab_size: int
    eos_token_id: int | None
    max_logprobs: int

    def prefill(self, request: EngineRequest) -> Prefix: ...
    def insert(self, prefix: Prefix, slot: int) -> None: ...
    def generate(self, num_steps: int = 1) -> Tokens: ...
    def free(self, slot: int) -> None: ...


# ---------------------------------------------------------------------------------------------
# Pure functions (jitted once per shape)
# ---------------------------------------------------------------------------------------------
def sample_step(num_top: int, logits, state):
    """``decode_loop`` step: per-row sampling + log-probs;
    state = (seeds, streams, counts, temperature, top_k, top_p)."""
    seeds, streams, counts, temperature, top_k, top_p = state
    tok = sample_tokens(logits, seeds, streams, counts, temperature, top_k, top_p)
    lp, top_ids, top_lp = token_logprobs(logits, tok, num_top)
    out = (tok, lp) if num_top == 0 else (tok, lp, top_ids, top_lp)
    return tok, (seeds, streams, counts + 1, temperature, top_k, top_p), out


@functools.cache
def step_fn(num_top: int):
    """One stable function object per ``num_top``: executors cache compiled decode loops
    by the step function's identity, so every engine shares them."""
    return functools.partial(sample_step, num_top)


@functools.partial(jax.jit, static_argnums=0)
def _first_token(num_top, logits, state):
    return sample_step(num_top, logits, state)[2]


_sample_jit = jax.jit(sample_step, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _score_prompt(num_top, logits, tokens):
    """Log-probs of tokens[1:] under logits[:-1] (one row)."""
    return token_logprobs(logits[0, :-1], tokens[0, 1:], num_top)


def _tokens(out, num_top: int) -> Tokens:
    out = jax.device_get(out)
    if num_top:
        return Tokens(np.asarray(out[0]), np.asarray(out[1]), np.asarray(out[2]),
                      np.asarray(out[3]))
    return Tokens(np.asarray(out[0]), np.asarray(out[1]))


def bucket_length(n: int, limit: int) -> int:
    """Padded prompt length: the next power of two (>= 16), but never above ``limit``
    (the room left in a slot) unless the prompt itself is longer."""
    b = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    return max(n, min(b, limit))


class ModelEngine:
    """Slots over an executor: one KV cache of ``max_slots`` rows of ``max_len`` positions.

    ``max_logprobs`` bounds the top alternatives per token (two compiled decode variants:
    without and with top-``max_logprobs``).
    """

    def __init__(self, executor, max_slots: int = 16, max_len: int | None = None,
                 max_logprobs: int = 5):
        cfg = executor.cfg
        self.executor = executor
        self.cfg = cfg
        self.max_slots = int(max_slots)
        self.max_len = int(min(max_len or cfg.max_position_embeddings,
                               cfg.max_position_embeddings))
        self.vocab_size = cfg.vocab_size
        self.eos_token_id = cfg.eos_token_id
        self.pad_token_id = cfg.pad_token_id
        self.max_logprobs = int(max_logprobs)
        if self.max_slots < 1 or self.max_len < 2:
            raise ValueError("need max_slots >= 1 and max_len >= 2")
        self.cache = executor.init_cache(self.max_slots, self.max_len)
        b = self.max_slots
        self._last = np.full(b, self.pad_token_id, np.int32)
        self._seeds = np.zeros(b, np.uint32)
        self._streams = np.zeros(b, np.uint32)
        self._counts = np.zeros(b, np.int32)
        self._temp = np.zeros(b, np.float32)
        self._top_k = np.zeros(b, np.int32)
        self._top_p = np.ones(b, np.float32)
        self._num_top = np.zeros(b, np.int32)

    # The three calls --------------------------------------------------------------------------
    def prefill(self, request: EngineRequest) -> Prefix:
        n = len(request.prompt)
        if not 1 <= n <= self.max_len or n + request.max_tokens > self.max_len:
            raise ValueError(f"prompt of {n} + {request.max_tokens} tokens does not fit "
                             f"{self.max_len} positions")
        if request.num_top > self.max_logprobs:
            raise ValueError(f"at most {self.max_logprobs} top log-probs")
        t = bucket_length(n, self.max_len - request.max_tokens)
        tokens = np.full((1, t), self.pad_token_id, np.int32)
        mask = np.zeros((1, t), np.int32)
        tokens[0, t - n:] = request.prompt
        mask[0, t - n:] = 1
        cache = self.executor.init_cache(1, t)
        logits, cache = self.executor.prefill(tokens, mask, cache,
                                              all_logits=request.prompt_logprobs)
        last = logits[:, -1] if request.prompt_logprobs else logits
        sp = request.sampling
        num_top = self.max_logprobs if request.num_top else 0
        state = (np.array([sp.seed], np.uint32), np.array([sp.stream], np.uint32),
                 np.zeros(1, np.int32),
                 np.array([sp.temperature], np.float32), np.array([sp.top_k], np.int32),
                 np.array([sp.top_p], np.float32))
        first = _tokens(_first_token(num_top, last, state), num_top)
        prefix = Prefix(state=cache, length=t, first=first, request=request)
        if request.prompt_logprobs:  # scored over the whole bucket, real tokens sliced out
            lp, ids, tlp = jax.device_get(_score_prompt(num_top, logits, tokens))
            prefix.prompt_logprobs = np.asarray(lp)[t - n:]
            if num_top:
                prefix.prompt_top_ids = np.asarray(ids)[t - n:]
                prefix.prompt_top_logprobs = np.asarray(tlp)[t - n:]
        return prefix

    def insert(self, prefix: Prefix, slot: int) -> None:
        request = prefix.request
        self.cache = self.executor.insert(self.cache, prefix.state, slot)
        sp = request.sampling
        self._last[slot] = prefix.first.ids[0]
        self._seeds[slot] = sp.seed
        self._streams[slot] = sp.stream
        self._counts[slot] = 1  # draw 0 gave the first token
        self._temp[slot] = sp.temperature
        self._top_k[slot] = sp.top_k
        self._top_p[slot] = sp.top_p
        self._num_top[slot] = request.num_top

    def generate(self, num_steps: int = 1) -> Tokens:
        num_top = self.max_logprobs if self._num_top.any() else 0
        state = (self._seeds, self._streams, self._counts, self._temp, self._top_k, self._top_p)
        if hasattr(self.executor, "decode_loop"):  # several steps in one dispatch
            _, self.cache, _, out = self.executor.decode_loop(
                step_fn(num_top), self._last, self.cache, state, num_steps)
        else:  # an executor with only decode(): one dispatch per step
            outs, tokens = [], self._last
            for _ in range(num_steps):
                logits, self.cache = self.executor.decode(tokens, self.cache)
                tokens, state, o = _sample_jit(num_top, logits, state)
                outs.append(o)
            out = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        toks = _tokens(out, num_top)
        self._last = toks.ids[-1].astype(np.int32)
        self._counts = self._counts + num_steps
        return toks

    def free(self, slot: int) -> None:
        self._num_top[slot] = 0
        self._temp[slot] = 0.0

    def warmup(self, steps: tuple[int, ...] = (1,), prompt_len: int = 8) -> None:
        """Compile the smallest prefill and the decode variants (with and without top
        log-probs, ``steps`` tokens per dispatch) before serving."""
        for k in sorted({0, self.max_logprobs}):
            p = self.prefill(EngineRequest((self.cfg.bos_token_id,) * prompt_len, 1,
                                           num_top=k))
            self.insert(p, 0)
            for n in sorted(set(steps)):
                self.generate(n)
            self.free(0)

    def cache_bytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree.leaves(self.cache)))


def describe(engine) -> str:
    return (f"{type(engine).__name__}: {engine.max_slots} slots x {engine.max_len} tokens"
            + (f", KV cache {engine.cache_bytes() / 2**20:.1f} MiB"
               if hasattr(engine, "cache_bytes") else ""))


__all__ = ["Engine", "EngineRequest", "ModelEngine", "Prefix", "SamplingParams", "Tokens",
           "bucket_length", "describe"]
