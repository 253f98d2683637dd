"""Plots of results files (matplotlib figures without pyplot state: they work headless and
display in Jupyter as a cell's value).

* :func:`plot_throughput` — generated tokens/s and decode time per step vs batch size, one
  line per setting (backend, plan, dtype ... whatever varies in the sweep);
* :func:`plot_speedup` — each row's ratio to its same-run baseline;
* :func:`plot_roofline` — decode steps on the device's roofline, and the fraction reached;
* :func:`plot_load` — TTFT / TPOT / ITL / E2E percentiles and throughput vs request rate;
* :func:`plot_strategies` — memory per device and step time per parallel plan;
* :func:`plot_decode` — decode step time vs batch size against the bandwidth floor, a panel
  per model and a line per framework (``benchmarks/gpu_decode.py`` rows);
* :func:`plot_serving` — throughput vs offered load, a line per engine or mode.

Every function takes a DataFrame (or a path to a ``.csv`` / ``.jsonl`` results file);
:func:`save` writes a PNG and returns the figure.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure


class ReportFigure(Figure):
    """A ``Figure`` that shows itself as a PNG in any Jupyter front end (it needs no pyplot
    or inline backend)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


#: Columns that tell sweep settings apart (the legend shows those that vary).
SETTING_COLUMNS = ("model_name", "resolved_plan", "plan", "resolved_dtype", "prompt_len",
                   "new_tokens", "steps_per_dispatch", "do_sample", "label")


def _frame(data):
    import pandas as pd

    from optkit.bench.results import read_rows

    if isinstance(data, str | os.PathLike):
        data = read_rows(data)
    df = pd.DataFrame(data).copy()
    if df.empty:
        raise ValueError("no rows to plot")
    if "error" in df:
        df = df[df["error"].isna() | (df["error"] == "")]
        if df.empty:
            raise ValueError("every row has an error; nothing to plot")
    return df


def _settings(df, columns: Sequence[str] = SETTING_COLUMNS) -> list[str]:
    """The setting columns whose values differ between rows (at least the model)."""
    present = [c for c in columns if c in df and df[c].astype(str).nunique() > 1]
    if "resolved_plan" in present and "plan" in present:
        present.remove("plan")
    return present or [c for c in ("model_name",) if c in df]


def _label(keys, names) -> str:
    keys = keys if isinstance(keys, tuple) else (keys,)
    parts = []
    for n, k in zip(names, keys, strict=True):
        if k is None or k != k or k == "":
            continue
        parts.append(str(k) if n in ("model_name", "label", "resolved_plan", "plan",
                                     "resolved_dtype") else f"{n}={k}")
    return " ".join(parts) or "-"


def _title(df) -> str:
    """The device the rows ran on: the GPU's name, or the CPU model and its core count."""
    row = df.iloc[0]
    dev = str(row.get("torch_device") if row.get("backend") == "facebook"
              else row.get("jax_device") or "")
    if dev.startswith("cpu") and isinstance(row.get("cpu"), str):
        return f"{row['cpu']} ({row.get('cpu_count')} CPUs)"
    return dev.split(":", 1)[-1]


def save(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Figure:
    """Write ``fig`` as a PNG (parents created); returns it for display."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def plot_throughput(data, x: str = "batch_size") -> Figure:
    """Tokens/s and decode ms/step vs ``x`` (default batch size), a line per setting."""
    df = _frame(data).sort_values(x)
    names = _settings(df)
    fig = ReportFigure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for keys, g in df.groupby(names, dropna=False, sort=False):
        lab = _label(keys, names)
        ax1.plot(g[x], g["tokens_per_s"], "o-", label=lab)
        ax2.plot(g[x], g["decode_step_ms"], "o-", label=lab)
    ax1.set(xlabel=x.replace("_", " "), ylabel="generated tokens / s",
            title="Throughput")
    ax2.set(xlabel=x.replace("_", " "), ylabel="ms per decode step",
            title="Decode step time")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(df[x].unique()), [str(v) for v in sorted(df[x].unique())])
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    r = df.iloc[0]
    fig.suptitle(f"{r['prompt_len']} prompt + {r['new_tokens']} generated tokens per row; "
                 f"{_title(df)}", fontsize=10)
    return fig


def plot_speedup(data, x: str = "batch_size") -> Figure:
    """Each setting's tokens/s over its same-run baseline's (``speedup`` column)."""
    df = _frame(data).sort_values(x)
    if "speedup" not in df or df["speedup"].isna().all():
        raise ValueError("no speedup column: run the sweep with a baseline")
    df = df[df["baseline_id"] != df["cfg_id"]] if "baseline_id" in df else df
    names = _settings(df)
    fig = ReportFigure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    groups = list(df.groupby(names, dropna=False, sort=False))
    xs = sorted(df[x].unique())
    width = 0.8 / max(len(groups), 1)
    for i, (keys, g) in enumerate(groups):
        pos = [xs.index(v) + (i - (len(groups) - 1) / 2) * width for v in g[x]]
        ax.bar(pos, g["speedup"], width, label=_label(keys, names))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set(xlabel=x.replace("_", " "), ylabel="tokens/s ÷ baseline's", title="Speed-up over "
           "the same-run baseline")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def plot_roofline(data) -> Figure:
    """Left: each decode step's achieved FLOP/s against its arithmetic intensity under the
    device's measured ceilings; right: the fraction of the roofline bound reached."""
    import numpy as np

    df = _frame(data)
    df = df[df["roofline_fraction"].notna()] if "roofline_fraction" in df else df.iloc[:0]
    if df.empty:
        raise ValueError("no roofline columns: run the benchmark with peaks")
    names = _settings(df)
    fig = ReportFigure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ai = df["step_gflop"] / df["step_gbyte"]
    peak_f, peak_b = df["peak_tflops"].median(), df["peak_gbyte_per_s"].median()
    xs = np.geomspace(min(ai.min() / 2, 0.1), max(ai.max() * 4, 4 * peak_f * 1e3 / peak_b),
                      200)
    ax1.plot(xs, np.minimum(peak_f, xs * peak_b / 1e3), "k-", lw=1.2,
             label=f"roofline ({peak_b:.0f} GB/s, {peak_f:.2f} TFLOP/s)")
    for keys, g in df.groupby(names, dropna=False, sort=False):
        lab = _label(keys, names)
        line, = ax1.plot(g["step_gflop"] / g["step_gbyte"], g["tflops"], "o", label=lab)
        for _, r in g.iterrows():
            ax1.annotate(f"b{r['batch_size']}", (r["step_gflop"] / r["step_gbyte"],
                                                 r["tflops"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
        ax2.plot(g["batch_size"], g["roofline_fraction"], "o-", color=line.get_color(),
                 label=lab)
    ax1.set(xscale="log", yscale="log", xlabel="FLOP per byte read (decode step)",
            ylabel="achieved TFLOP/s", title="Decode on the roofline")
    ax2.set(xlabel="batch size", ylabel="fraction of the roofline bound",
            title="Roofline fraction", ylim=(0, max(1.05, df["roofline_fraction"].max() * 1.1)))
    ax2.set_xscale("log", base=2)
    bs = sorted(df["batch_size"].unique())
    ax2.set_xticks(bs, [str(v) for v in bs])
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"peaks measured on {_title(df)} (read-only reduction, matmul)", fontsize=10)
    return fig


LOAD_METRICS = (("ttft", "time to first token"), ("tpot", "time per output token"),
                ("itl", "inter-token latency"), ("e2e", "end-to-end latency"))


def plot_load(data, x: str = "rate", percentiles: Sequence[int] = (50, 90, 99)) -> Figure:
    """Latency percentiles (TTFT, TPOT, ITL, E2E) and achieved throughput / goodput vs the
    offered request rate (``x="concurrency"`` for closed-loop runs)."""
    df = _frame(data).sort_values(x)
    fig = ReportFigure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (m, title) in zip(axes, LOAD_METRICS, strict=False):
        ax.plot(df[x], df[f"{m}_mean_ms"], "k--", lw=1, label="mean")
        for p in percentiles:
            ax.plot(df[x], df[f"{m}_p{p}_ms"], "o-", label=f"p{p}")
        ax.set(title=title, ylabel="ms")
    ax = axes[4]
    ax.plot(df[x], df["request_throughput"], "o-", label="completed")
    ax.plot(df[x], df["goodput"], "s-", label="goodput (within SLOs)")
    if x == "rate":
        ax.plot(df[x], df[x], "k:", lw=1, label="offered")
    ax.set(title="requests / s", ylabel="req/s")
    ax = axes[5]
    ax.plot(df[x], df["output_token_throughput"], "o-", label="output tokens")
    ax.plot(df[x], df["total_token_throughput"], "s-", label="prompt + output")
    ax.set(title="tokens / s", ylabel="tokens/s")
    for ax in axes:
        ax.set_xlabel("offered request rate (req/s)" if x == "rate" else x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    r = df.iloc[0]
    slos = ", ".join(f"{k[4:-3].upper()} ≤ {r[k]:g} ms" for k in
                     ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms") if k in r and r[k] == r[k]
                     and r[k] is not None)
    fig.suptitle(f"{r.get('served_model') or r.get('model')}: {r['num_requests']} requests "
                 f"per point, prompt {r['prompt_len']}, output {r['output_len']} tokens, "
                 f"burstiness {r['burstiness']:g}" + (f"; SLOs {slos}" if slos else ""),
                 fontsize=10)
    return fig


def plot_strategies(data, label: str = "plan", memory: str | Sequence[str] = "memory_gib",
                    time: str | Sequence[str] = "decode_ms", title: str = "") -> Figure:
    """Bars per parallel plan: memory per device (GiB) and step time (ms).  ``memory`` and
    ``time`` name one or more columns each (e.g. predicted and measured)."""
    df = _frame(data).reset_index(drop=True)
    memory = [memory] if isinstance(memory, str) else list(memory)
    time = [time] if isinstance(time, str) else list(time)
    fig = ReportFigure(figsize=(11, max(3.0, 0.35 * len(df) + 1.5)), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    ys = list(range(len(df)))
    for ax, cols, unit in ((ax1, memory, "GiB per device"), (ax2, time, "ms")):
        h = 0.8 / len(cols)
        for j, c in enumerate(cols):
            if c not in df:
                raise ValueError(f"column {c!r} not in the data; columns: {list(df)}")
            ax.barh([y + (j - (len(cols) - 1) / 2) * h for y in ys], df[c].astype(float), h,
                    label=c)
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3, axis="x")
        if len(cols) > 1:
            ax.legend(fontsize=8)
    ax1.set_yticks(ys, [str(v) for v in df[label]])
    ax1.invert_yaxis()
    ax1.set_title("Memory per device")
    ax2.set_title("Step time")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def sweep_plots(data, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``throughput.png``, ``roofline.png`` and (with a baseline) ``speedup.png``."""
    out = Path(out_dir)
    paths = {}
    for name, fn in (("throughput", plot_throughput), ("roofline", plot_roofline),
                     ("speedup", plot_speedup)):
        try:
            fig = fn(data)
        except ValueError:
            continue
        save(fig, out / f"{name}.png")
        paths[name] = out / f"{name}.png"
    return paths


def plot_decode(data, by: str = "framework", floor_of: str = "optkit") -> Figure:
    """Decode ms per step vs batch size, one panel per ``model``, a line per ``by`` value, and
    the step's bandwidth floor (``floor_ms`` of the ``floor_of`` rows, else of the panel's
    first line: weights and live KV cache read once at the measured read bandwidth) dashed.
    Columns: ``model``, ``batch_size``, ``decode_step_ms``, ``floor_ms``, ``by``."""
    df = _frame(data).dropna(subset=["decode_step_ms"]).sort_values("batch_size")
    models = list(dict.fromkeys(df["model"]))
    fig = ReportFigure(figsize=(4.2 * len(models), 3.8), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        g = df[df["model"] == model]
        for name, h in g.groupby(by, sort=False):
            ax.plot(h["batch_size"], h["decode_step_ms"], "o-", label=str(name))
        ref = g[g[by] == (floor_of if floor_of in set(g[by]) else g[by].iloc[0])]
        if "floor_ms" in ref and ref["floor_ms"].notna().any():
            f = ref.dropna(subset=["floor_ms"]).drop_duplicates("batch_size")
            ax.plot(f["batch_size"], f["floor_ms"], "k--", lw=1, label="bandwidth floor")
        ticks = sorted(g["batch_size"].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_ylim(bottom=0)
        ax.set(title=str(model), xlabel="batch size", ylabel="ms per decode step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_serving(data, x: str = "rate", y: str = "tokens_per_s", by: str = "mode") -> Figure:
    """``y`` (default generated tokens/s) vs ``x`` (default offered requests/s), a line per
    ``by`` value (an engine, a batching mode)."""
    df = _frame(data).sort_values(x)
    fig = ReportFigure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, g in df.groupby(by, sort=False):
        ax.plot(g[x], g[y], "o-", label=str(name))
    ax.set(xlabel=x.replace("_", " "), ylabel=y.replace("_", " "))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
