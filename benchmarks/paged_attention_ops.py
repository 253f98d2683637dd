"""Time the device ops under the paged engine's steps, one op at a time (one GPU).

Three tables, written as JSON (``--out``):

* ``attn``: optkit's paged decode-attention kernel (``optkit.kernels.paged_attention``) for
  64 one-token rows of 32 heads of 128 through shuffled block tables of the whole context
  (2,048 positions, as the engine's static shapes pass them), reading lengths uniform in
  32-640 per row or 300, 1,000 or 2,000 each: at its default setting and (16-token blocks,
  uniform and 1,000) over settings (splits ``k``, positions a step ``tpc``, warps); next to JAX's
  Pallas paged-attention op (``jax_pallas``: the setting that was fastest for it here,
  and its defaults) and XLA attention over a contiguous cache of the longest length
  (``xla_dense``).
* ``scatter``: writing 576 new tokens into a layer's pool with ``.at[].set``: padding
  aimed at one slot vs dropped, indices declared unique or not (``model.write_pool``).
* ``chunk``: prompt-chunk attention, ``model.paged_attention`` (``kind="xla"``: XLA's gather
  path) and optkit's Pallas chunk kernel (``kind="optkit"``: its default setting and blocks
  a step x warps), for chunks packed in rows of 64 tokens (one 2,048-token prompt over 32
  rows, eight 256-token prompts over 4 rows each, 8 rows at the same positions) or one row
  of 512, over tables of 16-128 blocks.

Run: ``python benchmarks/paged_attention_ops.py --out results/paged_attention_ops_h200.json``
(``--parts chunk``: one table only; ``--small``: tiny shapes through Pallas' interpreter,
to check the script on a CPU).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as pallas_op

from optkit import model as M
from optkit.kernels.paged_attention import CHUNK_SETTING, paged_chunk_attention, splits
from optkit.kernels.paged_attention import paged_decode_attention as kernel


def bench(f, *args, iters: int) -> float:
    """Mean ms of ``iters`` back-to-back calls after one warm-up call."""
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/paged_attention_ops.json")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU check)")
    ap.add_argument("--parts", nargs="+", choices=("attn", "scatter", "chunk"),
                    default=["attn", "scatter", "chunk"], help="tables to time")
    args = ap.parse_args(argv)
    parts = set(args.parts)
    small = args.small
    interpret = jax.devices()[0].platform != "gpu"
    heads, dim, rows = (4, 32, 4) if small else (32, 128, 64)
    pool_tokens = 4096 if small else 96000
    dt = jnp.float16
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__,
           **{part: [] for part in ("attn", "scatter", "chunk") if part in parts}}
    key, rng, iters = jax.random.PRNGKey(0), np.random.default_rng(0), 3 if small else 20
    for bs in (16,) if small else (16, 32):
        pages = pool_tokens // bs
        kp = jax.random.normal(key, (heads, pages, bs, dim), dt)
        vp = kp + 1
        nb = (512 if small else 2048) // bs  # the engine's static tables: the whole context
        tables = jnp.asarray(np.stack([rng.permutation(pages - 1)[:nb] + 1
                                       for _ in range(rows)]), jnp.int32)
        q = jax.random.normal(key, (rows, heads, dim), dt)
        lengths_tried = {"uniform": rng.integers(*((8, 65) if small else (32, 641)), rows)}
        lengths_tried.update({str(n): np.full(rows, n) for n in ((32,) if small
                                                               else (300, 1000, 2000))})
        if "attn" in parts:
            for name, lengths in lengths_tried.items():
                lengths = jnp.asarray(lengths, jnp.int32)
                longest = int(lengths.max())
                kc = jax.random.normal(key, (rows, longest, heads, dim), dt)
                dense = jax.jit(lambda q, k, v: jnp.einsum("rat,rtad->rad", jax.nn.softmax(
                    jnp.einsum("rad,rtad->rat", q, k, preferred_element_type=jnp.float32),
                    -1).astype(dt), v))
                res["attn"].append(dict(bs=bs, L=name, kind="xla_dense",
                                        ms=bench(dense, q, kc, kc, iters=iters),
                                        gb=rows * longest * heads * dim * 2 * 2 / 1e9))
                for tpc, k, warps in ((128, 4, 4), (128, 16, 8)):  # its best here, its defaults
                    f = jax.jit(functools.partial(pallas_op, pages_per_compute_block=tpc // bs,
                                                  k_splits=k, num_warps=warps,
                                                  interpret=interpret))
                    res["attn"].append(dict(bs=bs, L=name, kind="jax_pallas", tpc=tpc, k=k,
                                            warps=warps, ms=bench(f, q, kp, vp, tables, lengths,
                                                                  iters=iters)))
                settings = [None] + ([] if bs != 16 or name not in ("uniform", "1000") else [
                    (k, per, w) for k, per, w in itertools.product(
                        (1, 2) if small else (4, 8, 16), (2,) if small else (4, 8),
                        (2,) if small else (2, 4)) if (nb // k) % per == 0])
                for setting in settings:
                    f = jax.jit(functools.partial(kernel, scale=dim ** -0.5, interpret=interpret,
                                                  setting=setting))
                    k, per, w = setting or (*splits(nb, bs), 2)
                    res["attn"].append(dict(bs=bs, L=name, kind="optkit", k=k, tpc=per * bs,
                                            warps=w, default=setting is None,
                                            ms=bench(f, q, kp, vp, tables, lengths,
                                                     iters=iters)))
        if bs != 16:
            continue
        if "scatter" in parts:
            flat = jnp.zeros((heads, pages * bs, dim), dt)
            new = jax.random.normal(key, (576, heads, dim), dt)
            real = rng.permutation(pages * bs - bs)[:512] + bs
            dup = jnp.asarray(np.concatenate([real, np.zeros(64, int)]), jnp.int32)
            drop = jnp.asarray(np.concatenate([real, np.full(64, pages * bs)]), jnp.int32)
            for name, idx, kw in (("dup_promise", dup, dict(mode="promise_in_bounds")),
                                  ("drop", drop, dict(mode="drop")),
                                  ("drop_unique", drop, dict(mode="drop", unique_indices=True)),
                                  ("dup_unique", dup, dict(mode="promise_in_bounds",
                                                           unique_indices=True))):
                f = jax.jit(lambda p, i, n, kw=kw: p.at[:, i].set(jnp.swapaxes(n, 0, 1), **kw),
                            donate_argnums=0)
                flat = f(flat, idx, new)
                jax.block_until_ready(flat)
                t = time.perf_counter()
                for _ in range(iters):
                    flat = f(flat, idx, new)
                jax.block_until_ready(flat)
                res["scatter"].append(dict(kind=name, ms=(time.perf_counter() - t) / iters * 1e3))
        if "chunk" not in parts:
            continue
        # (name, rows, tokens a row, blocks a table, each row's first position, its table)
        cases = [("1x2048", 32, 64, 128, [64 * i for i in range(32)], [0] * 32),
                 ("8x256", 32, 64, 16, [64 * (i % 4) for i in range(32)],
                  [i // 4 for i in range(32)])]
        cases += [(f"{r}x{t}@{start}", r, t, nbc, [start] * r, list(range(r)))
                  for r, t, nbc, start in ((8, 64, 128, 0), (8, 64, 32, 0), (1, 512, 32, 0),
                                           (1, 512, 128, 0), (1, 512, 64, 512))]
        settings = [None] + [(per, w) for per in (2, 4, 8) for w in (4, 8)]
        for name, r, t, nbc, starts, which in cases:
            if small:
                r, t, nbc = max(1, r // 8), 16, max(2, nbc // 8)
                starts, which = [min(x // 8, nbc * bs - t) for x in starts[:r]], which[:r]
            qq = jax.random.normal(key, (r, t, heads, dim), dt)
            qi = jnp.asarray(np.array(starts)[:, None] + np.arange(t)[None], jnp.int32)
            tb = tables[jnp.asarray(which)][:, :nbc]
            f = jax.jit(lambda q, k, v, tb, qi: M.paged_attention(q, k, v, tb, qi, dim ** -0.5))
            res["chunk"].append(dict(case=name, rows=r, t=t, nb=nbc, kind="xla",
                                     ms=bench(f, qq, kp, vp, tb, qi, iters=iters)))
            for setting in settings:
                f = jax.jit(functools.partial(paged_chunk_attention, scale=dim ** -0.5,
                                              interpret=interpret, setting=setting))
                per, w = setting or CHUNK_SETTING
                res["chunk"].append(dict(case=name, rows=r, t=t, nb=nbc, kind="optkit",
                                         per_step=per, warps=w, default=setting is None,
                                         ms=bench(f, qq, kp, vp, tb, qi, iters=iters)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
