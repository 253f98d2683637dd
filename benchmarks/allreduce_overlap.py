"""Can an L2 prefetch of the next product's weights hide a tensor-parallel all-reduce?

At batch 1 on two cards each layer waits twice for a small all-reduce (~8 µs in a decode
step's trace) with the GPU nearly idle, and then reads the next product's weights from
HBM.  This builds a stand-in for a tensor-parallel OPT decoder (the four products of each
layer at real shapes, the residual adds and LayerNorms, no attention) and times it with and
without a Pallas kernel that, independent of the all-reduce, reads the first ``MB`` of the
next product's weights with Triton's ``evict_last`` policy: if XLA runs it beside the
all-reduce, the product then finds that part in L2.  ``--collective none`` leaves the
all-reduces out (the time of everything else), ``--gpus 1`` runs it unsplit.  Weights are
random; ms a stack.

    python benchmarks/allreduce_overlap.py --gpus 2 --prefetch-mb 0,8,16,24 --out ar.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def shapes(size: str) -> tuple[int, int]:
    """(hidden, ffn) of the OPT preset ``size`` ("13b", "opt-175b", "tiny" for a CPU check)."""
    from optkit.config import OPTConfig

    cfg = OPTConfig.from_name(size if size.startswith("opt-") else f"opt-{size}")
    return cfg.hidden_size, cfg.ffn_dim


def prefetch(w, nbytes: int):
    """Read the first ``nbytes`` of ``w`` (K, N) into L2 (evict_last) -> a (programs,) f32
    whose sum is 0 times the data (a value later work can depend on)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    k, n = w.shape
    bn = next(b for b in (1024, 512, 256, 128) if n % b == 0)
    br = 16
    rows = max(br, min(k, nbytes // (n * w.dtype.itemsize)) // br * br)
    grid = (rows // br, n // bn)

    def kernel(w_ref, o_ref):
        v = plgpu.load(w_ref, eviction_policy="evict_last").astype(jnp.float32)
        o_ref[...] = jnp.full((1,), jnp.sum(v) * 0.0, jnp.float32)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((grid[0] * grid[1],), jnp.float32),
        grid=grid, in_specs=[pl.BlockSpec((br, bn), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((1,), lambda i, j: (i * grid[1] + j,)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="l2_prefetch")(w)


def layer_norm(x):
    import jax.numpy as jnp
    x32 = x.astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True)
    var = ((x32 - mu) ** 2).mean(-1, keepdims=True)
    return ((x32 - mu) * (var + 1e-5) ** -0.5).astype(x.dtype)


def stack(x, ws, *, nbytes: int, axis: str, reduce: bool = True):
    """The decoder stand-in inside shard_map: ``ws`` per layer (qkv, out, fc1, fc2) local
    shards; the next product's weights prefetched beside each all-reduce when ``nbytes``;
    without the all-reduces (each card's partial sums kept: wrong sums, the time of the
    rest) unless ``reduce``."""
    import jax
    layers = len(ws)
    psum = jax.lax.psum if reduce else (lambda v, _: v)
    for i, (qkv, out, fc1, fc2) in enumerate(ws):
        a = layer_norm(x) @ qkv
        a = a[:, :out.shape[0]]                       # stands in for the attention heads
        tok = prefetch(fc1, nbytes) if nbytes else None
        x = x + psum(a @ out, axis)
        h = layer_norm(x)
        if tok is not None:
            h = h + (tok[0] * 0).astype(h.dtype)
        h = jax.nn.relu(h @ fc1)
        nxt = ws[i + 1][0] if i + 1 < layers else None
        tok = prefetch(nxt, nbytes) if nbytes and nxt is not None else None
        x = x + psum(h @ fc2, axis)
        if tok is not None:
            x = x + (tok[0] * 0).astype(x.dtype)
    return x


def run(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from optkit.bench.results import append_rows
    from optkit.parallel.executor import GPU_MULTI_DECODE_OPTIONS

    hidden, ffn = shapes(args.size)
    g = args.gpus
    mesh = Mesh(np.array(jax.devices()[:g]), ("t",))
    col, row = NamedSharding(mesh, P(None, "t")), NamedSharding(mesh, P("t", None))
    key = jax.random.PRNGKey(0)

    def rand(shape, sharding):
        nonlocal key
        key, sub = jax.random.split(key)
        return jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * 0.02)
                       .astype(jnp.float16), out_shardings=sharding)(sub)

    ws = [(rand((hidden, 3 * hidden), col), rand((hidden, hidden), row),
           rand((hidden, ffn), col), rand((ffn, hidden), row)) for _ in range(args.layers)]
    spec_w = [(P(None, "t"), P("t", None), P(None, "t"), P("t", None))] * args.layers
    x = jax.device_put(jnp.ones((args.batch, hidden), jnp.float16),
                       NamedSharding(mesh, P()))
    options = {"graphs": GPU_MULTI_DECODE_OPTIONS, "none": {}}
    rows = []
    for opt in args.options.split(","):
        for mb in [int(v) for v in args.prefetch_mb.split(",")]:
            body = functools.partial(stack, nbytes=mb << 20, axis="t",
                                     reduce=args.collective == "psum")
            fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), spec_w),
                                       out_specs=P(), check_vma=False),
                         compiler_options=options[opt])
            compiled = fn.lower(x, ws).compile()
            if args.dump and mb:
                Path(args.dump).write_text(compiled.as_text())
            y = compiled(x, ws)
            y.block_until_ready()
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for _ in range(args.chain):
                    y = compiled(y, ws)
                y.block_until_ready()
                ts.append((time.perf_counter() - t0) / args.chain)
            ms = sorted(ts)[len(ts) // 2] * 1e3
            rows.append({"size": args.size, "gpus": g, "batch": args.batch,
                         "layers": args.layers, "options": opt, "prefetch_mb": mb,
                         "collective": args.collective,
                         "ms": ms, "us_per_layer": ms * 1e3 / args.layers,
                         "finite": bool(jnp.isfinite(y.astype(jnp.float32)).all()),
                         "card": jax.devices()[0].device_kind, "jax": jax.__version__,
                         "xla_flags": os.environ.get("XLA_FLAGS", ""),
                         "nccl_env": {k: v for k, v in os.environ.items()
                                      if k.startswith("NCCL_")},
                         "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            append_rows(rows[-1:], args.out)      # each row kept as soon as it is measured
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="13b", help="OPT preset: 13b, 30b, 66b, 175b, ...; tiny "
                   "for a CPU check of the script")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--prefetch-mb", default="0,8,16,24,32",
                   help="MiB of the next product's weights read into L2 beside each "
                        "all-reduce (0: none)")
    p.add_argument("--options", default="graphs,none",
                   help="graphs: optkit's multi-device decode options; none: XLA's")
    p.add_argument("--collective", choices=("psum", "none"), default="psum",
                   help="none: leave the all-reduces out (the time of everything else)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--chain", type=int, default=20, help="calls per timed repetition")
    p.add_argument("--dump", default="", help="write the optimized HLO (last prefetch run)")
    p.add_argument("--out", default="allreduce_overlap.jsonl")
    run(p.parse_args())


if __name__ == "__main__":
    main()
