"""Tables of the GPU benchmark rows (benchmarks/gpu_decode.py output) against the issue's targets.

    cd benchmarks && python summarize_gpu.py results/gpu/*.jsonl > results/gpu/summary.md
    python summarize_gpu.py --planned results/gpu/gpu_4card_h200x4.jsonl \
        results/gpu/planned_h200x2.jsonl --plans results/plans_8gpu.csv \
        --plans results/plans.csv > results/gpu/planned_h200.md

Two bandwidth floors are shown: the run's own measured read bandwidth (best of JAX and torch
read-only reductions) and 4.37 TB/s, the read-only reduction bandwidth DESIGN.md records for
this card (H200) — the same-run measurement reads low (a 30b decode step "beat" it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from optkit.config import OPTConfig  # noqa: E402

DESIGN_READ_GBPS = 4370.0


def floor_ms(r: dict, gbps: float) -> float:
    cfg = OPTConfig.from_name("opt-" + r["size"])
    weights = r.get("weight_bytes", cfg.num_params() * 2)
    live = r["prompt"] + r["new_tokens"] / 2
    kv = 2 * cfg.num_hidden_layers * r["batch"] * live * cfg.hidden_size * 2
    return (weights + kv) / r.get("devices", 1) / (gbps * 1e9) * 1e3


def main(paths: list[str]) -> None:
    rows = [json.loads(x) for p in paths for x in open(p) if x.strip()]
    rows = [r for r in rows if r.get("variant", "default") == "default"]
    decode = [r for r in rows if r.get("new_tokens")]
    step = defaultdict(list)
    for r in decode:
        step[(r["framework"], r.get("devices", 1), r["size"], r["batch"])].append(r["step_ms"])
    med = {k: sorted(v)[len(v) // 2] for k, v in step.items()}
    card = rows[0]["card"]
    print(f"## Decode, prompt 128 + 128 new tokens, greedy, fp16 ({card})\n")
    print("| framework | GPUs | size | batch | step ms | tokens/s | floor (run) % | "
          "floor (4.37 TB/s) % | vs HF static+compile | vs HF eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    seen = set()
    for r in decode:
        key = (r["framework"], r.get("devices", 1), r["size"], r["batch"])
        if key in seen:
            continue
        seen.add(key)
        ms = med[key]
        f_run = floor_ms(r, r["ceilings"]["read_GBps"]) / ms * 100
        f_design = floor_ms(r, DESIGN_READ_GBPS) / ms * 100
        ratios = []
        for base in ("hf-static-compile", "hf-eager"):
            b = med.get((base, 1, r["size"], r["batch"]))
            ratios.append(f"{b / ms:.2f}x" if b and r["framework"].startswith("optkit") else "")
        print(f"| {r['framework']} | {key[1]} | {r['size']} | {r['batch']} | {ms:.2f} | "
              f"{r['batch'] / ms * 1e3:.0f} | {f_run:.0f} | {f_design:.0f} | {ratios[0]} | "
              f"{ratios[1]} |")
    section("Prefill of 2048 tokens, batch 1",
            ["framework", "size", "ms", "TFLOP/s", "fraction of measured matmul rate"],
            [[r["framework"], r["size"], f"{r['prefill_ms']:.1f}", f"{r['prefill_TFLOPs']:.0f}",
              f"{r['mfu_vs_measured'] * 100:.0f}%"]
             for r in rows if r.get("new_tokens") == 0 and "prefill_TFLOPs" in r])
    section("int8 weight-only vs fp16 logits (random weights)",
            ["size", "rel. L2 error", "max abs diff", "top-1 agreement", "mean KL"],
            [[r["size"], f"{r['rel_l2']:.4f}", f"{r['max_abs_diff']:.3f}",
              f"{r['top1_agree'] * 100:.1f}%", f"{r['mean_kl']:.2e}"]
             for r in rows if r["framework"] == "int8-accuracy"])


def section(title: str, header: list[str], cells: list[list[str]]) -> None:
    """A markdown table under a heading; nothing when there are no rows."""
    if not cells:
        return
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in cells:
        print("| " + " | ".join(line) + " |")


def predictions(csv_paths: list[str] | None) -> dict:
    """The chosen plan's estimates per (size, GPUs, batch, prompt, quantize) from
    ``benchmarks/plans.py`` output (an ``optkit plan`` case per row group, made on CPU
    before any GPU run); only cases named with their workload (``prompt 128 + 128``,
    ``prefill of 2048 tokens``) are used."""
    import pandas as pd

    out = {}
    for path in csv_paths or []:
        df = pd.read_csv(path)
        for _, r in df[df.status == "chosen"].iterrows():
            m = re.match(r"opt-(\S+)\b.*? on (\d+) x (\S+)", r.case)
            b = re.search(r"batch (\d+)", r.case)
            prompt = re.search(r"prompt (\d+) \+ \d+|prefill of (\d+) tokens", r.case)
            if not (m and prompt):
                continue
            quantize = r.get("quantize")
            key = (m[1], int(m[2]), int(b[1]) if b else 1, int(prompt[1] or prompt[2]),
                   quantize if isinstance(quantize, str) else None)
            out[key] = {"card": m[3], "plan": r.plan, "prefill_ms": r.prefill_ms,
                        "decode_ms": r.decode_ms, "mem": r.memory_gib}
    return out


def fmt(x: float, spec: str) -> str:
    return "–" if x != x else format(x, spec)


def planned_table(rows: list[dict], before: dict) -> None:
    """Measured rows of ``gpu_decode.py --plan auto`` against the planner's predictions."""
    card = rows[0]["card"]
    print(f"## The automatic planner's plan, measured ({card}, jax {rows[0]['jax']})\n")
    print("*before*: `optkit plan` on fake CPU devices for the described machine, before any "
          "run (`results/plans_8gpu.md`, `results/plans.md`); *on GPUs*: the planner on the "
          "real cards just before the run (its prefill estimates too low: XLA:GPU counted no "
          "GEMM flops, see `benchmarks/README.md`); *peak*: the "
          "largest `peak_bytes_in_use` of the cards so far in the process (rows run in "
          "order), *weights*: `bytes_in_use` after "
          "loading.\n")
    print("| size | GPUs | plan | batch | prompt | measured ms | before ms | on GPUs ms | "
          "tokens/s | floor % | weights GiB | peak GiB | before GiB | on GPUs GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        if "plan" not in r:
            continue
        decode = bool(r.get("new_tokens"))
        ms = r["step_ms"] if decode else r["prefill_ms"]
        quantize = "int8" if r["framework"].endswith("int8") else None
        pre = before.get((r["size"], r["devices"], r["batch"], r["prompt"], quantize), {})
        same_card = pre and pre["card"].split("-")[0] in r["card"]
        if not same_card or pre["plan"] != r["plan"]:
            pre = {}
        b_ms = pre.get("decode_ms" if decode else "prefill_ms", nan)
        g_ms = r["predicted_step_ms" if decode else "predicted_prefill_ms"]
        what = "decode" if decode else "prefill"
        tps = f"{r['batch'] / ms * 1e3:.1f}" if decode else ""
        floor = f"{r['frac_floor'] * 100:.0f}" if decode else \
            f"MFU {r['mfu_vs_measured'] * 100:.0f}"
        size = r["size"] + (" int8" if quantize else "")
        print(f"| {size} | {r['devices']} | {r['plan']} | {r['batch']} | "
              f"{r['prompt']} ({what}) | {ms:.2f} | {fmt(b_ms, '.2f')} | {g_ms:.2f} | {tps} | "
              f"{floor} | {max(r['resident_GiB']):.1f} | {max(r['peak_GiB']):.1f} | "
              f"{fmt(pre.get('mem', nan), '.1f')} | {r['predicted_mem_GiB']:.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", help="gpu_decode.py JSONL files")
    ap.add_argument("--planned", action="store_true",
                    help="the planned-vs-measured table of --plan auto rows")
    ap.add_argument("--plans", action="append",
                    help="benchmarks/plans.py CSV with the predictions made before (repeatable)")
    a = ap.parse_args()
    if a.planned:
        planned_table([json.loads(x) for p in a.rows for x in open(p) if x.strip()],
                      predictions(a.plans))
    else:
        main(a.rows)
