"""Benchmarks, sweeps, serving load tests, plots and reports.

* ``core``    — :func:`run_benchmark` ``(cfg) -> row``: one generation benchmark
  (:class:`BenchConfig`), models cached across configs (:class:`ModelCache`), and the one
  timed ``generate`` call every benchmark is made of (:func:`timed_generate`);
* ``roofline`` — the FLOP/byte model of a decode step and of a generation, and the device's
  measured peaks (:func:`decode_step_cost`, :func:`generation_flops`, :func:`device_peaks`);
* ``sweep``   — :func:`grid`, :func:`load_sweep` (YAML), :func:`run_sweep` (rows appended as
  they finish, resumable, each compared with its same-run baseline);
* ``loadgen`` — :func:`run_load` / :func:`run_load_sweep`: Poisson / bursty / closed-loop
  streaming requests against any OpenAI-compatible server (TTFT, TPOT, ITL, E2E, goodput);
* ``results`` — :func:`append_rows` / :func:`read_rows` for ``.csv`` and ``.jsonl`` files;
* ``plots``   — throughput, speed-up, roofline, load percentiles, parallel strategies;
* ``report``  — run the notebooks with papermill, render HTML (:func:`make_report`);
* ``textgen`` — backends side by side on built-in prompts (``optkit bench textgen``);
* ``trace``   — where a device's time goes: kernel time by kind from a JAX profiler trace.

CLI: ``optkit bench sweep | load | report | textgen``.
"""

from optkit.bench.core import BenchConfig, ModelCache, cfg_id, run_benchmark, timed_generate
from optkit.bench.loadgen import Lengths, LoadConfig, arrival_times, run_load, run_load_sweep
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
from optkit.bench.report import describe_run, make_report, notebook_html, run_notebook
from optkit.bench.results import append_rows, read_rows
from optkit.bench.roofline import decode_step_cost, device_peaks, generation_flops
from optkit.bench.sweep import Sweep, grid, load_sweep, run_sweep
from optkit.bench.textgen import (
    PROMPTS,
    TextgenConfig,
    run_textgen,
    summarize,
    summary_markdown,
)

__all__ = [
    "PROMPTS", "BenchConfig", "Lengths", "LoadConfig", "ModelCache", "Sweep", "TextgenConfig",
    "append_rows", "arrival_times", "cfg_id", "describe_run", "decode_step_cost", "device_peaks",
    "generation_flops", "grid",
    "load_sweep", "make_report", "notebook_html", "plot_decode", "plot_load", "plot_roofline",
    "plot_serving", "plot_speedup",
    "plot_strategies", "plot_throughput", "read_rows", "run_benchmark", "run_load",
    "run_load_sweep", "run_notebook", "run_sweep", "run_textgen", "save", "summarize",
    "summary_markdown", "sweep_plots", "timed_generate",
]
