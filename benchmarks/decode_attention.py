"""Decode attention on a GPU: XLA's kernels vs the fused Pallas kernel, per layer.

One new position per row (its K/V written into the cache, its query attending) over a KV
cache of 256 positions (prompt 128 + 128 new tokens), every row at position 192 (the mean
over such a generation), at the head shapes of opt-1.3b, 6.7b and 13b.  A jitted function
runs ``--layers`` layers, each on its own cache (so a small cache is not served from L2),
and the time per layer is reported with the bytes of K and V each path has to read: XLA
reads all 256 positions, the kernel each row's 192.  The kernel's block size and warps are
swept (the row without them is the kernel's own choice, ``blocks``); the best is marked.
``us`` is wall time per layer (at batch 1 mostly launching); ``kernel_us`` the kernel's own
median time from a profiler trace of one call.

    python benchmarks/decode_attention.py --out build/decode_attention.jsonl
    python benchmarks/decode_attention.py --check        # correctness only (interpreted, CPU)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optkit import model as M  # noqa: E402
from optkit.bench import trace  # noqa: E402
from optkit.bench.results import append_rows  # noqa: E402
from optkit.config import OPTConfig  # noqa: E402
from optkit.kernels import decode_attention as K  # noqa: E402

CASES = [("1.3b", 1), ("1.3b", 16), ("1.3b", 64), ("6.7b", 1), ("6.7b", 16), ("6.7b", 64),
         ("13b", 1), ("13b", 16), ("13b", 64)]
#: settings swept: few programs (batch 1) want long blocks, many want short blocks of heads
SWEEP = {"block_k": (8, 16, 32, 64), "heads": (1, 2, 4), "num_warps": (2, 4)}
SWEEP_FEW = {"block_k": (32, 64, 128), "heads": (1,), "num_warps": (2, 4, 8)}


def make_inputs(a: int, d: int, b: int, s: int, length: int, layers: int, dtype, seed=0):
    key = jax.random.PRNGKey(seed)
    kq, kk, kv = jax.random.split(key, 3)
    qkv = jax.random.normal(kq, (b, 3, a, d), dtype)
    ks = [jax.random.normal(jax.random.fold_in(kk, i), (b, s, a, d), dtype) for i in range(layers)]
    vs = [jax.random.normal(jax.random.fold_in(kv, i), (b, s, a, d), dtype) for i in range(layers)]
    mask = jnp.broadcast_to(jnp.arange(s) <= length, (b, s))
    index = jnp.full((b,), length, jnp.int32)
    return qkv, ks, vs, mask, index


def run_case(size: str, b: int, s: int, length: int, layers: int, sweep: bool) -> list[dict]:
    cfg = OPTConfig.from_name("opt-" + size)
    a, d = cfg.num_attention_heads, cfg.head_dim
    scale = d ** -0.5
    qkv, ks, vs, mask, index = make_inputs(a, d, b, s, length, layers, jnp.float16)

    def layered(attend):
        # caches donated, as in a decode step: both paths update them in place
        @functools.partial(jax.jit, donate_argnums=(1, 2))
        def f(qkv, ks, vs, mask, index):
            outs = [attend(qkv, k, v, mask, index) for k, v in zip(ks, vs, strict=True)]
            return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]
        return f

    def timed_layers(f, pattern: str | None = None, reps: int = 20):
        nonlocal ks, vs
        out, ks, vs = f(qkv, ks, vs, mask, index)
        jax.block_until_ready(out)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            out, ks, vs = f(qkv, ks, vs, mask, index)
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t)
        kernel = None
        if pattern:  # the kernel's own time, from a trace of one more call
            (out, ks, vs), events = trace.profile(f, qkv, ks, vs, mask, index)
            own = sorted(e.dur_ns for e in events if pattern in e.name.lower())
            kernel = own[len(own) // 2] / 1e3 if own else None
        return out[0], sorted(ts)[len(ts) // 2] / layers, kernel

    xla = layered(lambda q, k, v, m, i: M.dense_decode_attention(q, k, v, m, i, s, scale))
    ref, t, _ = timed_layers(xla)
    ref = ref.astype(jnp.float32)
    kv_bytes = 2 * b * a * d * 2  # K and V bytes per position
    base = {"size": size, "batch": b, "cache": s, "length": length, "heads": a, "head_dim": d,
            "layers": layers, "card": jax.devices()[0].device_kind, "jax": jax.__version__}
    rows = [{**base, "impl": "xla", "us": t * 1e6, "GBps": kv_bytes * s / t / 1e9}]
    sweep = {} if not sweep else SWEEP if b * a >= 256 else SWEEP_FEW
    for values in [()] + list(itertools.product(*sweep.values())):
        kw = dict(zip(sweep, values, strict=False))
        if kw and a % kw["heads"]:
            continue
        f = layered(lambda q, k, v, m, i, kw=kw: K.decode_attention(
            q, k, v, K.mask_bias(m), i, scale=scale, **kw))
        try:
            out, t, kernel_us = timed_layers(f, "decode_attention")
        except Exception as e:  # a setting Triton refuses (e.g. too many registers)
            rows.append({**base, "impl": "pallas", **kw, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
        rows.append({**base, "impl": "pallas", **(kw or {"auto_blocks": K.blocks(b, a, d)}),
                     "us": t * 1e6, "kernel_us": kernel_us, "max_abs_err": err,
                     "GBps": kv_bytes * length / t / 1e9,
                     "kernel_GBps": kernel_us and kv_bytes * length / kernel_us / 1e3})
    ok = [r for r in rows if r["impl"] == "pallas" and r.get("kernel_us")]
    if ok:
        min(ok, key=lambda r: r["kernel_us"])["best"] = True
    return rows


def check() -> None:
    rng = np.random.default_rng(0)
    b, s, a, d = 3, 40, 2, 16
    qkv = jnp.asarray(rng.standard_normal((b, 3, a, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, a, d)), jnp.float32) for _ in range(2))
    index = jnp.asarray([39, 16, 0], jnp.int32)
    mask = jnp.arange(s)[None] <= index[:, None]
    ref = M.dense_decode_attention(qkv, k, v, mask, index, s, 0.25)
    err = 0.0
    for heads in (1, 2):
        got = K.decode_attention(qkv, k, v, K.mask_bias(mask), index, scale=0.25, block_k=16,
                                 heads=heads, interpret=True)
        err = max(err, *(float(jnp.abs(g - r).max()) for g, r in zip(got, ref, strict=True)))
    print(f"max abs difference, interpreted kernel vs XLA (output and caches): {err:.2e}")
    if err > 1e-5:
        raise SystemExit("mismatch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="append JSON rows here")
    p.add_argument("--cases", default=",".join(f"{s}:{b}" for s, b in CASES),
                   help="size:batch list (default: %(default)s)")
    p.add_argument("--cache", type=int, default=256, help="cache positions")
    p.add_argument("--length", type=int, default=192, help="positions written per row")
    p.add_argument("--layers", type=int, default=16, help="caches rotated per call")
    p.add_argument("--no-sweep", action="store_true", help="only the kernel's default blocks")
    p.add_argument("--check", action="store_true", help="correctness on CPU (interpreted)")
    args = p.parse_args()
    if args.check:
        return check()
    for item in args.cases.split(","):
        size, b = item.split(":")
        out = run_case(size, int(b), args.cache, args.length, args.layers, not args.no_sweep)
        print("\n".join(json.dumps(r) for r in out), flush=True)
        if args.out:
            append_rows(out, args.out)


if __name__ == "__main__":
    main()
