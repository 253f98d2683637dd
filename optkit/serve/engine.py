"""The serving engine contract and its implementations over optkit executors.

An engine runs *steps* and knows nothing of HTTP, queues or text.  The scheduler decides
what each step computes and which KV-cache blocks (:mod:`optkit.serve.blocks`) each
sequence holds; the engine executes::

    out = engine.step(works, num_steps=1)

One :class:`Work` per sequence: the tokens it feeds this step (a chunk of its prompt, or its
last generated token), how many of its tokens are already in its blocks, its block table,
and whether to draw the next token.  ``out.tokens`` holds the drawn tokens (one row per
work; ``num_steps`` > 1 only when every work is a decode: that many tokens each, in one
dispatch) and ``out.scores`` the log-probs of prompt tokens a work asked to score.

Sampling parameters come with each work (temperature, top-k, top-p, a seed and the
sequence's stream within its request, ``min_tokens`` and ``repetition_penalty``), so one
step mixes greedy and sampled sequences; the i-th generated token is drawn by
``optkit.generation.sampling.sample_tokens`` with the key of (seed, stream, i), whatever
else runs beside it and however its prompt was chunked -- the draw ``generate`` makes for
row ``stream`` of a call with that seed.

* :class:`PagedEngine` (MeshExecutor: one device, data/tensor parallel): paged K/V pools,
  one forward per step over the decodes and prompt chunks together (``model.paged_forward``),
  sampling on the device.  Attention reads each sequence's blocks up to a bucketed length:
  on GPUs through optkit's Pallas paged-attention kernels (``optkit.kernels.paged_attention``:
  one for one-token rows, one for prompt-chunk rows), elsewhere through XLA (gathering the
  blocks).
* :class:`ModelEngine` (pipeline and Ray executors, which have no paged step): one fixed
  cache of ``max_slots`` rows of ``max_len`` positions; a sequence's single block *is* its
  slot, prompts are prefilled whole at batch 1 and every decode step runs every slot.
* :class:`optkit.serve.fake.FakeEngine`: a hand-checkable stand-in.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from optkit import model as M
from optkit.generation.processors import repetition_penalty, suppress_eos
from optkit.generation.sampling import logprobs as token_logprobs
from optkit.generation.sampling import sample_tokens

log = logging.getLogger(__name__)

MIN_BUCKET = 16


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # <= 0: greedy
    top_p: float = 1.0
    top_k: int = 0             # <= 0: off
    seed: int = 0
    stream: int = 0            # the sequence's index within its request (``n`` > 1)
    min_tokens: int = 0        # EOS is banned until this many tokens were generated
    repetition_penalty: float = 1.0  # HF's rule over prompt + generated tokens (1: off)


@dataclass(frozen=True)
class EngineRequest:
    """What an engine needs to know of a sequence besides its tokens."""

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
class Work:
    """One sequence's part of a step."""

    seq: int                        # the scheduler's id of the sequence
    tokens: Sequence[int]           # fed this step: a prompt chunk, or the last token
    start: int                      # tokens already in its blocks (the index of tokens[0])
    blocks: Sequence[int]           # block table (covers start + len(tokens) + steps - 1)
    request: EngineRequest
    sample: bool = True             # draw the token after tokens[-1]
    count: int = 0                  # ... the count-th generated token (its sampling key)
    targets: Sequence[int] = ()     # score targets[i] after tokens[i] (prompt log-probs)
    context: Sequence[int] = ()     # every token up to tokens[-1] (repetition penalty only)


@dataclass
class StepOutput:
    """``tokens``: (num_steps, len(works)) (rows that do not sample hold garbage);
    ``scores[i]``: (log-probs (m,), top ids (m, K) or None, top log-probs) of work i's
    ``targets``, or None."""

    tokens: Tokens
    scores: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None] = \
        field(default_factory=list)


class Engine(Protocol):
    max_len: int             # most tokens (prompt + generated) one sequence may hold
    vocab_size: int
    eos_token_id: int | None
    max_logprobs: int
    max_num_seqs: int        # sequences in flight
    max_slots: int           # = max_num_seqs (what /v1/models shows)
    max_batched_tokens: int  # tokens a step computes (decodes first, then prompt chunks)
    block_size: int
    num_blocks: int          # in the pool, block 0 reserved
    prefix_caching: bool     # full blocks may be shared between sequences
    chunked_prefill: bool    # prompts may be split over steps (else fed whole)
    chunk_granule: int       # a step's chunks take budget in multiples of this (rows)
    decodes_in_budget: bool  # decodes take budget (else prompt chunks have it all)
    penalties: bool          # honours repetition_penalty

    def step(self, works: Sequence[Work], num_steps: int = 1) -> StepOutput: ...


def pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(int(n) - 1, 0).bit_length())


def bucket_length(n: int, limit: int) -> int:
    """Padded prompt length: the next power of two (>= 16), but never above ``limit``
    (the room left in a slot) unless the prompt itself is longer."""
    b = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    return max(n, min(b, limit))


def _host(out) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(out))


def _process(logits, st, eos: int | None, penalty: bool):
    """Logits processors of a serving step: repetition penalty, then EOS banned below
    ``min_tokens`` (the order of ``generate``'s processors)."""
    x = logits.astype(jnp.float32)
    if penalty:
        x = repetition_penalty(x, st["hist"], st["hist_len"][:, None],
                               jnp.zeros_like(st["hist_len"]), st["penalty"][:, None])
    if eos is not None:
        x = suppress_eos(x, st["counts"][:, None], st["min_tokens"][:, None],
                         jnp.array([eos], jnp.int32))
    return x


def _draw(logits, st, num_top: int, eos, penalty: bool):
    x = _process(logits, st, eos, penalty)
    tok = sample_tokens(x, st["seeds"], st["streams"], st["counts"], st["temperature"],
                        st["top_k"], st["top_p"])
    lp, top_ids, top_lp = token_logprobs(logits, tok, num_top)  # of the model (generate's)
    return tok, ((tok, lp) if num_top == 0 else (tok, lp, top_ids, top_lp))


def _advance(st, tok, penalty: bool):
    st = {**st, "counts": st["counts"] + 1}
    if penalty:
        rows = jnp.arange(tok.shape[0])
        st["hist"] = st["hist"].at[rows, st["hist_len"]].set(tok, mode="drop")
        st["hist_len"] = st["hist_len"] + 1
    return st


# ---------------------------------------------------------------------------------------------
# Paged engine: pure step functions (jitted by the executor, pools donated)
# ---------------------------------------------------------------------------------------------
def _group_layout(g, block_size: int):
    """Flat positions, slots and query indices of one group {tokens (R,T), tables (R,NB),
    start (R,), n_new (R,)}; padding tokens write nothing and attend position 0."""
    r, t = g["tokens"].shape
    pos = g["start"][:, None] + jnp.arange(t)[None, :]
    valid = jnp.arange(t)[None, :] < g["n_new"][:, None]
    blk = jnp.take_along_axis(g["tables"], jnp.clip(pos // block_size, 0,
                                                     g["tables"].shape[1] - 1), axis=1)
    slots = jnp.where(valid, blk * block_size + pos % block_size, -1)
    q_index = jnp.where(valid, pos, 0)
    return pos.reshape(-1), slots.reshape(-1), q_index


def _paged_logits(cfg, params, groups, pools, lookup, attention, block_size,
                  all_tokens: bool):
    """Forward the groups; logits at each row's last new token (and at every token)."""
    tokens, pos, slots, model_groups, last, off = [], [], [], [], [], 0
    for g in groups:
        r, t = g["tokens"].shape
        p, s, q = _group_layout(g, block_size)
        tokens.append(g["tokens"].reshape(-1))
        pos.append(p)
        slots.append(s)
        model_groups.append((g["tables"], q))
        last.append(off + jnp.arange(r) * t + jnp.maximum(g["n_new"] - 1, 0))
        off += r * t
    cat = (lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs))
    x, pools = M.paged_forward(params, cfg, cat(tokens), jnp.where(cat(pos) >= 0, cat(pos), 0),
                               cat(slots), model_groups, pools, lookup, **attention)
    logits = M.unembed(params, cfg, x[cat(last)])
    every = M.unembed(params, cfg, x) if all_tokens else None
    return logits, every, pools


def paged_step(cfg, block_size: int, num_top: int, score: bool, penalty: bool,
               params, inputs, pools, lookup, attention):
    """One step over decode rows and prompt chunks: sample each row's next token and score
    the targets of every token (``score``)."""
    st = inputs["sampling"]
    logits, every, pools = _paged_logits(cfg, params, inputs["groups"], pools, lookup,
                                         attention, block_size, score)
    _, out = _draw(logits, st, num_top, cfg.eos_token_id, penalty)
    out = jax.tree.map(lambda o: o[None], out)
    scores = token_logprobs(every, inputs["targets"], num_top) if score else None
    return (out, scores), pools


def paged_decode_loop(cfg, block_size: int, num_top: int, penalty: bool, max_steps: int,
                      params, inputs, pools, lookup, attention):
    """Up to ``max_steps`` decode steps (``inputs["num_steps"]`` of them) in one dispatch."""
    g0 = inputs["groups"][0]

    def body(i, carry):
        g, st, pools, outs = carry
        logits, _, pools = _paged_logits(cfg, params, [g], pools, lookup, attention,
                                         block_size, False)
        tok, out = _draw(logits, st, num_top, cfg.eos_token_id, penalty)
        outs = jax.tree.map(lambda buf, o: jax.lax.dynamic_update_index_in_dim(buf, o, i, 0),
                            outs, out)
        g = {**g, "tokens": tok[:, None].astype(jnp.int32), "start": g["start"] + 1}
        return g, _advance(st, tok, penalty), pools, outs

    r = g0["tokens"].shape[0]
    shapes = [(jnp.int32, ()), (jnp.float32, ())] + \
        ([(jnp.int32, (num_top,)), (jnp.float32, (num_top,))] if num_top else [])
    outs = tuple(jnp.zeros((max_steps, r, *shape), dt) for dt, shape in shapes)
    _, _, pools, outs = jax.lax.fori_loop(0, inputs["num_steps"], body,
                                          (g0, inputs["sampling"], pools, outs))
    return (outs, None), pools


def _rows(inputs) -> int:
    """Tokens a step's inputs feed through the model (the rows of its products)."""
    return sum(int(np.size(g["tokens"])) for g in inputs["groups"])


@functools.cache
def _paged_fn(cfg, block_size: int, kind: str, *statics):
    """One function object per static setting, shared by engines (it keys the executor's
    compile cache)."""
    base = paged_step if kind == "step" else paged_decode_loop
    return functools.partial(base, cfg, block_size, *statics)


#: Smallest buckets of a step's decode rows and of the blocks a row reads: a few more rows
#: or blocks cost next to nothing, and every bucket is one more compiled program.  (XLA on
#: CPUs ran a one-row step of opt-125m 7x slower than a two-row one: 250 vs 34 ms.)
MIN_ROWS, MIN_BLOCKS = 2, 4
#: Tokens a row of prompt chunks holds under static shapes: a step's chunks are packed into
#: rows of this many tokens (a long chunk over several rows of the same step: each layer
#: writes every new K/V before any row attends, so a later row sees the earlier ones).
CHUNK_ROW = 64
#: Fewest blocks a static-shape step's prompt chunks read (a bucket below this saves
#: little and is one more program to compile).
MIN_CHUNK_BLOCKS = 16
#: Fewest chunk rows of a static-shape step: the row counts compiled are this, its doublings
#: and ``max_batched_tokens // CHUNK_ROW`` (a step with one short prompt computes 512
#: tokens, not the whole budget).
MIN_CHUNK_ROWS = 8


class PagedEngine:
    """Paged K/V pools over a :class:`~optkit.parallel.executor.MeshExecutor`.

    ``max_num_seqs`` sequences in flight at most; each step computes at most
    ``max_batched_tokens`` new tokens (running decodes first, then prompt chunks: see
    :mod:`optkit.serve.scheduler`; under static shapes the decode rows come on top).  The
    pools hold ``num_blocks`` blocks of ``block_size`` positions; by default as many as fill
    ``memory_fraction`` of each device's memory, weights included (GPUs), or room for
    ``max_num_seqs`` sequences of up to 512 tokens (hosts that report no memory: CPUs).
    Shapes are bucketed (rows, tokens and blocks read to powers of two) so few programs
    compile; ``static_shapes`` (default: on GPUs, where a program of a large model takes
    seconds to compile and padding costs little next to the weight reads) fixes them
    instead: decode rows padded to ``max_num_seqs``, every row's block table to
    ``max_len``, prompt chunks packed into rows of :data:`CHUNK_ROW` tokens
    (:meth:`chunk_rows` of them) reading a bucket of blocks, every step with the decode
    rows, so a handful of programs serve every step (:meth:`warmup` compiles them).
    ``max_logprobs`` bounds the top alternatives per token.
    """

    chunked_prefill = True
    penalties = True

    def __init__(self, executor, max_num_seqs: int | None = None,
                 max_batched_tokens: int | None = None, block_size: int = 16,
                 num_blocks: int | None = None, memory_fraction: float = 0.9,
                 max_len: int | None = None, max_logprobs: int = 5,
                 prefix_caching: bool = True, static_shapes: bool | None = None):
        cfg = executor.cfg
        if not hasattr(executor, "paged_run"):
            raise ValueError(f"{type(executor).__name__} has no paged step; serve it with "
                             "ModelEngine")
        gpu = getattr(executor, "gpu", False)
        self.executor, self.cfg = executor, cfg
        self.max_len = int(min(max_len or cfg.max_position_embeddings,
                               cfg.max_position_embeddings))
        self.vocab_size = cfg.vocab_size
        self.eos_token_id = cfg.eos_token_id
        self.max_logprobs = int(max_logprobs)
        self.max_num_seqs = int(max_num_seqs or (DEFAULTS["gpu" if gpu else "cpu"][0]))
        self.max_slots = self.max_num_seqs
        self.max_batched_tokens = int(max_batched_tokens
                                      or DEFAULTS["gpu" if gpu else "cpu"][1])
        self.block_size = int(block_size)
        self.prefix_caching = bool(prefix_caching)
        self.static_shapes = gpu if static_shapes is None else bool(static_shapes)
        if self.max_num_seqs < 1 or self.max_batched_tokens < 1 or self.block_size < 1:
            raise ValueError("max_num_seqs, max_batched_tokens and block_size must be >= 1")
        if self.max_len < 2:
            raise ValueError("need max_len >= 2")
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction={memory_fraction}: choose a share in (0, 1]")
        self.num_blocks = int(num_blocks or self._default_blocks(memory_fraction))
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks={self.num_blocks}: need at least 2 (one reserved)")
        if (self.num_blocks - 1) * self.block_size < self.max_len:
            log.warning("a KV pool of %d blocks of %d tokens cannot hold one sequence of "
                        "max_len=%d: longer requests are refused (more memory_fraction or "
                        "num_blocks, or a smaller max_len)", self.num_blocks - 1,
                        self.block_size, self.max_len)
        self.pools = executor.init_pools(self.num_blocks, self.block_size)
        self._max_steps = 1

    # Sizing --------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, K and V (summed over devices)."""
        c = self.cfg
        item = jnp.dtype(self.executor.dtype).itemsize
        return 2 * c.num_hidden_layers * self.block_size * c.hidden_size * item

    def _default_blocks(self, fraction: float) -> int:
        """Blocks that fill ``fraction`` of the first device's memory limit after its share
        of the weights and a headroom for a step's activations (:meth:`step_bytes` plus 5%
        of the limit), but no more than twice what ``max_num_seqs`` sequences of ``max_len``
        tokens hold (the rest only keeps more prompts cached); hosts that report no limit
        (CPUs): room for ``max_num_seqs`` sequences of 512 tokens.  Only the weights are
        subtracted, not what the allocator reports in use, which may count memory it holds
        but nothing uses."""
        devices = list(self.executor.mesh.devices.flat)
        limit = (devices[0].memory_stats() or {}).get("bytes_limit")
        if not limit:
            per_seq = -(-min(self.max_len, 512) // self.block_size)
            return self.max_num_seqs * per_seq + 1
        weights = sum(shard.data.nbytes for leaf in jax.tree.leaves(self.executor.params)
                      for shard in leaf.addressable_shards if shard.device == devices[0])
        # each device holds its share of the heads of every block
        c = self.cfg
        shape = (c.num_attention_heads, 1, self.block_size, c.head_dim)
        sharding = jax.tree.leaves(self.executor.pool_shardings(1, self.block_size))[0]
        share = sharding.shard_shape(shape)[-4] / c.num_attention_heads
        free = (fraction - 0.05) * limit - weights - self.step_bytes() * share
        most = 2 * self.max_num_seqs * -(-self.max_len // self.block_size) + 1
        return max(2, min(most, int(max(0.0, free) // (self.block_bytes() * share))))

    def step_bytes(self) -> int:
        """A generous bound on one step's largest activations (all devices): a full budget
        of prompt chunks gathering K and V of whole tables, and their float32 scores and
        probabilities, twice over (XLA may keep two layers' worth alive)."""
        c = self.cfg
        rows = -(-self.max_batched_tokens // CHUNK_ROW)
        positions = pow2(-(-self.max_len // self.block_size)) * self.block_size
        item = jnp.dtype(self.executor.dtype).itemsize
        gathered = 2 * rows * positions * c.hidden_size * item
        scores = 2 * rows * c.num_attention_heads * CHUNK_ROW * positions * 4
        return 2 * (gathered + scores)

    def cache_bytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree.leaves(self.pools)))

    @property
    def chunk_granule(self) -> int:
        """Under static shapes each prompt chunk takes whole rows of :data:`CHUNK_ROW`
        tokens; a scheduler that charges its budget in these units never needs more rows
        than a step has (so no other program compiles)."""
        return min(CHUNK_ROW, self.max_batched_tokens) if self.static_shapes else 1

    @property
    def decodes_in_budget(self) -> bool:
        """Whether a step's decodes count against ``max_batched_tokens``.  Not under
        static shapes: every program there has its ``max_num_seqs`` decode rows beside the
        chunk rows, so the whole budget goes to prompt chunks (rows a step computes
        anyway)."""
        return not self.static_shapes

    def chunk_rows(self, pieces: int) -> int:
        """Rows of a static-shape step's prompt chunks for ``pieces`` rows' worth: the
        next of :data:`MIN_CHUNK_ROWS` and its doublings, at most the budget's
        ``max_batched_tokens // CHUNK_ROW`` rows (more only when many short prompts start
        at once: the next power of two)."""
        if pieces > self._budget_rows:
            return pow2(pieces)
        return min(pow2(pieces, MIN_CHUNK_ROWS), self._budget_rows)

    def chunk_row_buckets(self) -> list[int]:
        """Every row count :meth:`chunk_rows` gives for a step within the budget."""
        return sorted({self.chunk_rows(n) for n in range(1, self._budget_rows + 1)})

    @property
    def _budget_rows(self) -> int:
        return max(self.max_batched_tokens // CHUNK_ROW, 1)

    # Steps ---------------------------------------------------------------------------------
    def _fn(self, *key):
        return _paged_fn(self.cfg, self.block_size, *key)

    def _group(self, pieces: list[tuple], rows: int, t: int, nb: int) -> dict:
        """Rows of ``t`` token slots from ``pieces`` (tokens, start, blocks), one a row."""
        g = {"tokens": np.zeros((rows, t), np.int32), "tables": np.zeros((rows, nb), np.int32),
             "start": np.zeros(rows, np.int32), "n_new": np.zeros(rows, np.int32)}
        for i, (tokens, start, blocks) in enumerate(pieces):
            n = len(tokens)
            g["tokens"][i, :n] = tokens
            blocks = list(blocks)[:nb]
            g["tables"][i, :len(blocks)] = blocks
            g["start"][i], g["n_new"][i] = start, n
        return g

    def _sampling(self, works: list[Work | None], penalty: bool, steps: int) -> dict:
        n = len(works)
        st = {"seeds": np.zeros(n, np.uint32), "streams": np.zeros(n, np.uint32),
              "counts": np.zeros(n, np.int32), "temperature": np.zeros(n, np.float32),
              "top_k": np.zeros(n, np.int32), "top_p": np.ones(n, np.float32),
              "min_tokens": np.zeros(n, np.int32), "penalty": np.ones(n, np.float32)}
        for i, w in enumerate(works):
            if w is None:
                continue
            sp = w.request.sampling
            st["seeds"][i], st["streams"][i], st["counts"][i] = sp.seed, sp.stream, w.count
            st["temperature"][i], st["top_k"][i], st["top_p"][i] = \
                sp.temperature, sp.top_k, sp.top_p
            st["min_tokens"][i], st["penalty"][i] = sp.min_tokens, sp.repetition_penalty
        if penalty:
            width = pow2(max(len(w.context) for w in works if w is not None) + steps, 16)
            hist = np.zeros((n, width), np.int32)
            lens = np.zeros(n, np.int32)
            for i, w in enumerate(works):
                if w is not None and w.request.sampling.repetition_penalty != 1.0:
                    hist[i, :len(w.context)] = w.context
                    lens[i] = len(w.context)
            st["hist"], st["hist_len"] = hist, lens
        return st

    def step(self, works: Sequence[Work], num_steps: int = 1) -> StepOutput:
        works = list(works)
        fn, inputs, layout = self._prepare(works, num_steps)
        (out, scores), self.pools = self.executor.paged_run(fn, inputs, self.pools,
                                                            _rows(inputs))
        out, scores = _host((out, scores))
        where, flat, score = layout
        toks = Tokens(*(o[:num_steps, where] for o in out))
        result = StepOutput(toks, [None] * len(works))
        if score:
            lp, ids, tlp = scores
            for i, w in enumerate(works):
                if w.targets:
                    a, b = flat[i], flat[i] + len(w.targets)
                    result.scores[i] = (lp[a:b], None if ids is None else ids[a:b],
                                        None if tlp is None else tlp[a:b])
        return result

    def _prepare(self, works: list[Work], num_steps: int) -> tuple[Any, dict, tuple]:
        """(the step function, its inputs, (each work's row, its first token, whether
        prompt tokens are scored)) of a step."""
        if not works:
            raise ValueError("a step needs at least one sequence")
        for w in works:
            if w.request.num_top > self.max_logprobs:
                raise ValueError(f"at most {self.max_logprobs} top log-probs")
        num_top = self.max_logprobs if any(w.request.num_top for w in works) else 0
        penalty = any(w.request.sampling.repetition_penalty != 1.0 for w in works)
        decode = [i for i, w in enumerate(works) if len(w.tokens) == 1]
        chunks = [i for i, w in enumerate(works) if len(w.tokens) > 1]
        if num_steps > 1 and chunks:
            raise ValueError("several steps a dispatch only for decodes")
        where = np.zeros(len(works), np.int64)  # work -> its row among all rows
        flat = np.zeros(len(works), np.int64)   # work -> its first token among all tokens
        # blocks read per row, bucketed; under static shapes the decode rows take the whole
        # table (the GPU kernel reads only up to each row's length), prompt chunks a bucket
        # of what they read (XLA's path gathers every block of their tables)
        def blocks(idx):
            need = max(-(-(works[i].start + len(works[i].tokens) + num_steps - 1)
                         // self.block_size) for i in idx)
            return pow2(need, MIN_BLOCKS)

        nb = (pow2(-(-self.max_len // self.block_size)) if self.static_shapes
              else blocks(decode or chunks))
        nb_chunks = blocks(chunks) if chunks else nb
        if self.static_shapes:
            nb_chunks = max(nb_chunks, min(MIN_CHUNK_BLOCKS, nb))
        groups, rows = [], []
        if decode or self.static_shapes:  # static: one decode group in every program
            r = self.max_num_seqs if self.static_shapes else pow2(len(decode), MIN_ROWS)
            r = max(r, len(decode))
            groups.append(self._group([(works[i].tokens, works[i].start, works[i].blocks)
                                       for i in decode], r, 1, nb))
            where[decode] = flat[decode] = np.arange(len(decode))
            rows += [works[i] for i in decode] + [None] * (r - len(decode))
        if chunks:
            if self.static_shapes:  # rows of CHUNK_ROW tokens; a chunk may take several
                t = CHUNK_ROW
                pieces, owner = [], []
                for i in chunks:
                    w = works[i]
                    flat[i] = len(rows) + len(pieces) * t
                    for a in range(0, len(w.tokens), t):
                        pieces.append((w.tokens[a:a + t], w.start + a, w.blocks))
                        owner.append(None)
                    owner[-1] = w
                    where[i] = len(rows) + len(pieces) - 1
                r = self.chunk_rows(len(pieces))
                groups.append(self._group(pieces, r, t, nb_chunks))
                rows += owner + [None] * (r - len(pieces))
            else:
                r = pow2(len(chunks))
                t = pow2(max(len(works[i].tokens) for i in chunks), MIN_BUCKET)
                groups.append(self._group([(works[i].tokens, works[i].start, works[i].blocks)
                                           for i in chunks], r, t, nb_chunks))
                where[chunks] = len(rows) + np.arange(len(chunks))
                flat[chunks] = len(rows) + t * np.arange(len(chunks))
                rows += [works[i] for i in chunks] + [None] * (r - len(chunks))
        sampling = self._sampling(rows, penalty, num_steps)
        if num_steps > 1 or not chunks and not any(w.targets for w in works):
            self._max_steps = max(self._max_steps, pow2(num_steps))
            fn = self._fn("loop", num_top, penalty, self._max_steps)
            inputs = {"groups": groups, "sampling": sampling,
                      "num_steps": np.int32(num_steps)}
            score = False
        else:
            score = any(w.targets for w in works)
            fn = self._fn("step", num_top, score, penalty)
            inputs = {"groups": groups, "sampling": sampling}
            if score:
                targets = np.zeros(sum(g["tokens"].size for g in groups), np.int32)
                for i, w in enumerate(works):
                    targets[flat[i]:flat[i] + len(w.targets)] = w.targets
                inputs["targets"] = targets
        return fn, inputs, (where, flat, score)

    def warmup(self, steps: tuple[int, ...] = (1,), prompt_len: int = 8,
               threads: int | None = None) -> None:
        """Compile, before serving, the programs of one short request (its prompt, then
        decode dispatches of ``steps`` steps, with and without top log-probs) and, under
        static shapes, the prompt-chunk steps of every bucket of blocks read and of chunk
        rows (:meth:`chunk_row_buckets`): the shapes of longer or more prompts, which would
        otherwise compile while requests wait.  ``threads`` programs compile at once
        (default: up to 8, one per CPU core); then the short request runs."""
        self._max_steps = max(self._max_steps, pow2(max(steps)))
        bos = self.cfg.bos_token_id
        blocks = list(range(1, min(self.num_blocks, MIN_BLOCKS + 1)))
        run = []
        for k in sorted({0, self.max_logprobs}):
            req = EngineRequest((bos,) * prompt_len, 1, num_top=k)
            run.append(([Work(-1, req.prompt, 0, blocks, req)], 1))
            run += [([Work(-1, (bos,), prompt_len, blocks, req, count=1)], n)
                    for n in sorted(set(steps))
                    if prompt_len + n <= len(blocks) * self.block_size]
        cases = list(run)
        if self.static_shapes:
            req = EngineRequest((bos,) * prompt_len, 1)
            usable = self.num_blocks - 1  # block 0 is reserved
            need = -(-self.max_len // self.block_size)
            nb = first = min(MIN_CHUNK_BLOCKS, pow2(need))
            while nb <= max(pow2(min(need, usable)), first):
                end = min(nb * self.block_size, self.max_len)
                # ``rows`` two-token chunks ending at ``end``
                cases += [([Work(-3 - j, (bos, bos), end - 2,
                                 [1 + (i + j) % usable for i in range(nb)], req)
                            for j in range(rows)], 1) for rows in self.chunk_row_buckets()]
                nb *= 2
        compiles, seen = [], set()
        for works, n in cases:
            fn, inputs, _ = self._prepare(works, n)
            key = (fn, str(jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), inputs)))
            if key not in seen:
                seen.add(key)
                compiles.append(self.executor.paged_compile(fn, inputs, self.pools,
                                                            _rows(inputs)))
        threads = threads or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(c) for c in compiles]:
                f.result()
        for works, n in run:
            self.step(works, n)


#: Default (max_num_seqs, max_batched_tokens) on GPUs and on CPUs.  Every step with prompt
#: chunks also runs the running decodes (their weight reads and attention), so fewer, larger
#: chunks prefill faster; a 2,048-token step of opt-6.7b takes about 60 ms on
#: an H200 (the serving rows in ``benchmarks/README.md`` ran with these defaults), which is
#: what a running stream waits when a long prompt arrives.  A CPU computes far fewer tokens
#: a second, so its chunks are 128 tokens.
DEFAULTS = {"gpu": (64, 2048), "cpu": (16, 128)}


# ---------------------------------------------------------------------------------------------
# Slot engine (executors without a paged step: pipeline, Ray)
# ---------------------------------------------------------------------------------------------
def sample_step(num_top: int, eos: int | None, logits, state):
    """``decode_loop`` step: per-row sampling + log-probs (EOS banned below min_tokens);
    state = (seeds, streams, counts, temperature, top_k, top_p, min_tokens)."""
    seeds, streams, counts, temperature, top_k, top_p, min_tokens = state
    st = {"seeds": seeds, "streams": streams, "counts": counts, "temperature": temperature,
          "top_k": top_k, "top_p": top_p, "min_tokens": min_tokens}
    tok, out = _draw(logits, st, num_top, eos, False)
    return tok, (seeds, streams, counts + 1, temperature, top_k, top_p, min_tokens), out


@functools.cache
def step_fn(num_top: int, eos: int | None):
    """One stable function object per (``num_top``, EOS id): executors cache compiled
    decode loops by the step function's identity, so every engine shares them."""
    return functools.partial(sample_step, num_top, eos)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _first_token(num_top, eos, logits, state):
    return sample_step(num_top, eos, logits, state)[2]



@functools.partial(jax.jit, static_argnums=0)
def _score_prompt(num_top, logits, tokens):
    """Log-probs of tokens[1:] under logits[:-1] (one row)."""
    return token_logprobs(logits[0, :-1], tokens[0, 1:], num_top)


@dataclass
class Prefix:
    """A prefilled prompt of :class:`ModelEngine`: its one-row cache, positions used, its
    first token (a one-row :class:`Tokens`) and, when asked, log-probs of prompt tokens
    1..T-1."""

    state: Any
    length: int
    first: Tokens
    prompt_logprobs: np.ndarray | None = None        # (T-1,)
    prompt_top_ids: np.ndarray | None = None         # (T-1, K)
    prompt_top_logprobs: np.ndarray | None = None
    request: EngineRequest | None = None


class ModelEngine:
    """Slots over any executor (``init_cache``, ``prefill``, ``insert`` and
    ``decode_loop``): one KV cache of ``max_slots`` rows of ``max_len`` positions.

    For executors without a paged step (pipeline, Ray).  :meth:`step` runs on its own slot
    calls: ``prefill(request)`` a whole prompt at batch 1, ``insert(prefix, slot)`` it into
    a row, ``generate(n)`` every slot n tokens (dead rows compute garbage nobody reads), so
    a step costs ``max_slots x max_len`` whatever is live.  In the scheduler's block terms a
    slot is one block of ``max_len`` positions (block ``slot + 1``).  No chunked prefill,
    no prefix caching, no repetition penalty.
    """

    chunk_granule = 1
    chunked_prefill = False
    decodes_in_budget = True
    prefix_caching = False
    penalties = False

    def __init__(self, executor, max_slots: int = 16, max_len: int | None = None,
                 max_logprobs: int = 5):
        cfg = executor.cfg
        self.executor = executor
        self.cfg = cfg
        self.max_slots = self.max_num_seqs = int(max_slots)
        self.max_len = int(min(max_len or cfg.max_position_embeddings,
                               cfg.max_position_embeddings))
        self.block_size = self.max_len
        self.num_blocks = self.max_slots + 1
        self.max_batched_tokens = self.max_len * self.max_slots
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
        self._min_tokens = np.zeros(b, np.int32)
        self._num_top = np.zeros(b, np.int32)

    # Slot calls ------------------------------------------------------------------------------
    def prefill(self, request: EngineRequest, count: int = 0) -> Prefix:
        """Prefill one prompt alone; its first token is generated token ``count``."""
        n = len(request.prompt)
        if not 1 <= n <= self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit {self.max_len} positions")
        if request.num_top > self.max_logprobs:
            raise ValueError(f"at most {self.max_logprobs} top log-probs")
        t = bucket_length(n, self.max_len)
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
                 np.array([count], np.int32),
                 np.array([sp.temperature], np.float32), np.array([sp.top_k], np.int32),
                 np.array([sp.top_p], np.float32), np.array([sp.min_tokens], np.int32))
        first = Tokens(*_host(_first_token(num_top, self.eos_token_id, last, state)))
        prefix = Prefix(state=cache, length=t, first=first, request=request)
        if request.prompt_logprobs:  # scored over the whole bucket, real tokens sliced out
            lp, ids, tlp = _host(_score_prompt(num_top, logits, tokens))
            prefix.prompt_logprobs = lp[t - n:]
            if num_top:
                prefix.prompt_top_ids = ids[t - n:]
                prefix.prompt_top_logprobs = tlp[t - n:]
        return prefix

    def insert(self, prefix: Prefix, slot: int, count: int = 1) -> None:
        """Copy a prefilled prompt into ``slot``; its next token is generated token
        ``count``."""
        request = prefix.request
        self.cache = self.executor.insert(self.cache, prefix.state, slot)
        sp = request.sampling
        self._last[slot] = prefix.first.ids[0]
        self._set(slot, sp, count)
        self._num_top[slot] = request.num_top

    def _set(self, slot: int, sp: SamplingParams, count: int) -> None:
        self._seeds[slot], self._streams[slot], self._counts[slot] = sp.seed, sp.stream, count
        self._temp[slot], self._top_k[slot], self._top_p[slot] = \
            sp.temperature, sp.top_k, sp.top_p
        self._min_tokens[slot] = sp.min_tokens

    def generate(self, num_steps: int = 1) -> Tokens:
        num_top = self.max_logprobs if self._num_top.any() else 0
        state = (self._seeds, self._streams, self._counts, self._temp, self._top_k,
                 self._top_p, self._min_tokens)
        _, self.cache, _, out = self.executor.decode_loop(
            step_fn(num_top, self.eos_token_id), self._last, self.cache, state, num_steps)
        toks = Tokens(*_host(out))
        self._last = toks.ids[-1].astype(np.int32)
        self._counts = self._counts + num_steps
        return toks

    def free(self, slot: int) -> None:
        self._num_top[slot] = 0
        self._temp[slot] = 0.0

    # The step contract -------------------------------------------------------------------------
    def step(self, works: Sequence[Work], num_steps: int = 1) -> StepOutput:
        """Decode works first (every slot advances), then prefill + insert each new prompt
        (overwriting whatever its slot computed)."""
        works = list(works)
        for w in works:
            if w.request.sampling.repetition_penalty != 1.0:
                raise ValueError("this engine has no repetition penalty")
        k = self.max_logprobs
        rows = len(works)
        ids, lps = np.zeros((num_steps, rows), np.int64), np.zeros((num_steps, rows))
        tids, tlps = np.zeros((num_steps, rows, k), np.int64), np.zeros((num_steps, rows, k))
        scores: list = [None] * rows
        live = {w.blocks[0] - 1 for w in works}
        for slot in range(self.max_slots):
            if slot not in live:
                self.free(slot)
        decode = [(i, w) for i, w in enumerate(works) if w.start > 0]
        if decode:
            for _, w in decode:
                slot = w.blocks[0] - 1
                self._last[slot] = w.tokens[-1]
                self._set(slot, w.request.sampling, w.count)
                self._num_top[slot] = w.request.num_top
            toks = self.generate(num_steps)
            for i, w in decode:
                slot = w.blocks[0] - 1
                ids[:, i], lps[:, i] = toks.ids[:, slot], toks.logprobs[:, slot]
                if toks.top_ids is not None:
                    tids[:, i], tlps[:, i] = toks.top_ids[:, slot], toks.top_logprobs[:, slot]
        for i, w in enumerate(works):
            if w.start > 0:
                continue
            r = w.request
            p = self.prefill(EngineRequest(tuple(w.tokens), r.max_tokens, r.sampling,
                                           r.num_top, bool(w.targets)), w.count)
            self.insert(p, w.blocks[0] - 1, w.count + 1)
            ids[0, i], lps[0, i] = p.first.ids[0], p.first.logprobs[0]
            if p.first.top_ids is not None:
                tids[0, i], tlps[0, i] = p.first.top_ids[0], p.first.top_logprobs[0]
            if w.targets:
                m = len(w.targets)
                scores[i] = (p.prompt_logprobs[:m],
                             None if p.prompt_top_ids is None else p.prompt_top_ids[:m],
                             None if p.prompt_top_logprobs is None
                             else p.prompt_top_logprobs[:m])
        if not any(w.request.num_top for w in works):
            return StepOutput(Tokens(ids, lps), scores)
        return StepOutput(Tokens(ids, lps, tids, tlps), scores)

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


def make_engine(executor, **kw):
    """:class:`PagedEngine` where the executor has a paged step, else :class:`ModelEngine`
    (``max_num_seqs`` -> its slots; paged-only options are dropped)."""
    if hasattr(executor, "paged_run"):
        return PagedEngine(executor, **kw)
    slots = kw.get("max_num_seqs") or DEFAULTS["cpu"][0]
    return ModelEngine(executor, max_slots=slots, max_len=kw.get("max_len"),
                       max_logprobs=kw.get("max_logprobs", 5))


def describe(engine) -> str:
    if isinstance(engine, PagedEngine):
        return (f"PagedEngine: {engine.num_blocks - 1} blocks x {engine.block_size} tokens "
                f"(KV cache {engine.cache_bytes() / 2**20:.1f} MiB), up to "
                f"{engine.max_num_seqs} sequences of {engine.max_len} tokens, "
                f"{engine.max_batched_tokens} "
                f"{'tokens' if engine.decodes_in_budget else 'prompt tokens + the decodes'}"
                " a step")
    return (f"{type(engine).__name__}: {engine.max_slots} slots x {engine.max_len} tokens"
            + (f", KV cache {engine.cache_bytes() / 2**20:.1f} MiB"
               if hasattr(engine, "cache_bytes") else ""))


__all__ = ["DEFAULTS", "Engine", "EngineRequest", "ModelEngine", "PagedEngine", "Prefix",
           "SamplingParams", "StepOutput", "Tokens", "Work", "bucket_length", "describe",
           "make_engine"]
