"""CPU: ``optkit serve --model jax/opt-125m --dummy`` answering a short greedy request, against
``model.generate`` for the same tokens in one process.

For each server configuration (the defaults, plus each ``--server-args``) the real CLI is
started as a subprocess -- what users run --, and once ``/health`` answers:

1. one warm-up request (``--max-tokens`` tokens, temperature 0; its latency is reported);
2. ``--repeats`` streaming requests one after another through
   :func:`optkit.bench.loadgen.run_load` (closed loop of one user): TTFT, TPOT, end-to-end;
3. the median round trip of ``GET /health`` (the HTTP overhead with no model work).

Then the server is stopped and ``get_model(model, dummy=True)`` (the same random weights)
generates the same number of new tokens from the same prompt ids, greedy, ``--repeats``
times after a warm-up; the row says whether the texts are the same and the ratio of the
server's median end-to-end time to generate's.  Rows go to ``--out``/serve_cpu.jsonl,
a table to ``--out``/serve_cpu.md, each server's log to ``--out``/server-N.log::

    python benchmarks/serve_cpu.py
    python benchmarks/serve_cpu.py --server-args "--max-num-seqs 1 --max-len 256"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's optkit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``optkit serve`` in a subprocess (this checkout's optkit), stopped on exit."""

    def __init__(self, model: str, extra: list[str], log: Path, timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "optkit.cli", "serve", "--model", model, "--dummy",
                    "--port", str(self.port), "--log-level", "warning", *extra]
        self.log, self.timeout = log, timeout
        self.proc = None

    def __enter__(self) -> Server:
        import httpx

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            TOKENIZERS_PARALLELISM="false")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log.open("w")
        t = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`{shlex.join(self.cmd)}` exited with "
                                   f"{self.proc.returncode}; see {self.log}")
            if time.perf_counter() - t > self.timeout:
                raise TimeoutError(f"the server did not answer /health in {self.timeout:g} s")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def complete(url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One non-streaming greedy completion: its text, token count and latency."""
    import httpx

    t = time.perf_counter()
    r = httpx.post(url + "/v1/completions", timeout=timeout, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    body = r.json()
    return {"latency_s": time.perf_counter() - t, "text": body["choices"][0]["text"],
            "completion_tokens": body["usage"]["completion_tokens"]}


def health_rtt_ms(url: str, n: int = 20) -> float:
    import httpx

    ts = []
    with httpx.Client() as c:
        for _ in range(n):
            t = time.perf_counter()
            c.get(url + "/health")
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def measure_server(args, extra: list[str], log: Path) -> dict:
    from optkit.bench.loadgen import LoadConfig, run_load

    with Server(args.model, extra, log, args.timeout) as srv:
        warm = complete(srv.url, args.model, args.prompt, args.max_tokens, args.timeout)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "prompt.jsonl"
            data.write_text(json.dumps({"prompt": args.prompt, "max_tokens": args.max_tokens})
                            + "\n")
            _, summary = run_load(LoadConfig(
                url=srv.url, model=args.model, num_requests=args.repeats, concurrency=1,
                dataset=str(data), temperature=0.0, logprobs=True, timeout=args.timeout,
                label="optkit serve " + " ".join(extra)), progress=False)
        answer = complete(srv.url, args.model, args.prompt, args.max_tokens, args.timeout)
        rtt = health_rtt_ms(srv.url)
        startup = srv.startup_s
    keep = ("completed", "failed", "first_error", "ttft_p50_ms", "ttft_mean_ms", "tpot_p50_ms",
            "tpot_mean_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_mean_ms",
            "mean_output_tokens")
    return {"server_args": " ".join(extra) or "(defaults)", "startup_s": startup,
            "warmup_request_s": warm["latency_s"], "health_rtt_ms": rtt,
            "completion_tokens": answer["completion_tokens"], "server_text": answer["text"],
            "nonstreamed_s": answer["latency_s"], **{k: summary.get(k) for k in keep}}


def measure_generate(args, new_tokens: int) -> dict:
    """``model.generate`` of ``new_tokens`` greedy tokens from the prompt's ids."""
    import numpy as np

    from optkit import get_model, get_tokenizer

    tok = get_tokenizer()
    ids = np.array([tok(args.prompt)["input_ids"]], np.int32)
    t = time.perf_counter()
    model = get_model(args.model, dummy=True, progress=False)
    load_s = time.perf_counter() - t
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    t = time.perf_counter()
    out = model.generate(ids, **kw)
    first_s = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        times.append(time.perf_counter() - t)
    text = tok.decode(np.asarray(out)[0, ids.shape[1]:].tolist(), skip_special_tokens=True,
                      clean_up_tokenization_spaces=False)
    return {"generate_load_s": load_s, "generate_first_s": first_s,
            "generate_s": statistics.median(times), "generate_text": text,
            "generate_tokens": int(np.asarray(out).shape[1] - ids.shape[1])}


def environment() -> dict:
    """The machine and software (``optkit.bench.core.environment``) and its load."""
    from optkit.bench.core import environment as machine

    return {**machine(), "load_avg_1m": os.getloadavg()[0]}


def markdown(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = ["# `optkit serve` on CPU vs `model.generate`", "",
             f"Model {r0['model']} (random weights), prompt {r0['prompt']!r}, greedy, at most "
             f"{r0['max_tokens']} new tokens; {r0['repeats']} timed requests one at a time "
             f"after a warm-up. CPU: {r0['cpu']} ({r0['cpu_count']} cores, 1-minute load "
             f"{r0['load_avg_1m']:.1f}); python {r0['python']}, jax {r0['jax']}.", "",
             "| server args | tokens | server e2e p50 (s) | TTFT p50 (ms) | TPOT p50 (ms) | "
             "generate (s) | server / generate | HTTP round trip (ms) | same text | "
             "startup (s) | warm-up request (s) |", "|" + "---|" * 11]
    for r in rows:
        e2e = r.get("e2e_p50_ms")
        lines.append(
            f"| {r['server_args']} | {r['completion_tokens']} | "
            f"{e2e / 1e3 if e2e else float('nan'):.2f} | {r.get('ttft_p50_ms') or 0:.0f} | "
            f"{r.get('tpot_p50_ms') or 0:.1f} | {r['generate_s']:.2f} | "
            f"{r.get('ratio') or float('nan'):.2f} | {r['health_rtt_ms']:.1f} | "
            f"{r['same_text']} | {r['startup_s']:.1f} | {r['warmup_request_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="jax/opt-125m", help="served with --dummy")
    ap.add_argument("--prompt", default="Paris is the capital of")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed requests / generate calls")
    ap.add_argument("--server-args", action="append", default=[], metavar="ARGS",
                    help="another server configuration to measure besides the defaults, "
                         "e.g. \"--max-num-seqs 1 --max-len 256\" or --server-args=--no-warmup "
                         "(repeatable)")
    ap.add_argument("--no-defaults", action="store_true",
                    help="measure only the --server-args configurations")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds for the server to start and for each request")
    ap.add_argument("--out", default="build/serve_cpu")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.max_tokens < 1:
        ap.error("--repeats and --max-tokens must be >= 1")
    if not args.model.startswith(("jax/", "alpa/")):
        ap.error("optkit serve runs jax/opt-* or alpa/opt-* models")
    configs = ([] if args.no_defaults else [[]]) + [shlex.split(a) for a in args.server_args]
    if not configs:
        ap.error("nothing to measure: --no-defaults without --server-args")

    from optkit.bench.results import append_rows

    out = Path(args.out)
    rows = []
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    gen = None
    for i, extra in enumerate(configs):
        row = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens,
               "repeats": args.repeats, "command": command, **environment(),
               **measure_server(args, extra, out / f"server-{i}.log")}
        if gen is None or gen["generate_tokens"] != row["completion_tokens"]:
            gen = measure_generate(args, row["completion_tokens"])
        row.update(gen)
        row["same_text"] = row["server_text"] == row["generate_text"]
        if row.get("e2e_p50_ms"):
            row["ratio"] = row["e2e_p50_ms"] / 1e3 / row["generate_s"]
        append_rows([row], out / "serve_cpu.jsonl")
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in (
            "server_args", "completion_tokens", "e2e_p50_ms", "ttft_p50_ms", "generate_s",
            "ratio", "same_text", "startup_s")}), flush=True)
    (out / "serve_cpu.md").write_text(markdown(rows))
    print(f"wrote {out / 'serve_cpu.jsonl'} and {out / 'serve_cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
