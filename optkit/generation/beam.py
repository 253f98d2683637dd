"""Beam search (and beam sampling) with transformers 5's semantics, as one jitted step.

Per prompt the search keeps ``num_beams`` running beams and up to ``num_beams`` finished
hypotheses.  Each step (HF's ``_beam_search``):

1. log-softmax of the running beams' logits, then the logits processors (and, when
   sampling, temperature / top-k / top-p keeping ``len(eos) + 1`` tokens), added to the
   beams' running scores;
2. the best ``keep = max(2, 1 + len(eos)) * num_beams`` candidates over all beams
   (sampled without replacement when ``do_sample``);
3. candidates that end (EOS, or the maximum length) leave the running set; the best
   ``num_beams`` others run on;
4. ending candidates among the top ``num_beams`` enter the finished set with score
   ``sum log p / generated_length ** length_penalty``, unless the prompt's set is full under
   ``early_stopping=True`` or it can no longer improve;
5. a prompt can no longer improve when its best running beam, scored at the current
   generated length (at the maximum length for ``early_stopping="never"`` with a positive
   length penalty), is not better than its worst finished hypothesis.  The search stops when
   no prompt can improve, when every hypothesis set is full under ``early_stopping=True``, or
   when every candidate ended.

The arithmetic mirrors HF's float32 operations (the same -1e9 sentinels, the same order of
additions, length penalties computed in double precision then rounded) so the same logits
give the same sequences.  Between steps the executor reorders the cache rows to the beams'
origins (``executor.select``); the host only checks every ``steps_per_dispatch`` (default 8) steps
whether the search has stopped, and the step leaves a stopped search unchanged.  The prompt's
last column is fed through the decode loop (the prefill takes the others), so the first
step runs in the same compiled program as the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from optkit.generation.config import GenerationConfig
from optkit.generation.output import GenerateOutput
from optkit.generation.processors import Processors, apply_processors, is_eos, processor_state
from optkit.generation.sampling import filter_logits, sample_without_replacement, token_keys
from optkit.generation.search import STREAM_STEPS, processors_of, replicate_like

SENTINEL = -1.0e9  # HF's "impossible" score

@dataclasses.dataclass(frozen=True)
class BeamSpec:
    """Static settings of a beam step (hashable: it keys the compiled step)."""

    beams: int
    keep: int
    sample: bool
    processors: Processors
    pad: int
    scores: bool = False
    logprobs: bool = False


def _gather(x, idx):
    """``x[b, idx[b, j], ...]``: (B, K, ...) gathered by (B, J) -> (B, J, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _set_column(x, values, col):
    """``x[:, :, col] = values`` for (B, K, L) ``x`` and (B, K) ``values``."""
    return jax.lax.dynamic_update_slice_in_dim(x, values[:, :, None].astype(x.dtype), col, axis=2)


@functools.lru_cache(maxsize=256)
def beam_step(spec: BeamSpec):
    """``step(logits (B*K, V), state) -> (tokens (B*K,), state, out)``."""
    k, c = spec.beams, spec.keep

    def advance(logits, st):
        n, v = logits.shape
        b = n // k
        cur, t = st["cur"], st["prompt_len"]
        early_true = st["early_true"]
        model_logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        hist = st["run_seq"].reshape(n, -1)
        logp = apply_processors(spec.processors, model_logp, hist, cur, st["proc"])
        if spec.sample:
            logp = filter_logits(logp, st["temperature"], st["top_k"], st["top_p"],
                                 min_keep=c // k)
        acc = (logp.reshape(b, k, v) + st["run_scores"][:, :, None]).reshape(b, k * v)
        if spec.sample:
            keys = token_keys(st["seeds"], st["streams"], jnp.full((b,), cur - t))
            idx = sample_without_replacement(acc, keys, c)
            vals = jnp.take_along_axis(acc, idx, axis=1)
            order = jnp.argsort(-vals, axis=1, stable=True)
            vals, idx = (jnp.take_along_axis(x, order, axis=1) for x in (vals, idx))
        else:
            vals, idx = jax.lax.top_k(acc, c)
        src = (idx // v).astype(jnp.int32)  # beam within the prompt's group
        tok = (idx % v).astype(jnp.int32)
        flat_src = src + (jnp.arange(b, dtype=jnp.int32) * k)[:, None]
        gen = cur - t  # generated columns before this step
        cand_seq = _set_column(_gather(st["run_seq"], src), tok, cur)
        cand_bidx = _set_column(_gather(st["run_bidx"], src), flat_src, gen)
        cand_lp = None
        if spec.logprobs:
            tok_lp = model_logp[flat_src, tok]
            cand_lp = _set_column(_gather(st["run_lp"], src), tok_lp, gen)
        ends = is_eos(tok, st["proc"]["eos"]) | (cur + 1 >= st["max_len"])

        # Running beams: the best candidates that did not end.
        run_cand = vals + ends.astype(jnp.float32) * SENTINEL
        nxt = jax.lax.top_k(run_cand, k)[1]
        new = {"run_seq": _gather(cand_seq, nxt), "run_scores": _gather(run_cand, nxt),
               "run_bidx": _gather(cand_bidx, nxt)}
        if spec.logprobs:
            new["run_lp"] = _gather(cand_lp, nxt)

        # Finished hypotheses: merge the ending candidates among the top ``k``.
        just = ends & (jnp.arange(c) < k)[None, :]
        score = vals / st["denom"][gen + 1]
        full = jnp.all(st["finished"], axis=-1, keepdims=True) & early_true
        score = score + full.astype(jnp.float32) * SENTINEL
        score = score + (~st["heur"]).astype(jnp.float32) * SENTINEL
        score = score + (~just).astype(jnp.float32) * SENTINEL
        merged = jnp.concatenate([st["scores"], score], axis=1)
        top = jax.lax.top_k(merged, k)[1]
        new["scores"] = _gather(merged, top)
        new["seq"] = _gather(jnp.concatenate([st["seq"], cand_seq], axis=1), top)
        new["bidx"] = _gather(jnp.concatenate([st["bidx"], cand_bidx], axis=1), top)
        new["finished"] = _gather(jnp.concatenate([st["finished"], just], axis=1), top)
        if spec.logprobs:
            new["lp"] = _gather(jnp.concatenate([st["lp"], cand_lp], axis=1), top)

        # Can any prompt still improve?  Should the whole search stop?
        new["cur"] = cur + 1
        best_len = jnp.where(st["best_at_max"], st["max_len"] - t, new["cur"] - t)
        best = new["run_scores"][:, :1] / st["denom"][best_len]
        worst = jnp.where(new["finished"], jnp.min(new["scores"], axis=1, keepdims=True),
                          SENTINEL)
        new["heur"] = st["heur"] & jnp.any(best > worst, axis=-1, keepdims=True)
        improvable = jnp.any(new["heur"])
        open_beams = ~(jnp.all(new["finished"]) & early_true)
        new["done"] = ~(improvable & open_beams & ~jnp.all(ends))
        out = {"scores": logp} if spec.scores else {}
        return new, out

    def step(logits, st):
        new, out = advance(logits, st)
        stopped = st["done"]
        new = {name: jnp.where(stopped, st[name], x) for name, x in new.items()}
        n = logits.shape[0]
        gen = st["cur"] - st["prompt_len"]
        origin = jax.lax.dynamic_index_in_dim(new["run_bidx"], gen, axis=2, keepdims=False)
        origin = jnp.where(stopped, jnp.arange(n, dtype=jnp.int32), origin.reshape(n))
        tok = jax.lax.dynamic_index_in_dim(new["run_seq"], st["cur"], axis=2, keepdims=False)
        tok = jnp.where(stopped, spec.pad, tok.reshape(n)).astype(jnp.int32)
        out["active"] = ~stopped
        return tok, {**st, **new, "origin": origin}, out

    return step


def length_penalties(max_new: int, length_penalty: float) -> np.ndarray:
    """``float32(i ** length_penalty)`` for i = 0..max_new, powers taken in double as HF."""
    return np.array([float(i) ** length_penalty if i else 1.0 for i in range(max_new + 1)],
                    np.float64).astype(np.float32)


def beam_search(executor, input_ids: np.ndarray, attention_mask: np.ndarray,
                gc: GenerationConfig) -> GenerateOutput:
    """Beam search (or beam sampling) of left-padded prompts (B, T)."""
    b, t = input_ids.shape
    k, new_max = gc.num_beams, gc.max_new_tokens
    n, total = b * k, t + new_max
    eos = gc.eos_token_id
    spec = BeamSpec(beams=k, keep=max(2, 1 + len(eos)) * k, sample=gc.do_sample,
                    processors=processors_of(gc), pad=gc.pad_token_id,
                    scores=gc.output_scores and gc.return_dict_in_generate,
                    logprobs=gc.output_logprobs)
    fill = gc.pad_token_id or (eos[0] if eos else -1)  # HF's placeholder for unused columns
    seq = np.full((b, k, total), fill, np.int32)
    seq[:, :, :t] = input_ids[:, None, :]
    bidx = np.full((b, k, new_max), -1, np.int32)
    state = {
        "run_seq": seq, "run_scores": np.tile(np.where(np.arange(k) == 0, 0.0, SENTINEL)
                                              .astype(np.float32), (b, 1)),
        "run_bidx": bidx, "seq": seq.copy(), "bidx": bidx.copy(),
        "scores": np.full((b, k), SENTINEL, np.float32), "finished": np.zeros((b, k), bool),
        "heur": np.ones((b, 1), bool), "cur": np.int32(t), "done": np.bool_(False),
        "prompt_len": np.int32(t), "max_len": np.int32(total),
        "denom": length_penalties(new_max, gc.length_penalty),
        "early_true": np.bool_(gc.early_stopping is True),
        "best_at_max": np.bool_(gc.early_stopping == "never" and gc.length_penalty > 0),
        "origin": np.arange(n, dtype=np.int32),
        "proc": processor_state(np.repeat(attention_mask, k, axis=0), gc.repetition_penalty,
                                gc.min_length, eos),
    }
    if spec.logprobs:
        state["run_lp"] = np.zeros((b, k, new_max), np.float32)
        state["lp"] = np.zeros((b, k, new_max), np.float32)
    if gc.do_sample:
        state.update(temperature=np.full(n, gc.temperature, np.float32),
                     top_k=np.full(n, gc.top_k, np.int32), top_p=np.full(n, gc.top_p, np.float32),
                     seeds=np.full(b, gc.seed, np.uint32), streams=np.arange(b, dtype=np.uint32))
    step = beam_step(spec)

    start = time.perf_counter()
    cache = executor.init_cache(b, total)
    # The last prompt column goes through the decode loop, so the first beam step is the
    # same compiled program as every other one.
    if t > 1:
        _, cache = executor.prefill(input_ids[:, :-1], attention_mask[:, :-1], cache)
    cache = executor.select(cache, np.repeat(np.arange(b), k))
    tok = np.repeat(input_ids[:, -1], k)
    state = replicate_like(state, cache)
    outs, steps, check = [], 0, gc.steps_per_dispatch or STREAM_STEPS
    while steps < new_max:
        if steps and steps % check == 0 and bool(state["done"]):
            break
        tok, cache, state, o = executor.decode_loop(step, tok, cache, state, 1)
        outs.append(o)
        steps += 1
        if steps < new_max:
            cache = executor.select(cache, state["origin"])
    final = jax.device_get({name: state[name] for name in ("seq", "scores", "bidx", "lp")
                            if name in state})
    outs = jax.device_get(outs)
    end = time.perf_counter()
    return _beam_output(final, outs, input_ids.shape[1], gc,
                        {"first_token_s": None, "decode_s": end - start, "decode_steps": steps,
                         "dispatches": steps})


def _beam_output(final: dict, outs: list, t: int, gc: GenerationConfig,
                 timings: dict) -> GenerateOutput:
    r = gc.num_return_sequences
    seq = final["seq"][:, :r].reshape(-1, final["seq"].shape[-1]).astype(np.int64)
    bidx = final["bidx"][:, :r].reshape(-1, final["bidx"].shape[-1])
    lengths = (bidx != -1).sum(axis=1)
    gen = int(lengths.max())
    seq, bidx = seq[:, :t + gen], bidx[:, :gen]
    last = seq[np.arange(len(seq)), t + lengths - 1]
    reasons = ["stop" if n and tok in gc.eos_token_id else "length"
               for n, tok in zip(lengths, last, strict=True)]
    out = GenerateOutput(sequences=seq, lengths=lengths, finish_reasons=reasons, timings=timings)
    if gc.return_dict_in_generate:
        out.beam_indices = bidx
        if gc.output_scores:
            out.sequences_scores = final["scores"][:, :r].reshape(-1)
            active = np.concatenate([o["active"] for o in outs])
            scores = np.concatenate([o["scores"] for o in outs])[active]
            out.scores = tuple(np.asarray(s, np.float32) for s in scores)
    if gc.output_logprobs:
        lp = final["lp"][:, :r].reshape(-1, final["lp"].shape[-1])[:, :gen]
        out.logprobs = np.where(np.arange(gen)[None, :] < lengths[:, None], lp, 0.0)
    return out
