"""Text-generation benchmark (Alpa's ``benchmark_text_gen.py``): backends side by side.

For every model (``facebook/``, ``jax/``, ``alpa/``) and batch size, the same built-in
prompts are tokenized with left padding to one common length (so a JAX model compiles
once), ``warmup`` batches are run and timed separately (their extra time over a measured
batch is the compile / warm-up cost), then ``num_batches`` batches are measured, by default
round-robin over the models so that load changes on a shared machine hit all alike.  Each run
becomes one row: the full configuration, input and output lengths, latency, generated
tokens/s, TFLOPS, time to the first token, time per decode step, the device, software
versions and a timestamp.  By default EOS is ignored (``min_new_tokens = max_new_tokens``)
so every backend generates the same number of tokens.

Each batch is one :func:`optkit.bench.core.timed_generate` call; FLOPs are those of the
padded batch (:func:`optkit.bench.roofline.generation_flops`).  The compile estimate is
left empty for the torch backend, which does not compile.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from optkit.bench.core import environment, timed_generate
from optkit.bench.roofline import generation_flops

#: Built-in prompts of different lengths (batches cycle through them).
PROMPTS = [
    "Paris is the capital city of",
    "The best way to serve a large language model to many users at once is",
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote "
    "valley. Even more surprising to the researchers was the fact that the unicorns",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The three most important ideas in computer science are",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Model parallelism splits the weights of one neural network across several devices, "
    "which lets",
]


@dataclasses.dataclass
class TextgenConfig:
    """One benchmark invocation (every field ends up in each result row)."""

    models: list[str]
    path: str | None = None
    dummy: bool = False
    batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [1])
    max_new_tokens: int | None = 32
    max_length: int | None = None
    num_beams: int = 1
    do_sample: bool = False
    dtype: str = "auto"
    num_batches: int = 4
    warmup: int = 1
    ignore_eos: bool = True
    tokenizer: str | None = None
    prompts: list[str] | None = None
    seed: int = 0
    debug: bool = False
    interleave: bool = True
    torch_threads: int | None = None


def make_batches(tokenizer, prompts: list[str], batch_size: int, count: int):
    """``count`` batches cycling through ``prompts``, all padded (left) to one length."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
        out = []
        for i in range(count):
            texts = [prompts[(i * batch_size + j) % len(prompts)] for j in range(batch_size)]
            enc = tokenizer(texts, return_tensors="np", padding="max_length",
                            max_length=longest)
            out.append((texts, enc["input_ids"].astype(np.int64),
                        enc["attention_mask"].astype(np.int64)))
        return out
    finally:
        tokenizer.padding_side = side


class _Runner:
    """Times batches of one model and turns them into rows."""

    def __init__(self, name: str, cfg: TextgenConfig, common: dict, log, tok):
        from optkit import get_model

        t0 = time.perf_counter()
        self.model = get_model(name, path=cfg.path, dummy=cfg.dummy, dtype=cfg.dtype,
                               seed=cfg.seed, progress=False)
        self.load_s = time.perf_counter() - t0
        self.name, self.cfg, self.common, self.log, self.tok = name, cfg, common, log, tok
        self.dtype = str(getattr(self.model.dtype, "name", self.model.dtype)).replace("torch.",
                                                                                       "")

    def run(self, bs: int, i: int, batch) -> dict:
        cfg, name, mcfg = self.cfg, self.name, self.model.config
        texts, ids, mask = batch
        t = ids.shape[1]
        new = cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - t
        kwargs = {"max_new_tokens": new, "num_beams": cfg.num_beams, "do_sample": cfg.do_sample}
        if cfg.ignore_eos:
            kwargs["min_new_tokens"] = new
        if cfg.do_sample and name.startswith("facebook/"):
            import torch

            torch.manual_seed(cfg.seed + i)
        elif cfg.do_sample:
            kwargs["seed"] = cfg.seed + i
        r = timed_generate(self.model, ids, mask, kwargs)
        phase = "warmup" if i < cfg.warmup else "measure"
        flops = generation_flops(mcfg, bs * cfg.num_beams, t, r["new_tokens"])
        row = {
            "model": name, "backend": name.split("/")[0], "phase": phase, "batch_index": i,
            "batch_size": bs, "prompt_len": t, "real_prompt_tokens": float(mask.sum(1).mean()),
            "new_tokens": r["new_tokens"], "latency_s": r["latency_s"],
            "tokens_per_s": bs * r["new_tokens"] / r["latency_s"], "ttft_s": r["ttft_s"],
            "decode_step_ms": None if r["decode_step_s"] is None else 1e3 * r["decode_step_s"],
            "tflops": flops / r["latency_s"] / 1e12, "gflop": flops / 1e9,
            "load_s": self.load_s, "dtype": self.dtype, "params": mcfg.num_params(),
            "load_avg_1m": os.getloadavg()[0], **self.common,
        }
        if phase == "measure":
            self.log(f"{name:>18} bs={bs:<3d} in={t:<4d} out={r['new_tokens']:<4d} "
                     f"latency={r['latency_s']:.3f}s tok/s={row['tokens_per_s']:.1f} "
                     f"TFLOPS={row['tflops']:.4f}")
        if cfg.debug:
            for text, seq in zip(texts, r["sequences"][::cfg.num_beams], strict=False):
                self.log(f"  {text!r} -> {self.tok.decode(seq[t:], skip_special_tokens=True)!r}")
        return row


def _with_compile_times(runs: list[dict]) -> list[dict]:
    """Add the warm-up latency and compile estimate (warm-up minus the median batch; none
    for the torch backend, which runs eagerly)."""
    measured = [x["latency_s"] for x in runs if x["phase"] == "measure"]
    warm = [x["latency_s"] for x in runs if x["phase"] == "warmup"]
    steady = statistics.median(measured)
    for x in runs:
        x["warmup_s"] = warm[0] if warm else None
        x["compile_s"] = (warm[0] - steady) if warm and x["backend"] != "facebook" else None
    return runs


def run_textgen(cfg: TextgenConfig, progress: bool = True,
                log: Callable[[str], None] = print, command: str = "") -> list[dict]:
    """Benchmark every model at every batch size; returns one dict per timed batch.

    With ``cfg.interleave`` (default) all models are loaded at once and, after each model's
    warm-up, the measured batches go round-robin over the models, so a change in machine
    load hits every backend alike; otherwise models run one after another (one in memory).
    """
    from tqdm.auto import tqdm

    from optkit import get_tokenizer

    if (cfg.max_new_tokens is None) == (cfg.max_length is None):
        raise ValueError("set exactly one of max_new_tokens and max_length")
    if cfg.num_batches < 1 or cfg.warmup < 0 or not cfg.models or not cfg.batch_sizes:
        raise ValueError("need models, batch sizes, num_batches >= 1 and warmup >= 0")
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    tok = get_tokenizer(cfg.tokenizer)
    prompts = cfg.prompts or PROMPTS
    common = {"timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                         if k not in ("prompts", "models", "batch_sizes")},
              "command": command, **environment()}
    total = len(cfg.models) * len(cfg.batch_sizes) * (cfg.num_batches + cfg.warmup)
    bar = tqdm(total=total, desc="textgen", unit="batch", disable=not progress)
    batches = {bs: make_batches(tok, prompts, bs, cfg.warmup + cfg.num_batches)
               for bs in cfg.batch_sizes}
    rows: list[dict] = []

    def measure(runners: list[_Runner], bs: int) -> None:
        runs = {r.name: [] for r in runners}
        for runner in runners:
            for i in range(cfg.warmup):
                runs[runner.name].append(runner.run(bs, i, batches[bs][i]))
                bar.update()
        for i in range(cfg.warmup, cfg.warmup + cfg.num_batches):
            for runner in runners:
                runs[runner.name].append(runner.run(bs, i, batches[bs][i]))
                bar.update()
        for runner in runners:
            rows.extend(_with_compile_times(runs[runner.name]))

    if cfg.interleave:
        runners = [_Runner(name, cfg, common, log, tok) for name in cfg.models]
        for bs in cfg.batch_sizes:
            measure(runners, bs)
    else:
        for name in cfg.models:
            runner = _Runner(name, cfg, common, log, tok)
            for bs in cfg.batch_sizes:
                measure([runner], bs)
            del runner
    bar.close()
    return rows


def summarize(rows: list[dict], baseline: str | None = None) -> list[dict]:
    """Median over the measured batches per (model, batch size), with the ratio of tokens/s
    to ``baseline`` (default: the first ``facebook/`` model, else the first model)."""
    measured = [r for r in rows if r["phase"] == "measure"]
    keys = list(dict.fromkeys((r["model"], r["batch_size"]) for r in measured))
    models = list(dict.fromkeys(r["model"] for r in measured))
    if baseline is None:
        baseline = next((m for m in models if m.startswith("facebook/")), models[0])
    out = []
    for model, bs in keys:
        rs = [r for r in measured if r["model"] == model and r["batch_size"] == bs]

        def med(field, rs=rs):
            vals = [r[field] for r in rs if r[field] is not None]
            return statistics.median(vals) if vals else None

        out.append({"model": model, "batch_size": bs, "prompt_len": rs[0]["prompt_len"],
                    "new_tokens": rs[0]["new_tokens"], "latency_s": med("latency_s"),
                    "tokens_per_s": med("tokens_per_s"), "ttft_s": med("ttft_s"),
                    "decode_step_ms": med("decode_step_ms"), "tflops": med("tflops"),
                    "warmup_s": rs[0]["warmup_s"],
                    "compile_s": None if model.startswith("facebook/") else rs[0]["compile_s"],
                    "batches": len(rs)})
    for s in out:
        base = next((b for b in out if b["model"] == baseline
                     and b["batch_size"] == s["batch_size"]), None)
        s["vs_baseline"] = s["tokens_per_s"] / base["tokens_per_s"] if base else None
    return out


def summary_markdown(rows: list[dict], command: str = "", baseline: str | None = None) -> str:
    """A short report: the command, the machine, and the per-configuration medians."""
    summary = summarize(rows, baseline)
    r0 = rows[0]
    base = baseline or next((s["model"] for s in summary if s["model"].startswith("facebook/")),
                            summary[0]["model"])

    loads = [r["load_avg_1m"] for r in rows if r.get("load_avg_1m") is not None]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [
        "# Text-generation benchmark", "",
        f"Command: `{command or 'run_textgen(...)'}`", "",
        f"Machine: {r0['cpu']} ({r0['cpu_count']} CPUs visible), JAX device "
        f"`{r0['jax_device']}`, torch device `{r0['torch_device']}`.  Versions: "
        f"python {r0['python']}, jax {r0['jax']}, torch {r0['torch']}, "
        f"transformers {r0['transformers']}, optkit {r0['optkit']}; torch threads "
        f"{r0.get('torch_threads')}, OMP_WAIT_POLICY {r0.get('omp_wait_policy')}.  "
        f"Run at {r0['timestamp']}"
        + (f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} during the run "
           "(other processes share these CPUs, so timings are noisy)." if loads else "."),
        "",
        f"dtype {r0['dtype']}, {r0['new_tokens']} new tokens per row, prompts left-padded to "
        f"{r0['prompt_len']} tokens, num_beams {r0['config']['num_beams']}, "
        f"do_sample {r0['config']['do_sample']}, EOS ignored: {r0['config']['ignore_eos']}. "
        f"Medians over {summary[0]['batches']} measured batches"
        + (" (round-robin over the models)" if r0["config"].get("interleave") else "")
        + f" after {r0['config']['warmup']} warm-up batch(es).  `vs {base}` is the ratio of "
        "generated tokens/s.  Compile = first (warm-up) batch minus the median batch (n/a for "
        "HF torch, which runs eagerly).", "",
        f"| model | batch | latency s | tokens/s | first token s | decode ms/step | "
        f"TFLOPS | warm-up s | compile s | vs {base} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['batch_size']} | {fmt(s['latency_s'], '.3f')} | "
            f"{fmt(s['tokens_per_s'], '.1f')} | {fmt(s['ttft_s'], '.3f')} | "
            f"{fmt(s['decode_step_ms'], '.2f')} | {fmt(s['tflops'], '.4f')} | "
            f"{fmt(s['warmup_s'], '.2f')} | "
            f"{'n/a' if s['compile_s'] is None else format(s['compile_s'], '.2f')} | "
            f"{fmt(s['vs_baseline'], '.2f')} |")
    return "\n".join(lines) + "\n"
