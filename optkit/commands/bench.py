"""``optkit bench``: benchmark groups, one subcommand each (textgen, sweep, load, report).

Each entry of :data:`SUBCOMMANDS` registers one ``optkit bench NAME`` parser; add new
benchmarks there.
"""

from __future__ import annotations

import argparse


def add_textgen(sub) -> None:
    p = sub.add_parser(
        "textgen", help="text generation latency / throughput, backends side by side",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generate from built-in prompts with each --model at each --batch-size "
                    "and report, per batch, input/output length, latency, tokens/s, TFLOPS, "
                    "time to first token and per decode step; warm-up (compile) batches are "
                    "timed separately.  Rows are appended to --output (default under build/, "
                    "so a run never dirties the checkout); --summary also writes the "
                    "markdown report.")
    p.add_argument("--model", nargs="+", default=["jax/opt-125m"],
                   help="one or more of facebook/opt-*, jax/opt-*, alpa/opt-*")
    p.add_argument("--path", help="folder holding {name}-np/ (or the folder / an HF dir)")
    p.add_argument("--dummy", action="store_true", help="random weights instead of --path")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate per row; 32 if neither this nor "
                             "--max-length is given")
    length.add_argument("--max-length", type=int, default=None,
                        help="total length, prompt included (HF's max_length)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), "
                   "float32, float16, bfloat16")
    p.add_argument("--num-batches", type=int, default=4, help="measured batches per setting")
    p.add_argument("--warmup", type=int, default=1,
                   help="batches timed separately before the measured ones (they include "
                        "compilation)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="always generate the full length (same work for every backend)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="load all models at once and alternate between them batch by batch "
                        "(--no-interleave: one model in memory at a time)")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads for facebook/ "
                   "models; torch's choice if not given.  On a CPU shared with other work, also "
                   "set OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads slow torch down "
                   "several times")
    p.add_argument("--tokenizer", help="tokenizer folder; optkit's embedded one if not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "--out", default="build/bench/textgen.jsonl",
                   help="rows are appended here (.jsonl or .csv; parent folders are "
                        "created)")
    p.add_argument("--summary", help="also write a markdown summary to this file")
    p.add_argument("--debug", action="store_true", help="print the generated text")
    p.set_defaults(func=run_textgen_command, parser=p)


def command_of(args, prog: str = "optkit bench textgen") -> str:
    """The command line, rebuilt from the parsed arguments (non-default options only), after
    the timing-relevant environment variables that are set."""
    import os

    from optkit.bench.core import ENV_VARS

    parts = [f"{var}={os.environ[var]}" for var in ENV_VARS if var in os.environ] + [prog]
    for action in args.parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse.BooleanOptionalAction):
            parts.append(longs[0] if value else longs[-1])
        elif action.nargs == 0:
            parts.append(longs[0])
        elif isinstance(value, list):
            parts += [longs[0], *map(str, value)]
        else:
            parts += [longs[0], str(value)]
    return " ".join(parts)


def run_textgen_command(args) -> int:
    from optkit.bench.results import append_rows
    from optkit.bench.textgen import TextgenConfig, run_textgen, summary_markdown

    command = command_of(args)
    if args.max_new_tokens is None and args.max_length is None:
        args.max_new_tokens = 32
    cfg = TextgenConfig(models=args.model, path=args.path, dummy=args.dummy,
                        batch_sizes=args.batch_size, max_new_tokens=args.max_new_tokens,
                        max_length=args.max_length, num_beams=args.num_beams,
                        do_sample=args.do_sample, dtype=args.dtype,
                        num_batches=args.num_batches, warmup=args.warmup,
                        ignore_eos=args.ignore_eos, tokenizer=args.tokenizer, seed=args.seed,
                        debug=args.debug, interleave=args.interleave,
                        torch_threads=args.torch_threads)
    rows = run_textgen(cfg, command=command)
    path = append_rows(rows, args.output)
    report = summary_markdown(rows, command)
    print(report)
    print(f"appended {len(rows)} rows to {path}")
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(report)
    return 0


# --------------------------------------------------------------------------------------------
# optkit bench sweep
# --------------------------------------------------------------------------------------------
SWEEP_EPILOG = """\
examples:
  optkit bench sweep --model opt-125m --batch-size 1 2 4 8 --baseline backend=facebook
  optkit bench sweep --model opt-1.3b --backend alpa --plan dp=1,tp=2 dp=2,tp=1 --batch-size 8
  optkit bench sweep --sweep sweeps/batch.yaml --output build/sweep.csv build/sweep.jsonl

A sweep file (YAML) holds base: {...}, grid: {field: [values]}, cfgs: [{...}], baseline:
{field: value}, output: PATH.  Rows are appended as each setting finishes; running the same
command again skips settings already in the output (--no-resume measures them again)."""


def _values(text: str):
    import yaml

    return yaml.safe_load(text)


def parse_baseline(text: str | None):
    """``first`` / ``none`` / an index / ``field=value[,field=value]`` (see run_sweep)."""
    if text is None or text == "first":
        return None
    if text == "none":
        return False
    if text.isdigit():
        return int(text)
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"--baseline {text!r}: use first, none, an index or "
                             "field=value[,field=value]")
        k, v = part.split("=", 1)
        out[k.strip()] = _values(v)
    return out


def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="generation benchmark over a grid of settings (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SWEEP_EPILOG,
        description="Benchmark every combination of the given models, backends, plans, "
                    "dtypes, batch sizes and lengths (random prompts, EOS ignored): first-token "
                    "latency, decode step time, tokens/s, compile time, memory per device and "
                    "roofline fraction, each row compared with its same-run baseline.")
    p.add_argument("--sweep", metavar="YAML", help="read the settings from a sweep file")
    p.add_argument("--model", nargs="+", default=["opt-125m"],
                   help="presets (opt-tiny, opt-125m ... opt-175b); default: opt-125m")
    p.add_argument("--backend", nargs="+", default=["jax"],
                   help="jax (one device), alpa (all devices), facebook (HF torch)")
    p.add_argument("--plan", nargs="+", default=[None],
                   help="alpa plans such as dp=1,tp=2,pp=1 (default: automatic)")
    p.add_argument("--dtype", nargs="+", default=["auto"],
                   help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--prompt-len", type=int, nargs="+", default=[32])
    p.add_argument("--new-tokens", type=int, nargs="+", default=[32])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    p.add_argument("--warmup", type=int, default=1, help="runs before them (compiles)")
    p.add_argument("--path", help="folder holding {model}-np/ (default: random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-dispatch", type=int, help="decode steps per device call")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--label", default="", help="text stored in every row")
    p.add_argument("--baseline", help="first (default), none, an index into the sweep, or "
                   "field=value,... applied to each setting (backend=facebook: HF torch at "
                   "the same shape; batch_size=1: scaling)")
    p.add_argument("--output", nargs="+", help="result files (.csv / .jsonl) rows are "
                   "appended to (default: the sweep file's, else "
                   "benchmarks/results/sweep.csv)")
    p.add_argument("--no-resume", action="store_true",
                   help="measure settings already in the output again")
    p.add_argument("--plots", metavar="DIR", help="also write throughput / roofline / "
                   "speed-up PNGs here")
    p.set_defaults(func=run_sweep_command, parser=p)


def run_sweep_command(args) -> int:
    from optkit.bench.sweep import DEFAULT_OUTPUT, grid, load_sweep, run_sweep

    baseline = parse_baseline(args.baseline)
    if args.sweep:
        sweep = load_sweep(args.sweep)
        cfgs, output = sweep.cfgs, args.output or sweep.output or DEFAULT_OUTPUT
        baseline = sweep.baseline if args.baseline is None else baseline
    else:
        base = {"repeats": args.repeats, "warmup": args.warmup, "path": args.path,
                "seed": args.seed, "steps_per_dispatch": args.steps_per_dispatch,
                "do_sample": args.do_sample, "label": args.label}
        plans = [None if p in (None, "auto", "none") else p for p in args.plan]
        cfgs = grid(base, model=args.model, backend=args.backend, plan=plans,
                    dtype=args.dtype, batch_size=args.batch_size,
                    prompt_len=args.prompt_len, new_tokens=args.new_tokens)
        output = args.output or DEFAULT_OUTPUT
    df = run_sweep(cfgs, output=output, baseline=baseline, resume=not args.no_resume)
    cols = [c for c in ("model_name", "resolved_plan", "resolved_dtype", "batch_size", "prompt_len",
                        "new_tokens", "tokens_per_s", "ttft_s", "decode_step_ms", "compile_s",
                        "roofline_fraction", "speedup", "error") if c in df]
    with _pandas_wide():
        print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"rows in {', '.join(map(str, [output] if isinstance(output, str) else output))}")
    if args.plots:
        from optkit.bench.plots import sweep_plots

        for path in sweep_plots(df, args.plots).values():
            print(f"wrote {path}")
    return 1 if "error" in df and df["error"].notna().any() else 0


def _pandas_wide():
    import pandas as pd

    return pd.option_context("display.width", 200, "display.max_columns", 50)


# --------------------------------------------------------------------------------------------
# optkit bench load
# --------------------------------------------------------------------------------------------
LOAD_EPILOG = """\
examples:
  optkit serve --model jax/opt-125m --dummy &         # or any OpenAI-compatible server
  optkit bench load --url http://127.0.0.1:10001 --rate 1 2 4 8 --num-requests 100 \\
      --prompt-len uniform:16:128 --output-len 64 --slo-ttft-ms 500 --slo-tpot-ms 100
  optkit bench load --url http://127.0.0.1:8000 --rate inf --concurrency 16 \\
      --dataset prompts.jsonl --prompt-format text --plot build/load.png

lengths: N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEDIAN:SIGMA, exponential:MEAN.
A dataset is JSONL: {"prompt": "text" or [token ids], "max_tokens": n} per line."""


def add_load(sub) -> None:
    p = sub.add_parser(
        "load", help="load-test a serving endpoint (TTFT, TPOT, ITL, E2E, goodput)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LOAD_EPILOG,
        description="Send streaming /v1/completions requests at the given rates (Poisson "
                    "or gamma-bursty arrivals, or a closed loop of --concurrency users) and "
                    "report time to first token, time per output token, inter-token and "
                    "end-to-end latency (mean, p50, p90, p99), throughput and goodput within "
                    "the SLOs.  One summary row per rate is appended to --output.")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:10001")
    p.add_argument("--model", help="model name to send (default: the server's first)")
    p.add_argument("--rate", type=float, nargs="+", default=[float("inf")],
                   help="requests/s, one run each (inf: all at once; default: inf)")
    p.add_argument("--num-requests", type=int, default=100, help="per rate (default: 100)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier "
                        "(CV = 1/sqrt(burstiness)); default: 1")
    p.add_argument("--concurrency", type=int, help="most requests in flight")
    p.add_argument("--prompt-len", default="uniform:32:128", help="tokens (default: %(default)s)")
    p.add_argument("--output-len", default="64", help="max_tokens (default: %(default)s)")
    p.add_argument("--dataset", help="JSONL prompts (and max_tokens) instead of random ones")
    p.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                   help="random prompts as token ids (exact lengths) or words")
    p.add_argument("--token-range", type=int, nargs=2, default=[1000, 30000],
                   metavar=("LO", "HI"), help="random token ids from [LO, HI) (OPT's "
                   "vocabulary; `optkit serve --fake` knows only 97 123, or use --prompt-format "
                   "text)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--logprobs", action="store_true",
                   help="request log-probs so each streamed chunk's token count is known")
    p.add_argument("--slo-ttft-ms", type=float, help="goodput limit on time to first token")
    p.add_argument("--slo-tpot-ms", type=float, help="goodput limit on time per output token")
    p.add_argument("--slo-e2e-ms", type=float, help="goodput limit on end-to-end latency")
    p.add_argument("--api-key", help="sent as a bearer token")
    p.add_argument("--extra-body", help="JSON object merged into every request body")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="")
    p.add_argument("--output", nargs="+", default=["benchmarks/results/load.csv"],
                   help="summary rows appended here (.csv / .jsonl)")
    p.add_argument("--requests-output", help="every request appended here (.jsonl / .csv)")
    p.add_argument("--no-resume", action="store_true", help="rerun rates already in --output")
    p.add_argument("--plot", metavar="PNG", help="also plot percentiles vs rate")
    p.set_defaults(func=run_load_command, parser=p)


def run_load_command(args) -> int:
    import json

    from optkit.bench.loadgen import LoadConfig, run_load_sweep

    cfg = LoadConfig(
        url=args.url, model=args.model, num_requests=args.num_requests,
        rate=args.rate[0], burstiness=args.burstiness, concurrency=args.concurrency,
        prompt_len=args.prompt_len, output_len=args.output_len, dataset=args.dataset,
        prompt_format=args.prompt_format, token_range=tuple(args.token_range),
        temperature=args.temperature, logprobs=args.logprobs, slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms, slo_e2e_ms=args.slo_e2e_ms, api_key=args.api_key,
        timeout=args.timeout, seed=args.seed, label=args.label,
        extra_body=json.loads(args.extra_body) if args.extra_body else None)
    df = run_load_sweep(cfg, rates=args.rate, output=args.output,
                        requests_output=args.requests_output, resume=not args.no_resume)
    cols = ["rate", "completed", "failed", "request_throughput", "output_token_throughput",
            "goodput", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms"]
    with _pandas_wide():
        print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    errors = df["first_error"].dropna()
    if len(errors):
        print(f"first error: {errors.iloc[0]}")
    print(f"summary rows in {', '.join(args.output)}")
    if args.plot:
        from optkit.bench.plots import plot_load, save

        save(plot_load(df), args.plot)
        print(f"wrote {args.plot}")
    return 1 if df["failed"].sum() else 0


# --------------------------------------------------------------------------------------------
# optkit bench report
# --------------------------------------------------------------------------------------------
REPORT_EPILOG = """\
examples:
  optkit bench report                                   # the sweep notebook's defaults
  optkit bench report -p model opt-tiny -p batch_sizes "[1, 2]" --output-dir build/tiny
  optkit bench report --notebook 05_serving_load --list-parameters

Values are YAML (numbers, true/false, [lists]); a notebook lists its parameters with
--list-parameters."""


def add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="run a notebook headlessly (papermill) and write an HTML report",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REPORT_EPILOG,
        description="Execute a notebook from notebooks/ (default: 03_benchmark_sweep) with "
                    "parameters injected, on a kernel of this Python; the notebook writes its "
                    "CSV / PNG results into --output-dir, next to the executed report.ipynb "
                    "and report.html.")
    p.add_argument("--notebook", default="03_benchmark_sweep",
                   help="a notebook name in notebooks/ or a path (default: %(default)s)")
    p.add_argument("--output-dir", default="build/report", help="(default: %(default)s)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                   metavar=("NAME", "VALUE"), help="set a notebook parameter (repeatable)")
    p.add_argument("--show-input", action="store_true", help="keep code cells in the HTML")
    p.add_argument("--list-parameters", action="store_true",
                   help="print the notebook's parameters and exit")
    p.set_defaults(func=run_report_command, parser=p)


def run_report_command(args) -> int:
    import logging
    import time

    from optkit.bench.report import make_report, notebook_parameters

    if not args.verbose:
        logging.getLogger("papermill").setLevel(logging.WARNING)
    params = notebook_parameters(args.notebook)
    if args.list_parameters:
        for name, info in params.items():
            print(f"{name}: {info['type']} = {info['default']}" +
                  (f"  # {info['help']}" if info["help"] else ""))
        return 0
    values = {name: _values(value) for name, value in args.parameter}
    start = time.perf_counter()
    print(f"running {args.notebook} -> {args.output_dir}/report.html", flush=True)
    paths = make_report(args.output_dir, values, notebook=args.notebook,
                        no_input=not args.show_input, progress=False, echo=True)
    for path in paths.values():
        print(f"  {path}")
    print(f"report: {paths['report.html']} ({time.perf_counter() - start:.0f} s)")
    return 0


#: ``optkit bench`` subcommands: functions that add one parser to the bench subparsers.
SUBCOMMANDS = [add_textgen, add_sweep, add_load, add_report]


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, sweeps, load tests and reports "
                                     "(optkit bench sweep --help)",
                       description="Benchmarks; results are appended under "
                                   "benchmarks/results/.")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for add in SUBCOMMANDS:
        add(bench)
    p.set_defaults(func=lambda args: p.print_help() or 2)
