"""Continuous batching vs Alpa's static batch of 4 under the same Poisson arrival traces.

For each arrival rate, every mode replays the same trace (arrival times, prompt lengths,
output lengths; EOS is ignored so each request does the same work everywhere) through
optkit's scheduler and ModelEngine on one device, and reports requests/s, tokens/s and
p50/p99 of time to first token (TTFT), time per output token after the first (TPOT) and
end-to-end latency.

Modes: ``static-4`` (Alpa: wait for up to 4 requests -- at most ``--static-wait`` s after the
first arrives --, run them together to completion, then take the next batch),
``continuous-4`` (same 4 slots, requests join between steps) and ``continuous-16``.

    python benchmarks/serve_batching.py                 # writes benchmarks/results/...
    python benchmarks/serve_batching.py --requests 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parents[1]))  # this checkout's optkit, not an installed one


def make_trace(n: int, rate: float, prompt_len: tuple[int, int], output_len: tuple[int, int],
               vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    arrivals -= arrivals[0]
    trace = []
    for t in arrivals:
        p = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        trace.append({"arrival": float(t),
                      "prompt": [2] + rng.integers(4, vocab, p - 1).tolist(),
                      "max_tokens": int(rng.integers(output_len[0], output_len[1] + 1))})
    return trace


def percentiles(xs) -> dict:
    xs = np.asarray(xs, float)
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)),
            "mean": float(xs.mean())}


def replay(scheduler, trace: list[dict]) -> dict:
    """Submit each request at its arrival time; wait for all; summarize."""
    from optkit.serve import SeqRequest

    handles = [None] * len(trace)
    done = threading.Event()
    left = [len(trace)]
    lock = threading.Lock()

    def on_output(h, out):
        if out.finish_reason is not None:
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()

    start = time.perf_counter()
    for i, r in enumerate(trace):
        delay = start + r["arrival"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        (handles[i],) = scheduler.submit([SeqRequest(tuple(r["prompt"]), r["max_tokens"],
                                                     ignore_eos=True)], on_output=on_output)
    done.wait()
    reasons = {h.finish_reason for h in handles}
    assert reasons == {"length"}, reasons
    end = max(h.t_done for h in handles)
    first = min(h.t_submit for h in handles)
    tokens = sum(h.generated for h in handles)
    return {
        "requests_per_s": len(handles) / (end - first),
        "tokens_per_s": tokens / (end - first),
        "makespan_s": end - first,
        "ttft_s": percentiles([h.t_first - h.t_submit for h in handles]),
        "tpot_s": percentiles([(h.t_done - h.t_first) / (h.generated - 1) for h in handles]),
        "e2e_s": percentiles([h.t_done - h.t_submit for h in handles]),
        "decode_steps": scheduler.steps,
    }


def build_model(cfg):
    from optkit import get_model
    from optkit.weights.random import write_random_folder

    tmp = Path(tempfile.mkdtemp(prefix="optkit-bench-"))
    write_random_folder(tmp / f"{cfg.name}-np", cfg, seed=0, dtype=np.float32, progress=False)
    return get_model(f"jax/{cfg.name}", path=tmp, progress=False)


def warm(engine, prompt_lens, steps):
    """Compile every prefill bucket and decode variant the trace will use."""
    from optkit.serve.engine import EngineRequest, bucket_length

    buckets = sorted({bucket_length(n, engine.max_len) for n in prompt_lens})
    for t in buckets:
        p = engine.prefill(EngineRequest((2,) * min(t, engine.max_len - 1), 1))
        engine.insert(p, 0)
        for n in steps:
            engine.generate(n)
        engine.free(0)


def run_benchmark(cfg: dict, model) -> dict:
    from optkit import get_tokenizer
    from optkit.serve import HFCodec, Limits, ModelEngine, Scheduler

    engine = ModelEngine(model.executor, max_slots=cfg["slots"], max_len=cfg["max_len"])
    trace = make_trace(cfg["requests"], cfg["rate"], tuple(cfg["prompt_len"]),
                       tuple(cfg["output_len"]), model.config.vocab_size, cfg["seed"])
    warm(engine, [len(r["prompt"]) for r in trace], (1, cfg["steps_per_dispatch"]))
    sched = Scheduler(engine, HFCodec(get_tokenizer()), Limits(max_queue=10_000),
                      policy=cfg["policy"], static_wait=cfg["static_wait"],
                      steps_per_dispatch=cfg["steps_per_dispatch"]).start()
    try:
        return {**cfg, **replay(sched, trace)}
    finally:
        sched.stop()


def environment() -> dict:
    import jax

    import optkit

    return {"machine": os.environ.get("OPTKIT_MACHINE", "CPU, 2 cores (shared)"),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "device": str(jax.devices()[0]), "python": platform.python_version(),
            "jax": jax.__version__, "numpy": np.__version__, "optkit": optkit.__version__,
            "load_avg_1m_before": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rates", default="1,3",
                    help="mean arrivals per second, one trace per rate (comma-separated): "
                         "1/s keeps continuous-4 below capacity, 3/s saturates every mode")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(8, 64))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 128))
    ap.add_argument("--static-wait", type=float, default=0.1,
                    help="static batching: longest wait for companions of a first request")
    ap.add_argument("--steps-per-dispatch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192,
                    help="small, so the LM head does not dominate a CPU step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="static-4,continuous-4,continuous-16")
    ap.add_argument("--out", default=str(RESULTS / "serve_batching.jsonl"))
    args = ap.parse_args(argv)

    from optkit.config import OPTConfig

    mcfg = OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, ffn_dim=4 * args.hidden,
                     max_position_embeddings=512, name="opt-bench")
    model = build_model(mcfg)
    env = environment()
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    rows = []
    runs = [(float(rate), mode) for rate in args.rates.split(",")
            for mode in args.modes.split(",")]
    for rate, mode in runs:
        policy, slots = mode.split("-")
        cfg = {"mode": mode, "policy": policy, "slots": int(slots), "requests": args.requests,
               "rate": rate, "prompt_len": list(args.prompt_len),
               "output_len": list(args.output_len), "static_wait": args.static_wait,
               "steps_per_dispatch": args.steps_per_dispatch, "seed": args.seed,
               "max_len": args.prompt_len[1] + args.output_len[1],
               "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                         "vocab": args.vocab, "params_m": round(mcfg.num_params() / 1e6, 1)}}
        t0 = time.perf_counter()
        row = run_benchmark(cfg, model)
        row.update(env, command=command, wall_s=time.perf_counter() - t0,
                   load_avg_1m_after=os.getloadavg()[0])
        rows.append(row)
        print(f"{rate:g}/s {mode:>14}: {row['requests_per_s']:.2f} req/s, "
              f"{row['tokens_per_s']:.0f} tok/s, TTFT p50 {row['ttft_s']['p50'] * 1e3:.0f} ms p99 "
              f"{row['ttft_s']['p99'] * 1e3:.0f} ms, TPOT p50 {row['tpot_s']['p50'] * 1e3:.1f} "
              f"ms p99 {row['tpot_s']['p99'] * 1e3:.1f} ms", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.with_suffix(".md").write_text(markdown(rows))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [
        "# Continuous batching vs static batch of 4 (same Poisson traces)", "",
        "Modes: `static-4` is Alpa's design (wait for up to 4 requests, run them together to "
        "completion, then take the next batch); `continuous-N` has N slots that requests join "
        "and leave between decode steps (optkit's engine).  TTFT: arrival to first token; "
        "TPOT: time per output token after the first; e2e: arrival to last token.", "",
        f"Command: `{r0['command']}`  ",
        f"Machine: {r0['machine']} ({r0['platform']}, {r0['device']}); other jobs shared "
        f"the cores: 1-minute load average {r0['load_avg_1m_before']:.1f} before the run, "
        + ", ".join(f"{r['load_avg_1m_after']:.1f}" for r in rows) + " after each mode  ",
        f"Versions: python {r0['python']}, jax {r0['jax']}, numpy {r0['numpy']}, "
        f"optkit {r0['optkit']}  ",
        f"Model: random OPT, hidden {r0['model']['hidden']}, {r0['model']['layers']} layers, "
        f"vocab {r0['model']['vocab']} ({r0['model']['params_m']}M params), fp32  ",
        f"Traces: {r0['requests']} requests, Poisson arrivals, prompt "
        f"{r0['prompt_len'][0]}-{r0['prompt_len'][1]} tokens, output "
        f"{r0['output_len'][0]}-{r0['output_len'][1]} tokens (EOS ignored), seed {r0['seed']};"
        f" {r0['steps_per_dispatch']} decode steps per dispatch while nobody waits; static "
        f"batches wait at most {r0['static_wait']} s for companions", "",
        "| arrivals/s | mode | req/s | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | "
        "TPOT p99 (ms) | e2e p50 (s) | e2e p99 (s) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['rate']:g} | {r['mode']} | {r['requests_per_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | "
            f"{r['ttft_s']['p50'] * 1e3:.0f} | {r['ttft_s']['p99'] * 1e3:.0f} | "
            f"{r['tpot_s']['p50'] * 1e3:.1f} | {r['tpot_s']['p99'] * 1e3:.1f} | "
            f"{r['e2e_s']['p50']:.2f} | {r['e2e_s']['p99']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
