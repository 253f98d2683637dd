"""``optkit plan``: choose a parallel plan for a model on real or described devices."""

from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  optkit plan --model opt-175b --devices 32 --device V100-16GB --per-host 8
  optkit plan --model opt-175b --devices 32 --device-memory 16GiB   (V100 speeds assumed)
  optkit plan --model opt-66b --devices 2 --device A100-80GB --csv plans.csv
  optkit plan --model opt-1.3b --plan dp=1,tp=2,pp=1 --plan tp=1,pp=2   (only these plans)
  optkit plan --model opt-tiny --measure        (this machine's devices, timed)

Described clusters are compiled on that many fake CPU devices (no weights are allocated);
stages deeper than --max-layers-compiled layers are compiled with 1 and 2 layers and
extrapolated linearly."""


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="choose a parallel plan (dp x tp x pp) for a model and cluster",
        description="Enumerate data/tensor/pipeline plans, compile each abstractly, estimate "
                    "prefill and decode time with a roofline model, and pick the fastest that "
                    "fits in device memory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-125m",
                   help="preset (opt-125m ... opt-175b, opt-tiny) or a config.json / weight "
                        "folder (default: %(default)s)")
    w = p.add_argument_group("workload")
    w.add_argument("--batch", type=int, default=1, help="rows per batch (default: 1)")
    w.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    w.add_argument("--gen-len", type=int, default=32, help="new tokens (default: 32)")
    w.add_argument("--dtype", default="auto",
                   help="float16, bfloat16, float32 or auto (fp16 on accelerators and "
                        "described clusters, fp32 on CPU)")
    w.add_argument("--quantize", choices=["int8"],
                   help="int8 weight-only matmul kernels (as get_model(..., quantize='int8') "
                        "and --quantize of generate/serve): weights sized and compiled as int8")
    c = p.add_argument_group("cluster (omit --devices to plan this machine's devices)")
    c.add_argument("--devices", type=int, help="number of devices of a described cluster")
    c.add_argument("--device", help="device preset: V100-16GB, V100-32GB, A100-40GB, "
                                    "A100-80GB, H100-80GB, H200-141GB")
    c.add_argument("--device-memory", help="memory per device, e.g. 16GiB (overrides the "
                                           "preset; picks the preset of that size if --device "
                                           "is not given)")
    c.add_argument("--hbm-bandwidth", help="e.g. 900GB/s")
    c.add_argument("--flops", help="dense 16-bit FLOP/s, e.g. 125T")
    c.add_argument("--link-bandwidth", help="per direction inside a host, e.g. 150GB/s")
    c.add_argument("--per-host", type=int, help="devices per host (default: one host)")
    c.add_argument("--inter-host-bandwidth", default="12.5GB/s",
                   help="network per host and direction (default: %(default)s = 100 Gb/s)")
    c.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of device memory a plan may use (default: %(default)s)")
    o = p.add_argument_group("search and output")
    o.add_argument("--plan", action="append", metavar="SPEC",
                   help="evaluate only this plan, e.g. dp=1,tp=8,pp=4,mb=1 (repeatable)")
    o.add_argument("--micro-batches", type=int, nargs="+",
                   help="micro-batch counts to try for pipelines (default: 1, pp, 2 pp)")
    o.add_argument("--max-layers-compiled", type=int, default=2,
                   help="deeper stages are extrapolated from 1- and 2-layer compiles")
    o.add_argument("--measure", action="store_true",
                   help="also time the best few on this machine's devices and re-rank")
    o.add_argument("--top", type=int, help="print only the first N candidates")
    o.add_argument("--all", action="store_true",
                   help="also list invalid plans (heads, layers or batch do not split)")
    o.add_argument("--csv", help="write every candidate to this CSV file")
    p.set_defaults(func=run)


def cluster_from_args(args):
    from optkit.parallel.devices import (
        DEVICE_PRESETS,
        Cluster,
        parse_size,
        preset_for_memory,
    )

    memory = parse_size(args.device_memory) if args.device_memory else None
    if args.device:
        spec = Cluster.preset(args.device, 1).device
    elif memory is not None:
        spec = preset_for_memory(memory)
        if spec is None:
            raise ValueError(f"no preset has {args.device_memory}; pass --device (one of "
                             f"{', '.join(DEVICE_PRESETS)}) for its speeds")
        print(f"# assuming {spec.name} speeds for {args.device_memory} devices "
              f"(pass --device to change)", file=sys.stderr)
    else:
        spec = DEVICE_PRESETS["A100-80GB"]
        print("# no --device given: assuming A100-80GB", file=sys.stderr)
    kw = {}
    for flag, field in (("hbm_bandwidth", "hbm_bandwidth"), ("flops", "flops"),
                        ("link_bandwidth", "link_bandwidth")):
        if getattr(args, flag):
            kw[field] = parse_size(getattr(args, flag))
    if memory is not None:
        kw["memory"] = int(memory)
    return Cluster(spec.replace(**kw), args.devices, per_host=args.per_host,
                   inter_host_bandwidth=parse_size(args.inter_host_bandwidth),
                   memory_fraction=args.memory_fraction)


def load_config(model: str):
    from pathlib import Path

    from optkit.config import OPTConfig

    path = Path(os.path.expanduser(model))
    if path.is_dir() and (path / "config.json").is_file():
        return OPTConfig.from_json(path / "config.json")
    if path.is_file():
        return OPTConfig.from_json(path)
    return OPTConfig.from_name(model)


def run(args) -> int:
    if args.devices is not None and args.devices < 1:
        raise ValueError("--devices must be at least 1")
    if args.devices is not None:
        # A described cluster compiles on that many fake CPU devices, here if JAX has not
        # started yet (otherwise the planner starts a subprocess).
        import jax

        try:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", args.devices)
        except RuntimeError:
            pass
    from optkit.parallel.plan import Plan
    from optkit.parallel.planner import auto_plan

    cfg = load_config(args.model)
    cluster = cluster_from_args(args) if args.devices is not None else None
    dtype = args.dtype
    if dtype == "auto" and cluster is not None:
        dtype = "float16"
    plans = [Plan.parse(s) for s in args.plan] if args.plan else None
    report = auto_plan(cfg, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                       dtype=dtype, cluster=cluster, plans=plans,
                       micro_batches=args.micro_batches,
                       max_layers_compiled=args.max_layers_compiled, measure=args.measure,
                       strict=False, quantize=args.quantize)
    print(report.header())
    for note in report.notes:
        print(f"note: {note}")
    print()
    print(report.table(args.top, invalid=args.all))
    if args.csv:
        report.to_frame().to_csv(args.csv, index=False)
        print(f"\n# wrote {len(report.candidates)} candidates to {args.csv}")
    if report.best is None:
        print(f"\noptkit plan: {report.refusal()}", file=sys.stderr)
        return 1
    print("\nchosen plan:")
    print(report.best.describe(cfg, batch=args.batch, seq_len=args.prompt_len + args.gen_len,
                             quantize=args.quantize))
    return 0
