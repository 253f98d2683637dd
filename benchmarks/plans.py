"""The planner's choice for the named clusters, written to ``benchmarks/results/plans.md``
(every candidate of every case also to ``plans.csv``).

Each case is one ``optkit plan`` command, run in its own process (each compiles on its own
number of fake CPU devices); the markdown holds each command and its full output.

Usage::

    python benchmarks/plans.py                 # all cases (minutes on 2 CPU cores)
    python benchmarks/plans.py --only tiny     # cases whose name contains "tiny"
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

#: (name, optkit plan arguments, extra environment)
CASES = [
    ("tiny model on 8 x A100-80GB, batch 8",
     "--model opt-tiny --devices 8 --device A100-80GB --batch 8", {}),
    ("tiny model on this machine's 8 fake CPU devices, best 3 measured",
     "--model opt-tiny --batch 8 --measure",
     {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}),
    ("opt-175b on 32 x V100-16GB, 4 hosts of 8 (the seed's cluster)",
     "--model opt-175b --devices 32 --device-memory 16GiB --per-host 8", {}),
    ("opt-175b on 32 x V100-16GB, 4 hosts of 8, batch 16, prompt 512 + 128",
     "--model opt-175b --devices 32 --device V100-16GB --per-host 8 --batch 16 "
     "--prompt-len 512 --gen-len 128", {}),
    ("opt-175b on 8 x A100-80GB", "--model opt-175b --devices 8 --device A100-80GB", {}),
    ("opt-66b on 2 x A100-80GB", "--model opt-66b --devices 2 --device A100-80GB", {}),
    ("opt-175b with int8 kernels on 2 x H200-141GB (its fp16 weights do not fit), "
     "prompt 128 + 128", "--model opt-175b --devices 2 --device H200-141GB --quantize int8 "
     "--gen-len 128", {}),
    ("opt-175b on 8 x 16 GiB (nothing fits: the planner refuses)",
     "--model opt-175b --devices 8 --device V100-16GB", {}),
]

#: The machines of the 8-GPU issue (not lent yet): the plan predicted before any run.
CASES_8GPU = [
    (f"opt-175b on {n} x {dev}, batch {b}, prompt 128 + 128",
     f"--model opt-175b --devices {n} --device {dev} --batch {b} --prompt-len 128 "
     f"--gen-len 128 --top 6", {})
    for n, dev in ((8, "H100-80GB"), (4, "H200-141GB")) for b in (1, 16)
] + [
    (f"opt-175b on {n} x {dev}, prefill of 2048 tokens",
     f"--model opt-175b --devices {n} --device {dev} --batch 1 --prompt-len 2048 "
     f"--gen-len 0 --top 6", {})
    for n, dev in ((8, "H100-80GB"), (4, "H200-141GB"))
] + [
    (f"opt-66b on {n} x {dev} (half the machine), batch {b}, prompt 128 + 128",
     f"--model opt-66b --devices {n} --device {dev} --batch {b} --prompt-len 128 "
     f"--gen-len 128 --top 6", {})
    for n, dev in ((4, "H100-80GB"), (2, "H200-141GB")) for b in (1, 16)
]

#: optkit's measured GPU decode rows (``benchmarks/gpu_decode.py``, jax 0.11.2, H200s): one
#: card, opt-13b on two, opt-66b on two and four and opt-175b on four.
MEASURED = ["benchmarks/results/gpu/large_batch_h200.jsonl",
            "benchmarks/results/gpu/mma_13b_h200x2.jsonl",
            "benchmarks/results/gpu/gpu_4card_refresh_h200x4.jsonl"]


def measured_rows():
    """(row, config, devices) of every default-variant optkit row in :data:`MEASURED`."""
    import json

    from optkit.config import OPTConfig

    for name in MEASURED:
        for line in (ROOT / name).read_text().splitlines():
            r = json.loads(line)
            if r.get("framework") == "optkit" and r.get("variant", "default") == "default":
                yield r, OPTConfig.from_name(f"opt-{r['size']}"), int(r.get("devices") or 1)


def planned(r: dict, cfg, n: int, cost_model=None):
    """The planner's candidate for measured row ``r``: tensor parallel over ``n`` H200s."""
    from optkit.parallel import Cluster, Plan, auto_plan

    report = auto_plan(cfg, batch=r["batch"], prompt_len=r["prompt"], gen_len=r["new_tokens"],
                       dtype="float16", cluster=Cluster.preset("H200-141GB", n),
                       plans=[Plan(tp=n)], progress=False, strict=False,
                       cost_model=cost_model)
    return report.candidates[0]


def fit(efficiency: float = 0.90) -> str:
    """Least-squares decode constants (per-layer overhead, collective latency, per-hop
    latency; relative errors) for the measured decode steps, the bandwidth efficiency held at
    ``efficiency`` and also fitted; a text report."""
    import numpy as np

    from optkit.parallel.planner import CostModel

    unit = dict(bandwidth_efficiency=1.0, layer_overhead=0.0, collective_latency=0.0,
                hop_latency=0.0)
    probes = {"base": {}, "layers": {"layer_overhead": 1.0},
              "colls": {"collective_latency": 1.0}, "hops": {"hop_latency": 1.0}}
    names, ms, terms = [], [], []
    for r, cfg, n in measured_rows():
        if not r["new_tokens"] or r.get("step_ms") is None:
            continue
        parts = {k: planned(r, cfg, n, CostModel(**{**unit, **v})).decode_parts
                 for k, v in probes.items()}
        base = parts["base"]
        assert base["memory"] > base["compute"], "decode steps are bound by reading memory"
        terms.append([base["memory"], base["comm"], parts["layers"]["overhead"],
                      parts["colls"]["comm"] - base["comm"],
                      parts["hops"]["comm"] - base["comm"]])
        names.append(f"{cfg.name} x{n} batch {r['batch']}")
        ms.append(r["step_ms"] * 1e-3)
    t, y = np.array(terms), np.array(ms)
    out = []
    for fixed in (efficiency, None):
        lhs = t[:, 2:] if fixed else np.column_stack([t[:, 0], t[:, 2:]])
        rhs = y - t[:, 1] - (t[:, 0] / fixed if fixed else 0)
        x, *_ = np.linalg.lstsq(lhs / y[:, None], rhs / y, rcond=None)
        eff, (o, c, h) = (fixed, x) if fixed else (1 / x[0], x[1:])
        est = t[:, 0] / eff + t[:, 1] + t[:, 2:] @ np.array([o, c, h])
        out.append(f"bandwidth_efficiency={eff:.3f}{' (held)' if fixed else ''} "
                   f"layer_overhead={o * 1e6:.1f}us collective_latency={c * 1e6:.1f}us "
                   f"hop_latency={h * 1e6:.1f}us: mean |error| "
                   f"{np.mean(np.abs(est / y - 1)):.1%}")
        out += [f"  {name:<24} measured {m * 1e3:8.3f} ms  fitted {e * 1e3:8.3f} ms"
                for name, m, e in zip(names, y, est, strict=True)]
    return "\n".join(out)


def calibration() -> tuple[list[str], pd.DataFrame]:
    """The planner's estimates next to measured H200 rows (same model code, same shapes)."""
    rows = []
    for r, cfg, n in measured_rows():
        c = planned(r, cfg, n)
        step = r.get("step_ms") if r["new_tokens"] else None
        rows.append({"model": cfg.name, "GPUs": n, "plan": c.plan.name, "batch": r["batch"],
                     "prompt": r["prompt"], "prefill_ms": r.get("prefill_ms"),
                     "est_prefill_ms": c.prefill * 1e3, "decode_ms": step,
                     "est_decode_ms": c.decode * 1e3 if step else None,
                     "est/measured decode": c.decode * 1e3 / step if step else None})
    df = pd.DataFrame(rows)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if x is None or x != x else
                                        f"{x:.2f}" if isinstance(x, float) else str(x)
                                        for x in row) + " |")
    return lines, df


def machine() -> str:
    import jax

    return (f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, jax {jax.__version__}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="run only cases whose name contains this text (and skip "
                                   "the comparison with measured GPU rows)")
    ap.add_argument("--out", default=None, help="output path without suffix (default: "
                                                "results/plans or results/plans_8gpu)")
    ap.add_argument("--cases", choices=["named", "8gpu"], default="named",
                    help="named: the planner issue's clusters; 8gpu: the machines of the "
                         "OPT-175B-on-8-GPUs issue")
    ap.add_argument("--fit", action="store_true",
                    help="print least-squares decode constants for the measured rows (see "
                         "optkit.parallel.planner.CostModel) and exit")
    args = ap.parse_args()
    if args.fit:
        print(fit())
        return 0
    cases = CASES if args.cases == "named" else CASES_8GPU
    args.out = args.out or str(OUT / ("plans" if args.cases == "named" else "plans_8gpu"))
    out = Path(args.out)
    title = ("Automatic plans for named clusters" if args.cases == "named" else
             "Planner predictions for the 8-GPU machines (made before any run on them)")
    md = [f"# {title}\n",
          f"Generated by `python benchmarks/plans.py --cases {args.cases}` on {machine()}, "
          f"{time.strftime('%Y-%m-%d')}. Each section is one `optkit plan` command and its "
          f"output. Described clusters are compiled on that many fake CPU devices with no "
          f"weights allocated; stages deeper than 2 layers are compiled with 1 and 2 layers "
          f"and extrapolated linearly. *mem/dev* is XLA's compiled per-device peak (arguments "
          f"+ outputs - aliased + temporaries, worst stage), *analytic* the weights + KV cache "
          f"per device from shapes; times are roofline estimates (see "
          f"`optkit/parallel/planner.py`), except where measured.\n"]
    frames = []
    for name, cli, env in cases:
        if args.only and args.only not in name:
            continue
        csv = out.parent / "_plans_case.csv"
        cmd = [sys.executable, "-m", "optkit.cli", "plan", *shlex.split(cli), "--csv", str(csv)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **env})
        wall = time.perf_counter() - t0
        print(f"{name}: exit {proc.returncode}, {wall:.0f} s", file=sys.stderr)
        shown = " ".join(f"{k}={v}" for k, v in env.items())
        text = proc.stdout.split("\n# wrote")[0]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("optkit plan")
                  or line.startswith("# assuming")]
        md += [f"## {name}\n", "```", f"$ {shown + ' ' if shown else ''}optkit plan {cli}",
               text.rstrip(), *errors, f"# exit status {proc.returncode}, {wall:.0f} s", "```\n"]
        if proc.returncode not in (0, 1):
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        if csv.exists():
            df = pd.read_csv(csv)
            df.insert(0, "case", name)
            frames.append(df)
            csv.unlink()
    if not args.only and args.cases == "named":
        table, _ = calibration()
        md += ["## Estimates against measured GPU decode\n",
               "The roofline's constants (`CostModel` in `optkit/parallel/planner.py`) against "
               "optkit's own measurements on H200 (`" + "`, `".join(MEASURED) + "`, "
               "`benchmarks/gpu_decode.py`, prompt 128 + 128 new tokens, fp16): the same plan "
               "(one card, or tensor parallel over two) planned for a described H200 cluster. "
               "Decode is per step; prefill is the whole prompt.\n", *table, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text("\n".join(md))
    if frames:
        buf = io.StringIO()
        pd.concat(frames).to_csv(buf, index=False)
        Path(f"{out}.csv").write_text(buf.getvalue())
    print(f"wrote {out}.md and {out}.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
