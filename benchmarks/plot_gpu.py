"""The GPU figures and tables, drawn from committed result rows.

Decode rows (``benchmarks/gpu_decode.py``): decode ms per step vs batch size against the
bandwidth floor, a panel per model, a line per framework (optkit, HF eager, HF
static-cache + ``torch.compile``), and with ``--table`` the same rows as a markdown table
with each HF framework's step time over optkit's.  Serving rows (``--serving``): throughput
vs offered load, a line per engine or mode (``optkit.bench.plot_serving``).

    python benchmarks/plot_gpu.py benchmarks/results/gpu/large_batch_h200.jsonl \\
        --out benchmarks/results/gpu/decode_h200.png --table
    python benchmarks/plot_gpu.py --serving benchmarks/results/serve_batching.jsonl \\
        --x rate --y tokens_per_s --by mode --out build/serving.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optkit.bench import plot_decode, plot_serving, read_rows, save  # noqa: E402

#: Columns of rows written before gpu_decode.py measured through ``run_benchmark``.
LEGACY = {"batch": "batch_size", "step_ms": "decode_step_ms", "devices": "num_devices"}


def decode_rows(*paths):
    """Decode rows of one or more files as one DataFrame with the columns ``framework``,
    ``model``, ``batch_size``, ``num_devices``, ``decode_step_ms``, ``floor_ms``; rows without
    a decode step (prefill-only) and non-default ``variant`` rows are left out."""
    import pandas as pd

    frames = []
    for path in paths:
        df = read_rows(path).rename(columns=LEGACY)
        if "model" not in df or df["model"].isna().all():
            df["model"] = "opt-" + df["size"].astype(str)
        if "variant" in df:
            df = df[df["variant"].fillna("default") == "default"]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["num_devices"] = df.get("num_devices", 1)
    df["num_devices"] = df["num_devices"].fillna(1).astype(int)
    df = df.dropna(subset=["decode_step_ms"])
    many = df["num_devices"] > 1
    df.loc[many, "model"] = df.loc[many, "model"] + " on " + \
        df.loc[many, "num_devices"].astype(str) + " GPUs"
    return df


def decode_table(df) -> str:
    """Markdown: per model and batch, optkit's step time (its int8 model's where only that
    ran), its bandwidth floor and the fraction of it reached, then each HF framework's step
    time and optkit's speed-up over it (HF's time / optkit's)."""
    hf = [f for f in dict.fromkeys(df["framework"]) if f.startswith("hf-")]
    head = ["model", "batch", "optkit", "ms a step", "floor ms", "% of floor"]
    for f in hf:
        head += [f"{f} ms", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    ours = df[~df["framework"].isin(hf)]
    for (model, batch), g in ours.groupby(["model", "batch_size"], sort=False):
        r = g.sort_values("framework").iloc[0]  # optkit before optkit-int8
        ms = r["decode_step_ms"]
        cells = [model, str(batch), r["framework"], f"{ms:.2f}", f"{r['floor_ms']:.2f}",
                 f"{100 * r['floor_ms'] / ms:.0f}"]
        for f in hf:
            o = df[(df["framework"] == f) & (df["model"] == model) & (df["batch_size"] == batch)]
            theirs = o.iloc[0]["decode_step_ms"] if len(o) else None
            cells += ["", ""] if theirs is None else [f"{theirs:.2f}", f"{theirs / ms:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="*", help="decode rows (.jsonl / .csv) from gpu_decode.py")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="", help="a title above the figure")
    p.add_argument("--table", action="store_true", help="also print a markdown table")
    p.add_argument("--serving", help="serving rows instead of decode rows")
    p.add_argument("--x", default="rate", help="serving: the x column (offered load)")
    p.add_argument("--y", default="tokens_per_s", help="serving: the y column")
    p.add_argument("--by", default="mode", help="serving: one line per value of this column")
    args = p.parse_args(argv)
    if args.serving:
        fig = plot_serving(args.serving, x=args.x, y=args.y, by=args.by)
    elif args.rows:
        df = decode_rows(*args.rows)
        fig = plot_decode(df)
        if args.table:
            print(decode_table(df))
    else:
        p.error("give decode rows or --serving ROWS")
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    save(fig, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
