"""Pipeline parallelism: consecutive layers on their own sub-meshes, micro-batches in flight.

Each stage is a :class:`MeshExecutor` over a ``data x tensor`` sub-mesh holding that stage's
params (the first also the embeddings, the last the final norm and the tied LM head).  A
prefill or decode step cuts the batch into micro-batches and sends each through the stages in
wavefront order; every call is a jitted function dispatched asynchronously, so while stage
``s`` runs micro-batch ``j`` stage ``s - 1`` already runs micro-batch ``j + 1``.  Activations
move between sub-meshes with ``jax.device_put``.

The cache is ``{"stages": [[model cache of micro-batch j for j] for each stage]}``: each
micro-batch keeps its own cache rows, so no step copies a cache.  The executor interface is
:class:`~optkit.parallel.executor.MeshExecutor`'s, so generation and serving run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from optkit.config import OPTConfig
from optkit.options import ModelOptions
from optkit.parallel.executor import Executor, MeshExecutor, cache_len
from optkit.parallel.plan import Plan, split_rows
from optkit.parallel.stages import stage_decode, stage_prefill
from optkit.parallel.transfer import move


class PipelineExecutor(Executor):
    """Jitted prefill/decode of one model split into ``plan.pp`` stages (each a
    :class:`MeshExecutor` with the model's ``options``)."""

    def __init__(self, cfg: OPTConfig, stage_params: Sequence[dict], plan: Plan,
                 devices: Sequence[jax.Device] | None = None, dtype=None,
                 options: ModelOptions | None = None):
        self.cfg = cfg
        self.plan = plan
        self.ranges = plan.stage_ranges(cfg)
        if len(stage_params) != plan.pp:
            raise ValueError(f"{len(stage_params)} stage param trees for pp={plan.pp}")
        self.mesh = plan.mesh(devices)
        self.meshes = plan.stage_meshes(devices)
        self.rules = dict(plan.rules)
        self.params = list(stage_params)
        self.dtype = jnp.dtype(dtype or jax.tree.leaves(stage_params[0])[0].dtype)
        self.stages = [MeshExecutor(cfg.replace(num_hidden_layers=len(r)), p, m, self.rules,
                                    dtype=self.dtype, options=options)
                       for r, p, m in zip(self.ranges, self.params, self.meshes, strict=True)]
        self._fns: dict[Any, Any] = {}

    # Helpers -------------------------------------------------------------------------------
    def rows(self, batch: int) -> list[tuple[int, int]]:
        """Row ranges of the micro-batches of a ``batch``-row step."""
        return split_rows(batch, self.plan.micro_batches)

    def put_batch(self, x) -> jax.Array:
        return self.stages[0].put_batch(x)

    def _to_stage(self, s: int, x) -> jax.Array:
        """Place an activation / token / mask micro-batch on stage ``s``'s sub-mesh."""
        return move(x, self.stages[s].batch_sharding(tuple(x.shape)))

    def _concat(self, parts: list[jax.Array]) -> jax.Array:
        if len(parts) == 1:
            return parts[0]
        shape = (sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:])
        last = self.stages[-1]
        fn = self._once(("concat", shape, len(parts)), lambda: jax.jit(
            lambda *xs: jnp.concatenate(xs, axis=0), out_shardings=last.logits_sharding(shape)))
        return fn(*parts)

    @staticmethod
    def _split(x, rows):
        if isinstance(x, jax.Array) or len(rows) == 1:
            return [x[lo:hi] for lo, hi in rows] if len(rows) > 1 else [x]
        x = np.asarray(x)
        return [x[lo:hi] for lo, hi in rows]

    def _batch_of(self, cache) -> int:
        return sum(int(c["mask"].shape[0]) for c in cache["stages"][0])

    # Cache ---------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        rows = self.rows(batch)
        return {"stages": [[st.init_cache(hi - lo, max_len) for lo, hi in rows]
                           for st in self.stages]}

    # Model calls ---------------------------------------------------------------------------
    def _stage_fn(self, kind: str, s: int, b: int, t: int, max_len: int, all_logits: bool,
                  live: int | None = None):
        st = self.stages[s]
        first, last = s == 0, s == self.plan.pp - 1
        cfg, h, v = st.cfg, self.cfg.hidden_size, self.cfg.vocab_size
        lookup = st.embed_lookup if first else None

        def make():
            if kind == "prefill":
                out = ((b, t, v) if all_logits else (b, v)) if last else (b, t, h)
                fn = (lambda p, x, m, c: stage_prefill(p, cfg, x, m, c, first=first, last=last,
                                                       all_logits=all_logits, lookup=lookup))
                donate = (3,)
            else:
                out = (b, v) if last else (b, 1, h)
                kern = st.decode_kernels(b, max_len)
                fn = (lambda p, x, c: stage_decode(p, cfg, x, c, first=first, last=last,
                                                   live=live, lookup=lookup, **kern))
                donate = (2,)
            out_sh = st.logits_sharding(out) if last else st.batch_sharding(out)
            opts = st.decode_options_for(b) if kind == "decode" else {}
            return jax.jit(fn, donate_argnums=donate, compiler_options=opts,
                           out_shardings=(out_sh, st.cache_shardings(b, max_len)))
        key = (kind, s, b, t, max_len, all_logits if last else None, live)
        return self._once(key, make)

    def prefill(self, tokens, attention_mask, cache, all_logits: bool = False):
        """Prompts (B,T) into an empty cache -> (logits (B,T,V) or (B,V), cache)."""
        b, t = tokens.shape
        s_len = cache_len(cache)
        rows = self.rows(b)
        if len(rows) != len(cache["stages"][0]) or b != self._batch_of(cache):
            raise ValueError(f"prefill of {b} rows into a cache made for {self._batch_of(cache)}")
        acts = self._split(tokens, rows)
        masks = self._split(attention_mask, rows)
        new = [[None] * len(rows) for _ in self.stages]
        for step in range(len(rows) + self.plan.pp - 1):  # wavefront: stage s, micro-batch j
            for s in range(self.plan.pp):
                j = step - s
                if not 0 <= j < len(rows):
                    continue
                size = rows[j][1] - rows[j][0]
                fn = self._stage_fn("prefill", s, size, t, s_len, all_logits)
                acts[j], new[s][j] = fn(self.params[s], self._to_stage(s, acts[j]),
                                        self._to_stage(s, masks[j]), cache["stages"][s][j])
        return self._concat(acts), {"stages": new}

    def decode(self, tokens, cache, live: int | None = None):
        """One token per row (B,) -> (logits (B,V), cache); the old cache is donated.
        ``live``: an upper bound on every row's position after this step."""
        b = int(tokens.shape[0])
        s_len = cache_len(cache)
        n_live = self.stages[0].live_bucket(live, cache["stages"][0][0])
        rows = self.rows(b)
        if b != self._batch_of(cache):
            raise ValueError(f"decode of {b} rows with a cache of {self._batch_of(cache)}")
        acts = self._split(tokens, rows)
        new = [[None] * len(rows) for _ in self.stages]
        for step in range(len(rows) + self.plan.pp - 1):
            for s in range(self.plan.pp):
                j = step - s
                if not 0 <= j < len(rows):
                    continue
                size = rows[j][1] - rows[j][0]
                fn = self._stage_fn("decode", s, size, 1, s_len, False, n_live)
                acts[j], new[s][j] = fn(self.params[s], self._to_stage(s, acts[j]),
                                        cache["stages"][s][j])
        return self._concat(acts), {"stages": new}

    def decode_loop(self, step_fn: Callable, tokens, cache, state, num_steps: int,
                    live: int | None = None, max_steps: int | None = None):
        """``num_steps`` decode steps; ``step_fn(logits, state) -> (tokens, state, out)`` is
        jitted on the last stage.  ``live`` bounds every row's position after the last step.
        The steps are a host loop, so ``max_steps`` (the MeshExecutor's compile bucket) only
        bounds ``num_steps``.  Returns (tokens, cache, state, outs stacked over steps)."""
        if not 0 < num_steps <= (max_steps or num_steps):
            raise ValueError(f"num_steps={num_steps} must be in [1, max_steps={max_steps}]")
        last = self.stages[-1]
        replicated = NamedSharding(last.mesh, PartitionSpec())
        state = jax.tree.map(lambda x: move(x, replicated), state)
        step = self._once(("step", step_fn), lambda: jax.jit(step_fn))
        outs = []
        for _ in range(num_steps):
            logits, cache = self.decode(tokens, cache, live)
            tokens, state, out = step(logits, state)
            outs.append(out)
        stack = self._once(("stack", num_steps), lambda: jax.jit(
            lambda *xs: jax.tree.map(lambda *ys: jnp.stack(ys), *xs)))
        return tokens, cache, state, stack(*outs)

    def dispatch_span(self, position: int, remaining: int, batch: int, max_len: int) -> int:
        """See :meth:`MeshExecutor.dispatch_span` (the first stage's kernels decide)."""
        return self.stages[0].dispatch_span(position, remaining, batch, max_len)

    def select(self, cache, rows):
        """Cache rows reordered/replicated by ``rows`` (beam search, ``num_return_sequences``)."""
        rows = np.asarray(rows, np.int32)
        old = tuple(int(c["mask"].shape[0]) for c in cache["stages"][0])
        s_len = cache_len(cache)
        out = []
        for s, st in enumerate(self.stages):
            fn = self._once(("select", s, old, len(rows), s_len),
                           lambda st=st: self._regroup_fn(st, len(rows), s_len))
            idx = jax.device_put(rows, NamedSharding(st.mesh, PartitionSpec()))
            out.append(fn(cache["stages"][s], idx))
        return {"stages": out}

    def _regroup_fn(self, st: MeshExecutor, batch: int, s_len: int) -> Callable:
        """Jitted: concatenate a stage's micro-batch caches, take rows, cut anew."""
        new_rows = self.rows(batch)

        def regroup(caches, idx):
            full = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *caches)
            taken = jax.tree.map(lambda x: x[idx], full)
            return [jax.tree.map(lambda x, lo=lo, hi=hi: x[lo:hi], taken) for lo, hi in new_rows]

        return jax.jit(regroup, out_shardings=[st.cache_shardings(hi - lo, s_len)
                                               for lo, hi in new_rows])

    def insert(self, cache, prefix, slot: int):
        """Copy a one-row ``prefix`` cache (from :meth:`prefill` with batch 1) into row
        ``slot`` of ``cache`` (donated): continuous batching."""
        rows = self.rows(self._batch_of(cache))
        j = next((k for k, (lo, hi) in enumerate(rows) if lo <= slot < hi), None)
        if j is None:
            raise ValueError(f"slot {slot} outside a cache of {rows[-1][1]} rows")
        if len(prefix["stages"][0]) != 1:
            raise ValueError("insert() takes a one-row prefix cache")
        stages = [list(c) for c in cache["stages"]]
        for s, st in enumerate(self.stages):
            stages[s][j] = st.insert(stages[s][j], prefix["stages"][s][0], slot - rows[j][0])
        return {"stages": stages}
