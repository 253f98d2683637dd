"""Plots from result rows: the right lines, labels and files."""

import pandas as pd
import pytest

from optkit.bench.plots import (
    plot_decode,
    plot_load,
    plot_roofline,
    plot_serving,
    plot_speedup,
    plot_strategies,
    plot_throughput,
    save,
    sweep_plots,
)


def sweep_rows(baseline=True):
    rows = []
    for backend in ("jax", "facebook"):
        for bs in (1, 2, 4):
            tps = 100.0 * bs * (2 if backend == "jax" else 1)
            rows.append({
                "cfg_id": f"{backend}{bs}", "model_name": f"{backend}/opt-tiny",
                "backend": backend, "batch_size": bs, "prompt_len": 8, "new_tokens": 8,
                "tokens_per_s": tps, "decode_step_ms": 1e3 * bs / tps,
                "step_gflop": 0.01 * bs, "step_gbyte": 0.05, "tflops": 0.001 * bs,
                "peak_tflops": 0.05, "peak_gbyte_per_s": 10.0,
                "roofline_fraction": 0.1 * bs, "jax_device": "cpu:cpu", "cpu_count": 2,
                "error": None,
                "baseline_id": f"facebook{bs}" if baseline else None,
                "speedup": tps / (100.0 * bs) if baseline else None})
    rows.append({**rows[0], "cfg_id": "bad", "batch_size": 64, "error": "OOM"})
    return pd.DataFrame(rows)


def test_throughput_lines_per_setting(tmp_path):
    fig = plot_throughput(sweep_rows())
    ax = fig.axes[0]
    assert sorted(line.get_label() for line in ax.lines) == ["facebook/opt-tiny",
                                                             "jax/opt-tiny"]
    jax = next(line for line in ax.lines if line.get_label() == "jax/opt-tiny")
    assert list(jax.get_xdata()) == [1, 2, 4]  # the failed row is left out
    assert list(jax.get_ydata()) == [200.0, 400.0, 800.0]
    path = tmp_path / "t" / "throughput.png"
    assert save(fig, path) is fig and path.read_bytes()[:4] == b"\x89PNG"
    assert fig._repr_png_()[:4] == b"\x89PNG"  # shows itself in Jupyter


def test_speedup_roofline_and_sweep_plots(tmp_path):
    df = sweep_rows()
    bars = plot_speedup(df).axes[0].patches
    assert sorted(round(b.get_height(), 6) for b in bars) == [2.0, 2.0, 2.0]  # jax only
    fig = plot_roofline(df)
    fractions = fig.axes[1].lines[0].get_ydata()
    assert list(fractions) == pytest.approx([0.1, 0.2, 0.4])
    assert set(sweep_plots(df, tmp_path)) == {"throughput", "roofline", "speedup"}
    no_base = sweep_rows(baseline=False)
    assert set(sweep_plots(no_base, tmp_path / "b")) == {"throughput", "roofline"}
    with pytest.raises(ValueError, match="baseline"):
        plot_speedup(no_base)
    with pytest.raises(ValueError, match="no rows"):
        plot_throughput(pd.DataFrame())


def test_load_percentiles_vs_rate(tmp_path):
    rows = []
    for rate in (1.0, 2.0, 4.0):
        row = {"rate": rate, "num_requests": 10, "prompt_len": "8", "output_len": "8",
               "burstiness": 1.0, "served_model": "fake", "slo_ttft_ms": 100.0,
               "request_throughput": rate * 0.9, "goodput": rate * 0.5,
               "output_token_throughput": 8 * rate, "total_token_throughput": 16 * rate}
        for m in ("ttft", "tpot", "itl", "e2e"):
            row.update({f"{m}_mean_ms": rate, f"{m}_p50_ms": rate, f"{m}_p90_ms": 2 * rate,
                        f"{m}_p99_ms": 3 * rate})
        rows.append(row)
    path = tmp_path / "load.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    fig = plot_load(path)  # from the file
    ttft = fig.axes[0]
    assert [line.get_label() for line in ttft.lines] == ["mean", "p50", "p90", "p99"]
    assert list(ttft.lines[3].get_ydata()) == [3.0, 6.0, 12.0]
    assert "TTFT ≤ 100 ms" in fig._suptitle.get_text()


def test_strategies_bars():
    df = pd.DataFrame({"plan": ["dp1-tp1-pp1", "dp1-tp2-pp1"], "memory_gib": [2.0, 1.0],
                       "decode_ms": [10.0, 6.0], "measured_ms": [11.0, 7.0]})
    fig = plot_strategies(df, time=["decode_ms", "measured_ms"])
    mem, step = fig.axes
    assert [b.get_width() for b in mem.patches] == [2.0, 1.0]
    assert sorted(b.get_width() for b in step.patches) == [6.0, 7.0, 10.0, 11.0]
    assert [t.get_text() for t in mem.get_yticklabels()] == ["dp1-tp1-pp1", "dp1-tp2-pp1"]
    with pytest.raises(ValueError, match="column 'nope'"):
        plot_strategies(df, memory="nope")


def decode_rows():
    rows = []
    for model, floor in (("opt-1.3b", 0.6), ("opt-6.7b", 3.2)):
        for bs in (1, 16, 64):
            rows.append({"framework": "optkit", "model": model, "batch_size": bs,
                         "decode_step_ms": floor * 1.2 + bs / 100, "floor_ms": floor + bs / 200})
            if bs > 1:
                rows.append({"framework": "hf-static-compile", "model": model, "batch_size": bs,
                             "decode_step_ms": floor * 2, "floor_ms": None})
    return pd.DataFrame(rows)


def test_decode_panels_per_model_with_the_floor(tmp_path):
    fig = plot_decode(decode_rows())
    assert [ax.get_title() for ax in fig.axes] == ["opt-1.3b", "opt-6.7b"]
    labels = [line.get_label() for line in fig.axes[1].lines]
    assert labels == ["optkit", "hf-static-compile", "bandwidth floor"]
    floor = fig.axes[1].lines[-1]
    assert list(floor.get_xdata()) == [1, 16, 64]
    assert list(floor.get_ydata()) == pytest.approx([3.205, 3.28, 3.52])
    save(fig, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 5000


def test_decode_floor_of_the_panels_first_line_without_optkit():
    df = decode_rows()
    df = df[df["framework"] != "optkit"].assign(floor_ms=1.0)
    assert [line.get_label() for line in plot_decode(df).axes[0].lines] == [
        "hf-static-compile", "bandwidth floor"]


def test_serving_lines_per_mode():
    df = pd.DataFrame([{"mode": m, "rate": r, "tokens_per_s": r * k}
                       for m, k in (("static-4", 10), ("continuous-16", 30)) for r in (1, 2, 4)])
    ax = plot_serving(df).axes[0]
    assert [line.get_label() for line in ax.lines] == ["static-4", "continuous-16"]
    assert list(ax.lines[1].get_ydata()) == [30, 60, 120]
