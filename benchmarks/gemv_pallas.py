"""One-row int8 products on a GPU: XLA's fused widen-multiply-reduce vs Pallas (Triton) kernels.

A decode step of batch 1 reads every int8 matmul kernel once; XLA computes
``y = (x * q).sum(-1) * scale`` over the output-major int8 kernel ``q`` (N, K) as one
reduction.  This script times that against two hand-written Pallas kernels (a program per
block of output channels, looping over K in blocks): ``pallas`` widens each int8 with a
conversion, ``words`` is ``optkit.kernels.int8_matvec`` (32-bit loads, widened with integer
masks).  ``read`` (a sum of the same bytes as int32 words) is the shape's read ceiling.  Shapes
are an opt-6.7b layer's kernels and OPT-175B's split over two cards, rotating over enough
layers' kernels that the L2 cache holds none of them; it reports the bytes of ``q`` read per
second.

    python benchmarks/gemv_pallas.py --out gemv.jsonl          # on a GPU
    python benchmarks/gemv_pallas.py --check                   # correctness, interpreted (CPU)
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from optkit.config import OPTConfig
from optkit.kernels.int8_matvec import int8_matvec


def layer_kernels(name: str, tp: int = 1) -> list[tuple[str, int, int]]:
    """(name, N output channels, K inputs) of one layer's four kernels of the OPT preset
    ``name``, each device's shard under ``tp``-way tensor parallelism."""
    cfg = OPTConfig.from_name(name)
    h, f = cfg.hidden_size, cfg.ffn_dim
    return [("qkv", 3 * h // tp, h), ("out", h, h // tp), ("fc1", f // tp, h),
            ("fc2", h, f // tp)]


SHAPES = {"6.7b": layer_kernels("opt-6.7b"), "13b": layer_kernels("opt-13b"),
          "175b/tp2": layer_kernels("opt-175b", tp=2)}


def xla_gemv(x, q, scale):
    """What optkit.model.project does without a kernel: one row (K,) as a multiply-reduce,
    several (M, K) as a dot over the widened kernel."""
    if x.ndim == 2:
        y = jnp.einsum("mk,nk->mn", x, q.astype(x.dtype), preferred_element_type=jnp.float32)
    else:
        y = jnp.sum(x.astype(jnp.float32)[None, :] * q.astype(jnp.float32), axis=-1)
    return (y * scale).astype(x.dtype)


def read_words(x, q, scale):
    """Read every byte of q (as int32 words) with a trivial reduction: the read ceiling."""
    n, k = q.shape
    words = jax.lax.bitcast_convert_type(q.reshape(n, k // 4, 4), jnp.int32)
    y = jnp.sum(words, axis=1).astype(jnp.float32) * scale
    return jnp.broadcast_to(y, x.shape[:-1] + y.shape)


def words_gemv(x, q, scale, **cfg):
    y = int8_matvec(x.reshape(-1, x.shape[-1]), q, scale, **cfg).astype(x.dtype)
    return y.reshape(x.shape[:-1] + y.shape[1:])


def grid(text: str) -> dict[str, tuple[int, ...]]:
    """``"block_n=8,16;block_k=2048"`` -> {"block_n": (8, 16), "block_k": (2048,)}."""
    out = {"block_n": (4, 8, 16), "block_k": (512, 1024, 2048), "num_warps": (4, 8),
           "num_stages": (3,)}
    for part in filter(None, text.split(";")):
        key, _, values = part.partition("=")
        if key not in out:
            raise SystemExit(f"--words-grid: unknown key {key!r}; use {sorted(out)}")
        out[key] = tuple(int(v) for v in values.split(","))
    return out


def _kernel(x_ref, q_ref, s_ref, o_ref, *, bk: int, k: int):
    bn = q_ref.shape[0]

    def body(i, acc):
        cols = pl.ds(pl.multiple_of(i * bk, bk), bk)
        w = q_ref[:, cols].astype(jnp.float32)
        xv = x_ref[cols].astype(jnp.float32)
        return acc + jnp.sum(w * xv[None, :], axis=1)

    acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((bn,), jnp.float32))
    o_ref[...] = (acc * s_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bn", "bk", "warps", "stages", "interpret"))
def pallas_gemv(x, q, scale, bn=16, bk=512, warps=4, stages=3, interpret=False):
    n, k = q.shape
    if n % bn or k % bk:
        raise ValueError(f"blocks ({bn}, {bk}) do not tile ({n}, {k})")
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        params["compiler_params"] = plt.CompilerParams(num_warps=warps, num_stages=stages)
    return pl.pallas_call(
        functools.partial(_kernel, bk=bk, k=k),
        out_shape=jax.ShapeDtypeStruct((n,), x.dtype),
        grid=(n // bn,),
        in_specs=[pl.BlockSpec((k,), lambda i: (0,)), pl.BlockSpec((bn, k), lambda i: (i, 0)),
                  pl.BlockSpec((bn,), lambda i: (i,))],
        out_specs=pl.BlockSpec((bn,), lambda i: (i,)),
        interpret=interpret, **params)(x, q, scale)


def check() -> None:
    rng = np.random.default_rng(0)
    for n, k, bn, bk in ((64, 256, 16, 64), (48, 384, 16, 128)):
        q = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
        x = jnp.asarray(rng.standard_normal(k), jnp.float32)
        s = jnp.asarray(rng.uniform(0.001, 0.01, n), jnp.float32)
        got = pallas_gemv(x, q, s, bn=bn, bk=bk, interpret=True)
        want = xla_gemv(x, q, s)
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        print(f"check n={n} k={k}: rel err {err:.2e}")
        assert err < 1e-5, err
        got = words_gemv(x, q, s, block_n=bn, block_k=bk, interpret=True)
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        print(f"check words n={n} k={k}: rel err {err:.2e}")
        assert err < 1e-5, err


def time_configs(model: str, name: str, n: int, k: int, configs, impls, args) -> list[dict]:
    """Rows timing each (kind, settings) of ``configs`` (``impls[kind](x, q, scale,
    **settings)``) on an (n, k) kernel: ``args.rows`` rows, ``args.iters`` products per timed
    call rotating over ``args.rotate_bytes`` of kernels, the median of ``args.reps`` calls."""
    rows = []
    dev = jax.devices()[0]
    layers = max(2, int(np.ceil(args.rotate_bytes / (n * k))))
    keys = jax.random.split(jax.random.key(0), layers + 1)
    # separate buffers (a slice of one stacked array would be copied for the call)
    qs = [jax.random.randint(kk, (n, k), -127, 128, jnp.int8) for kk in keys[1:]]
    xs = jax.random.normal(keys[0], (args.rows, k)[2 - min(args.rows, 2):], jnp.float16)
    ss = [jnp.full((n,), 0.01, jnp.float32)] * layers
    ref = xla_gemv(xs, qs[0], ss[0]).astype(jnp.float32)
    for kind, cfg in configs:
        fn = functools.partial(impls[kind], **cfg)

        @jax.jit
        def loop(x, qs, ss, fn=fn):
            def body(i, acc):
                for q, s in zip(qs, ss, strict=True):
                    # x depends on acc: nothing is hoisted out of the loop
                    xi = x + (acc.reshape(-1)[0] * 1e-30).astype(x.dtype)
                    acc = acc + fn(xi, q, s).astype(jnp.float32)
                return acc
            rounds = max(1, args.iters // len(qs))
            shape = jax.eval_shape(fn, x, qs[0], ss[0]).shape
            return jax.lax.fori_loop(0, rounds, body, jnp.zeros(shape, jnp.float32))

        try:
            loop(xs, qs, ss).block_until_ready()
            one = fn(xs, qs[0], ss[0]).astype(jnp.float32)
            err = float(jnp.linalg.norm(one - ref) / jnp.linalg.norm(ref))
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                loop(xs, qs, ss).block_until_ready()
                ts.append(time.perf_counter() - t0)
            t = sorted(ts)[len(ts) // 2] / (max(1, args.iters // layers) * layers)
            row = {"model": model, "kernel": name, "n": n, "k": k, "rows": args.rows,
                   "impl": kind, **cfg, "us": t * 1e6, "GBps": n * k / t / 1e9,
                   "rel_err": err, "card": dev.device_kind, "jax": jax.__version__}
        except Exception as e:  # a config Triton cannot compile: record why
            row = {"model": model, "kernel": name, "impl": kind, **cfg,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench(args) -> list[dict]:
    rows = []
    impls = {"xla": xla_gemv, "read": read_words, "pallas": pallas_gemv, "words": words_gemv}
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            g = grid(args.words_grid)
            configs = [("xla", {}), ("read", {})] + [
                ("pallas", {"bn": bn, "bk": bk, "warps": 4, "stages": 3})
                for bn in (8, 16) for bk in (512, 1024)
                if args.old_kernel and args.rows == 1 and n % bn == 0 and k % bk == 0] + [
                ("words", {"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": st,
                           "evict": None if ev == "none" else ev})
                for ev in args.evict.split(",")
                for bn in g["block_n"] for bk in g["block_k"] for w in g["num_warps"]
                for st in g["num_stages"] if n % bn == 0 and k % bk == 0]
            rows += time_configs(model, name, n, k, configs, impls, args)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="check the kernel (interpreted)")
    p.add_argument("--models", default="6.7b,175b/tp2")
    p.add_argument("--iters", type=int, default=200, help="products per timed call")
    p.add_argument("--rows", type=int, default=1, help="rows of x (more than 1: XLA's dot)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rotate-bytes", type=float, default=400e6,
                   help="rotate over this many bytes of kernels (far more than L2)")
    p.add_argument("--out", default="gemv_pallas.jsonl")
    p.add_argument("--words-grid", default="",
                   help='settings of the words kernel to sweep, e.g. "block_k=2048,4096;'
                        'num_stages=2,3,4" (keys block_n, block_k, num_warps, num_stages)')
    p.add_argument("--evict", default="evict_first",
                   help="the words kernel's weight-load eviction policies to time, e.g. "
                        "evict_first,none")
    p.add_argument("--no-old-kernel", dest="old_kernel", action="store_false",
                   help="skip the conversion kernel")
    args = p.parse_args()
    if args.check:
        check()
        return
    rows = bench(args)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    best = {}
    for r in rows:
        if "GBps" in r:
            k = (r["model"], r["kernel"], r["impl"] + ("/" + r["evict"] if r.get("evict") else ""))
            if r["GBps"] > best.get(k, {}).get("GBps", 0):
                best[k] = r
    for (m, kern, impl), r in sorted(best.items()):
        cfg = {c: r[c] for c in ("bn", "bk", "warps", "stages", "block_n", "block_k",
                                 "num_warps", "num_stages") if c in r}
        print(f"{m:9} {kern:4} {impl:22} {r['us']:8.1f} us {r['GBps']:7.0f} GB/s {cfg}")


if __name__ == "__main__":
    main()
