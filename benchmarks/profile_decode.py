"""Where a decode step's time goes on each device: kernel time by kind from a profiler trace.

Builds an OPT model of real shapes with random fp16 (or int8) weights under plain tensor
parallelism over ``--devices``, optionally with fewer layers (``--layers``: every layer costs
the same, so a few give the per-layer picture of a model that would not fit), times the
batched decode loop untraced, then traces one loop and adds up its kernels
(``optkit.bench.trace``): busy and idle time per step, time by kind (products, collectives,
Pallas kernels, other fusions) and the longest kernels.  One JSON row per run.

    python benchmarks/profile_decode.py --size 175b --layers 16 --devices 2 --int8 \
        --out benchmarks/results/gpu/profile_175b.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1.3b", help="OPT size (opt-SIZE)")
    p.add_argument("--layers", type=int, default=0, help="keep this many layers (0: all)")
    p.add_argument("--devices", type=int, default=1, help="tensor-parallel over N devices")
    p.add_argument("--int8", action="store_true", help="int8 weight-only")
    p.add_argument("--kernels", default="auto", help="optkit kernels= choice")
    p.add_argument("--no-graphs", action="store_true",
                   help="decode without optkit's CUDA-graph compiler options")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed/traced loop")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=15, help="longest kernels to list")
    p.add_argument("--out", default="profile_decode.jsonl")
    p.add_argument("--logits", choices=("sharded", "replicated"), default="sharded",
                   help="greedy step on the logits as the LM head leaves them (split over "
                        "the vocabulary) or gathered first")
    p.add_argument("--loop", choices=("executor", "static"), default="executor",
                   help="the executor's decode loop (dynamic trip count) or one jit with a "
                        "static trip count")
    p.add_argument("--lookup", choices=("placed", "xla"), default="placed",
                   help="token lookup: the executor's (optkit.parallel.lookup) or XLA's own "
                        "partitioning of a plain take")
    p.add_argument("--around", default="all-gather",
                   help="list the kernels around a middle kernel matching this pattern")
    p.add_argument("--around-span", default="6,3",
                   help="how many kernels before,after it to list")
    p.add_argument("--cb-collectives", action="store_true",
                   help="the one-device decode options (WHILE graphs) plus collectives")
    p.add_argument("--command-buffer", default=None,
                   help="the decode jits' xla_gpu_enable_command_buffer instead of optkit's, "
                        "e.g. FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES (no WHILE: "
                        "NCCL in graphs with conditional nodes fails to instantiate)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA debug option for the decode jits (repeatable), e.g. "
                        "xla_gpu_experimental_enable_triton_softmax_priority_fusion=true; "
                        "set through jit's compiler_options, so options that XLA_FLAGS "
                        "does not know work too")
    p.add_argument("--tag", default="", help="free text recorded in the row")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from optkit import model as M
    from optkit.bench.trace import around, profile, summarize
    from optkit.config import OPTConfig
    from optkit.options import ModelOptions
    from optkit.parallel import Plan
    from optkit.parallel.build import build_executor
    from optkit.parallel.executor import GPU_DECODE_OPTIONS

    cfg = OPTConfig.from_name("opt-" + args.size)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    devices = jax.devices()[:args.devices]
    t0 = time.perf_counter()
    options = ModelOptions(dtype="float16", quantize="int8" if args.int8 else None,
                           kernels=args.kernels)
    ex = build_executor(cfg, Plan(tp=len(devices), dtype="float16"), None, devices,
                        options=options, progress=False)
    # The XLA options and token lookup of this script's own static-trip-count jit (the
    # executor's loop always runs with the executor's own).
    xla_options = dict(ex.decode_options)
    if args.no_graphs:
        xla_options = {}
    if args.command_buffer is not None:
        xla_options["xla_gpu_enable_command_buffer"] = args.command_buffer
    if args.cb_collectives:
        xla_options = {**GPU_DECODE_OPTIONS, "xla_gpu_enable_command_buffer":
                       GPU_DECODE_OPTIONS["xla_gpu_enable_command_buffer"] + ",COLLECTIVES"}
    for item in args.option:
        key, _, value = item.partition("=")
        xla_options[key] = {"true": True, "false": False}.get(value.lower(), value)
    lookup = None if args.lookup == "xla" else ex.embed_lookup
    if args.loop == "executor" and (xla_options != ex.decode_options or lookup is None
                                    and ex.embed_lookup is not None):
        p.error("--no-graphs/--command-buffer/--cb-collectives/--option/--lookup xla apply to "
                "--loop static")
    jax.block_until_ready(ex.params)
    init_s = time.perf_counter() - t0
    b, s = args.batch, args.prompt + 2 * args.steps + 2
    ids = np.random.default_rng(0).integers(4, 50000, (b, args.prompt)).astype(np.int32)

    replicated = NamedSharding(ex.mesh, PartitionSpec())

    def step(logits, state):
        if args.logits == "replicated":
            logits = jax.lax.with_sharding_constraint(logits, replicated)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        return tok, state, tok

    def fresh():
        cache = ex.init_cache(b, s)
        logits, cache = ex.prefill(ids, np.ones_like(ids), cache)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    kern = ex.decode_kernels(b, s)

    def static(params, tok, cache):
        def body(_, carry):
            tok, cache = carry
            logits, cache = M.decode_step(params, cfg, tok, cache, lookup=lookup, **kern)
            return step(logits, ())[0], cache
        return jax.lax.fori_loop(0, args.steps, body, (tok, cache))

    static = jax.jit(static, donate_argnums=(2,), compiler_options=xla_options)

    def loop(tok, cache):
        if args.loop == "static":
            return static(ex.params, tok, cache)
        return ex.decode_loop(step, tok, cache, (), args.steps)

    times = []
    for _ in range(args.reps + 1):  # the first compiles
        tok, cache = jax.block_until_ready(fresh())
        t = time.perf_counter()
        jax.block_until_ready(loop(tok, cache))
        times.append(time.perf_counter() - t)
    step_ms = sorted(times[1:])[len(times[1:]) // 2] / args.steps * 1e3
    tok, cache = jax.block_until_ready(fresh())
    _, events = profile(loop, tok, cache)
    prof = summarize(events, args.steps, args.top)
    before, after = (int(n) for n in args.around_span.split(","))
    near = around(events, args.around, before, after, nth=None)
    row = {"card": jax.devices()[0].device_kind, "jax": jax.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tag": args.tag,
           "size": args.size, "layers": cfg.num_hidden_layers, "devices": args.devices,
           "int8": args.int8, "kernels": args.kernels,
           **{k: "xla" if v is None else "pallas" for k, v in kern.items()},
           "logits": args.logits, "loop": args.loop, "lookup": args.lookup,
           "graphs": bool(xla_options), "cb_collectives": args.cb_collectives,
           "command_buffer": xla_options.get("xla_gpu_enable_command_buffer"),
           "options": args.option,
           "batch": b, "prompt": args.prompt,
           "steps": args.steps, "init_s": init_s, "step_ms": step_ms,
           "per_layer_us": step_ms * 1e3 / cfg.num_hidden_layers, "profile": prof,
           "around": {"pattern": args.around, "kernels": near}}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.size} x{cfg.num_hidden_layers} layers, {args.devices} device(s), "
          f"{'int8' if args.int8 else 'fp16'}, batch {b}: {step_ms:.3f} ms/step "
          f"({row['per_layer_us']:.1f} µs/layer), logits {args.logits}, loop {args.loop}, "
          f"lookup {args.lookup}")
    for dev, d in prof.items():
        print(f"  {dev}: span {d['span_us']:.0f} busy {d['busy_us']:.0f} idle "
              f"{d['idle_us']:.0f} µs/step, {d['kernels']:.0f} kernels/step; by kind (µs): "
              + ", ".join(f"{k} {v:.0f}" for k, v in d["by_kind_us"].items()))
        for t in d["top"]:
            print(f"    {t['us']:9.1f} µs {t['count']:6.1f}x  {t['kind']:<10} {t['op'][:30]:<30} "
                  f"{t['name'][:60]}")
    for dev, evs in near.items():
        print(f"  {dev} around {args.around!r} (start µs from it, µs):")
        for name, op, start, dur in evs:
            print(f"    {start:10.1f} {dur:9.1f}  {op[:30]:<30} {name}")


if __name__ == "__main__":
    main()
