"""Latency of one small all-reduce over the GPUs of one host, as XLA runs it.

Tensor-parallel decoding all-reduces a (batch, hidden) activation twice per layer; at batch 1
that is a few KB, so each costs its latency, not its bytes.  This times ``jax.lax.psum``
inside ``jax.shard_map`` in a ``fori_loop`` of many, each feeding the next (what a jitted
decode step does); the difference of two loop lengths leaves the dispatch out.  Run it with
``XLA_FLAGS`` set to compare collective settings (recorded in every row).

    python benchmarks/allreduce_latency.py --gpus 2 --out allreduce.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time

#: elements of the all-reduced fp16 row: opt-13b / opt-66b / OPT-175B hidden sizes, and
#: opt-13b at batch 16
SIZES = [5120, 9216, 12288, 16 * 5120]


def run_jax(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:args.gpus]), ("tensor",))
    rows = []
    for n in SIZES:
        def chain(x, k):
            def body(i, x):
                # adding x keeps the carry device-varying, as the loop needs
                return x * jnp.float16(0.5) + jax.lax.psum(x, "tensor") * jnp.float16(0.25)
            return jax.lax.fori_loop(0, k, body, x)

        fns = {k: jax.jit(jax.shard_map(lambda x, k=k: chain(x, k), mesh=mesh,
                                        in_specs=P("tensor"), out_specs=P("tensor")))
               for k in (args.iters, 2 * args.iters)}
        x = jax.device_put(jnp.ones((args.gpus * n,), jnp.float16),
                           NamedSharding(mesh, P("tensor")))
        times = {}
        for k, fn in fns.items():
            fn(x).block_until_ready()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn(x).block_until_ready()
                ts.append(time.perf_counter() - t0)
            times[k] = sorted(ts)[2]
        # the difference of two loop lengths leaves out the dispatch
        us = (times[2 * args.iters] - times[args.iters]) / args.iters * 1e6
        rows.append({"framework": "jax-psum", "gpus": args.gpus, "elements": n, "bytes": 2 * n,
                     "us_in_loop": us, "jax": jax.__version__,
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "card": jax.devices()[0].device_kind})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--out", default="allreduce_latency.jsonl")
    args = p.parse_args()
    rows = run_jax(args)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "time": stamp}) + "\n")
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
