"""``optkit bench``: benchmark groups, one subcommand each (``textgen`` first).

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
                    "timed separately.  Rows are appended to --output.")
    p.add_argument("--model", nargs="+", default=["jax/opt-125m"],
                   help="one or more of facebook/opt-*, jax/opt-*, alpa/opt-*")
    p.add_argument("--path", help="folder holding {name}-np/ (or the folder / an HF dir)")
    p.add_argument("--dummy", action="store_true", help="random weights instead of --path")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate per row (default 32)")
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
                   "models (default: torch's choice).  On a CPU shared with other work, also "
                   "set OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads slow torch down "
                   "several times")
    p.add_argument("--tokenizer", help="tokenizer folder (default: optkit's embedded one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmarks/results/textgen.jsonl",
                   help="rows are appended here (.jsonl or .csv)")
    p.add_argument("--summary", help="also write a markdown summary to this file")
    p.add_argument("--debug", action="store_true", help="print the generated text")
    p.set_defaults(func=run_textgen_command, parser=p)


def command_of(args, prog: str = "optkit bench textgen") -> str:
    """The command line, rebuilt from the parsed arguments (non-default options only), after
    the timing-relevant environment variables that are set."""
    import os

    from optkit.bench.textgen import ENV_VARS

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
    from optkit.bench.textgen import TextgenConfig, run_textgen, summary_markdown, write_rows

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
    path = write_rows(rows, args.output)
    report = summary_markdown(rows, command)
    print(report)
    print(f"appended {len(rows)} rows to {path}")
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(report)
    return 0


#: ``optkit bench`` subcommands: functions that add one parser to the bench subparsers.
SUBCOMMANDS = [add_textgen]


def register(sub) -> None:
    p = sub.add_parser("bench", help="run benchmarks (optkit bench textgen --help)",
                       description="Benchmarks; results are appended under "
                                   "benchmarks/results/.")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for add in SUBCOMMANDS:
        add(bench)
    p.set_defaults(func=lambda args: p.print_help() or 2)
