"""Greedy and sampled decoding (``num_beams=1``) on the executor's multi-step decode loop.

Flow: ``prefill`` the prompts into a cache sized for the whole generation, pick the first
token from the prefill logits, then call ``executor.decode_loop`` with a step function that
runs the logits processors and picks the next token on the device.  Without streaming or
stop strings a dispatch runs every remaining step the executor allows in one call (on GPUs
the whole generation), ending on the device once every row has met EOS; with them,
``steps_per_dispatch`` steps per call (default :data:`STREAM_STEPS`).  A second dispatch is
always queued behind the one whose tokens the host is reading, so the device does not wait
for the host.  The host streams each step's tokens to ``on_token`` in order, checks stop
strings, and stops when every row has finished (a finished row is padded with
``pad_token_id``, as in HF).  The loop's trip count is dynamic, so dispatches of any length
share one compiled program.

Step functions are built once per static setting (:class:`StepSpec`, ``functools.lru_cache``),
and everything that may change between calls (temperature, top-k/p, penalties, seeds) is an
array in the loop state, so repeated calls with the same shapes never recompile.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from optkit.generation.config import GenerationConfig
from optkit.generation.output import GenerateOutput
from optkit.generation.processors import Processors, apply_processors, is_eos, processor_state
from optkit.generation.sampling import logprobs, sample_tokens
from optkit.generation.stream import StopStrings


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of a decoding step (hashable: it keys the compiled step)."""

    sample: bool
    processors: Processors
    pad: int
    scores: bool = False
    logprobs: int = -1  # -1: none, 0: the chosen token's, k > 0: also the top k


@functools.lru_cache(maxsize=256)
def search_step(spec: StepSpec):
    """``step(logits, state) -> (tokens, state, out)`` for ``executor.decode_loop``."""

    def step(logits, st):
        raw = logits.astype(jnp.float32)
        hist, cur = st["hist"], st["cur"]
        scores = apply_processors(spec.processors, raw, hist, cur, st["proc"])
        if spec.sample:
            tok = sample_tokens(scores, st["seeds"], st["streams"], cur - st["start"],
                                st["temperature"], st["top_k"], st["top_p"])
        else:
            tok = jnp.argmax(scores, axis=-1)
        tok = jnp.where(st["done"], spec.pad, tok).astype(jnp.int32)
        hist = hist.at[:, cur].set(tok, mode="drop")  # steps past the end write nothing
        done = st["done"] | is_eos(tok, st["proc"]["eos"])
        out = {"tokens": tok}
        if spec.scores:
            out["scores"] = scores
        if spec.logprobs >= 0:
            chosen, top_ids, top_lp = logprobs(raw, tok, spec.logprobs)
            out["logprob"] = chosen
            if top_ids is not None:
                out["top_ids"], out["top_lp"] = top_ids, top_lp
        return tok, {**st, "hist": hist, "cur": cur + 1, "done": done}, out

    return step


#: Decode steps per dispatch while tokens are streamed or stop strings checked (unless
#: ``steps_per_dispatch`` says otherwise).
STREAM_STEPS = 8


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@jax.jit
def _or(done, host_done):
    return done | host_done


@functools.lru_cache(maxsize=256)
def jitted(step):
    """The step alone, jitted (it picks the first token from the prefill logits)."""
    return jax.jit(step)


_take_rows = jax.jit(lambda x, rows: jnp.take(x, rows, axis=0))


def take_rows(x, rows: np.ndarray):
    """Rows of a device array (``num_return_sequences`` expansion of the prefill logits)."""
    return _take_rows(x, np.asarray(rows, np.int32))


def replicate_like(tree, reference):
    """``tree`` replicated on the mesh that ``reference``'s first leaf lives on, so the loop
    state has the same type on the first dispatch as on later ones (no second compile)."""
    sharding = jax.tree.leaves(reference)[0].sharding
    if not isinstance(sharding, NamedSharding):
        return tree
    return jax.device_put(tree, NamedSharding(sharding.mesh, PartitionSpec()))


def processors_of(gc: GenerationConfig) -> Processors:
    return Processors(repetition=gc.repetition_penalty != 1.0, ngram=gc.no_repeat_ngram_size,
                      bad_words=gc.bad_words_ids)


class _Host:
    """Host-side bookkeeping: tokens per step, finished rows, stop strings, streaming."""

    def __init__(self, gc: GenerationConfig, n: int):
        self.gc = gc
        self.done = np.zeros(n, bool)
        self.reasons = [""] * n
        self.lengths = np.zeros(n, np.int64)
        self.steps: list[dict] = []
        self.stop = None
        if gc.stop:
            from optkit.weights.tokenizer import get_tokenizer

            self.stop = StopStrings(gc.tokenizer or get_tokenizer(), gc.stop, n)
        self.finished = False
        self.changed = False  # rows finished by a stop string the device does not know of

    def take(self, outs: dict, count: int | None) -> None:
        """Process ``count`` steps of stacked device outputs (None: one unstacked step)."""
        outs = jax.device_get(outs)
        if count is None:
            outs, count = {k: v[None] for k, v in outs.items()}, 1
        gc = self.gc
        eos = np.asarray(gc.eos_token_id, np.int64)
        for j in range(count):
            if self.finished:
                return
            live = ~self.done
            tok = np.where(live, outs["tokens"][j], gc.pad_token_id).astype(np.int64)
            ended = live & np.isin(tok, eos)
            if self.stop is not None:
                for row in np.flatnonzero(live & ~ended):
                    if self.stop.push(row, tok[row]):
                        ended[row] = True
                        self.changed = True
            self.lengths += live
            for row in np.flatnonzero(ended):
                self.reasons[row] = "stop"
            self.done |= ended
            self.steps.append({k: v[j] for k, v in outs.items()} | {"tokens": tok,
                                                                     "live": live})
            if gc.on_token is not None:
                gc.on_token(tok)
            if self.done.all() or len(self.steps) == gc.max_new_tokens:
                self.finished = True

    def output(self, prompts: np.ndarray, timings: dict) -> GenerateOutput:
        new = np.stack([s["tokens"] for s in self.steps], axis=1)
        seqs = np.concatenate([prompts.astype(np.int64), new], axis=1)
        reasons = [r or "length" for r in self.reasons]
        out = GenerateOutput(sequences=seqs, lengths=self.lengths, finish_reasons=reasons,
                             timings=timings)
        if "scores" in self.steps[0]:
            out.scores = tuple(np.asarray(s["scores"], np.float32) for s in self.steps)
        if "logprob" in self.steps[0]:
            out.logprobs = np.stack([np.where(s["live"], s["logprob"], 0.0)
                                     for s in self.steps], axis=1).astype(np.float32)
            if "top_ids" in self.steps[0]:
                out.top_logprobs = (np.stack([s["top_ids"] for s in self.steps], axis=1),
                                    np.stack([s["top_lp"] for s in self.steps], axis=1))
        return out


def search(executor, input_ids: np.ndarray, attention_mask: np.ndarray,
           gc: GenerationConfig) -> GenerateOutput:
    """Greedy (``do_sample=False``) or sampled decoding of left-padded prompts."""
    b, t = input_ids.shape
    r = gc.num_return_sequences
    n, spd = b * r, gc.steps_per_dispatch
    spec = StepSpec(sample=gc.do_sample, processors=processors_of(gc), pad=gc.pad_token_id,
                    scores=gc.output_scores and gc.return_dict_in_generate,
                    logprobs=gc.top_logprobs if gc.output_logprobs else -1)
    step = search_step(spec)
    rows = np.repeat(np.arange(b), r)
    ids, mask = input_ids[rows], attention_mask[rows]
    hist = np.full((n, t + gc.max_new_tokens), gc.pad_token_id, np.int32)
    hist[:, :t] = ids
    state = {"hist": hist, "cur": np.int32(t), "done": np.zeros(n, bool),
             "proc": processor_state(mask, gc.repetition_penalty, gc.min_length,
                                     gc.eos_token_id)}
    if gc.do_sample:
        state.update(temperature=np.full(n, gc.temperature, np.float32),
                     top_k=np.full(n, gc.top_k, np.int32), top_p=np.full(n, gc.top_p, np.float32),
                     seeds=np.full(n, gc.seed, np.uint32), streams=np.arange(n, dtype=np.uint32),
                     start=np.full(n, t, np.int32))
    host = _Host(gc, n)
    total = hist.shape[1]
    # Streaming (on_token) and stop strings need the tokens on the host as they come:
    # dispatches of ``steps_per_dispatch`` steps (default STREAM_STEPS).  Otherwise each
    # dispatch runs as far as the executor allows (all remaining steps where attention
    # reads only the written positions), ending on the device once every row is done.
    chunk = spd or (STREAM_STEPS if gc.on_token is not None or host.stop is not None else None)
    max_steps = chunk or _pow2(gc.max_new_tokens - 1)

    start = time.perf_counter()
    cache = executor.init_cache(b, total)
    logits, cache = executor.prefill(input_ids, attention_mask, cache)
    if r > 1:
        cache = executor.select(cache, rows)
        logits = take_rows(logits, rows)
    tok, state, out = jitted(step)(logits, state)
    host.take(out, None)
    first = time.perf_counter()
    dispatches, queued, pending = 0, len(host.steps), collections.deque()
    while not host.finished:
        # one dispatch queued behind the one being read: the device never waits on the host
        while len(pending) < 2 and queued < gc.max_new_tokens:
            if host.changed:  # rows finished by a stop string
                state = {**state, "done": _or(state["done"], host.done)}
                host.changed = False
            k = executor.dispatch_span(t + queued, gc.max_new_tokens - queued, n, total)
            k = min(k, chunk) if chunk else k
            # never past the cache; attention reads only the positions written so far
            tok, cache, state, outs = executor.decode_loop(
                step, tok, cache, state, k, live=t + queued + k, max_steps=max_steps)
            pending.append((outs, k))
            queued += k
            dispatches += 1
        outs, k = pending.popleft()
        host.take(outs, k)
    end = time.perf_counter()
    timings = {"first_token_s": first - start, "decode_s": end - first,
               "decode_steps": len(host.steps) - 1, "dispatches": dispatches}
    return host.output(ids, timings)
