"""Serving load generator: timed streaming requests against any OpenAI-compatible server.

``run_load(LoadConfig(url=..., rate=4, num_requests=200))`` sends ``num_requests`` streaming
``POST {url}/v1/completions`` requests (httpx, asyncio) and measures each one on the client:

* arrivals: ``rate`` requests/s with gamma-distributed gaps of shape ``burstiness``
  (1 = Poisson; smaller is burstier, the gaps' coefficient of variation is
  ``1 / sqrt(burstiness)``), or ``rate=inf`` (all at once); ``concurrency`` caps the
  requests in flight (with ``rate=inf`` that is a closed loop of ``concurrency`` users);
* lengths: ``prompt_len`` / ``output_len`` are distributions (:class:`Lengths`: ``"128"``,
  ``"uniform:32:256"``, ``"normal:128:32"``, ``"lognormal:128:0.5"``, ``"exponential:64"``)
  or come from a JSONL ``dataset`` (``{"prompt": "..." or [ids], "max_tokens": n}`` per line);
  prompts of a drawn length are random token ids in ``token_range`` (exact lengths; servers
  that take only text: ``prompt_format="text"``, random words, about one token each);
* per request: TTFT (send -> first streamed text), inter-token latencies (gaps between
  streamed chunks, each divided over the tokens it carries when ``logprobs=True`` tells how
  many; otherwise one per chunk), TPOT ((end - first token) / (output tokens - 1), the
  token count from the stream's ``usage``), end-to-end latency; errors are recorded, not
  raised.

:func:`summarize` turns the requests into one row: mean / p50 / p90 / p99 of TTFT, TPOT, ITL
and E2E (ms), request / output-token / total-token throughput, and goodput: requests/s
finishing within every given SLO (``slo_ttft_ms``, ``slo_tpot_ms``, ``slo_e2e_ms``).
:func:`run_load_sweep` repeats the run over several rates and appends one summary row per
rate (and optionally every request) to ``.csv`` / ``.jsonl`` files, resuming like
:func:`optkit.bench.sweep.run_sweep`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optkit.bench.results import append_rows, read_rows

DEFAULT_OUTPUT = "benchmarks/results/load.csv"

#: Words for ``prompt_format="text"`` (each one BPE token with its leading space).
WORDS = ("the of and to in is was for on as with by that at from his it an were are which "
         "this be has or had first one their its new after but who not they have her she "
         "two been other when there all during into school time may years more most only "
         "over city some world would where later up such used many can state about national "
         "out known university united then made").split()


# --------------------------------------------------------------------------------------------
# Lengths and arrivals
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Lengths:
    """A distribution of positive integer lengths, written ``kind:arg:arg``."""

    kind: str
    args: tuple[float, ...]

    KINDS = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}

    @classmethod
    def parse(cls, spec: str | int | Lengths) -> Lengths:
        if isinstance(spec, Lengths):
            return spec
        if isinstance(spec, int | np.integer) and not isinstance(spec, bool):
            spec = str(int(spec))
        parts = str(spec).strip().split(":")
        if len(parts) == 1:
            parts = ["fixed", parts[0]]
        kind, raw = parts[0], parts[1:]
        if kind not in cls.KINDS or len(raw) != cls.KINDS[kind]:
            raise ValueError(f"bad length distribution {spec!r}: use N, uniform:LO:HI, "
                             "normal:MEAN:STD, lognormal:MEDIAN:SIGMA or exponential:MEAN")
        try:
            args = tuple(float(a) for a in raw)
        except ValueError:
            raise ValueError(f"bad length distribution {spec!r}: arguments are numbers") from None
        bad = args[0] < 1 or (kind == "uniform" and args[1] < args[0]) or \
            (kind in ("normal", "lognormal") and args[1] < 0)
        if bad:
            raise ValueError(f"bad length distribution {spec!r}: lengths must be >= 1")
        return cls(kind, args)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        a = self.args
        if self.kind == "fixed":
            x = np.full(n, a[0])
        elif self.kind == "uniform":
            x = rng.integers(int(a[0]), int(a[1]) + 1, n)
        elif self.kind == "normal":
            x = rng.normal(a[0], a[1], n)
        elif self.kind == "lognormal":
            x = a[0] * np.exp(rng.normal(0.0, a[1], n))
        else:
            x = rng.exponential(a[0], n)
        return np.maximum(np.rint(x), 1).astype(int)

    def __str__(self) -> str:
        return ":".join([self.kind, *(f"{v:g}" for v in self.args)]) if self.kind != "fixed" \
            else f"{self.args[0]:g}"


def arrival_times(n: int, rate: float, burstiness: float = 1.0,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Send times (s from the start) of ``n`` requests: gamma gaps with mean ``1 / rate``
    and shape ``burstiness`` (1: a Poisson process); all zero when ``rate`` is infinite."""
    if rate is None or math.isinf(rate):
        return np.zeros(n)
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be positive; got {rate}, {burstiness}")
    rng = rng or np.random.default_rng(0)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


# --------------------------------------------------------------------------------------------
# Configuration and requests
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadConfig:
    """One load test (every field is recorded in the summary row).

    Args:
      url: the server (``http://host:port``; ``/v1`` is added unless present).
      model: the model name sent; ``None`` asks ``GET /v1/models`` for the first one.
      num_requests: requests to send.
      rate: mean requests/s (``inf``: all at once).
      burstiness: gamma shape of the gaps (1 = Poisson, < 1 burstier, > 1 more regular).
      concurrency: most requests in flight (``None``: no cap).
      prompt_len, output_len: length distributions (see :class:`Lengths`); ``output_len`` is
        sent as ``max_tokens``.
      dataset: a JSONL file of ``{"prompt": ..., "max_tokens": ...}`` lines to draw from.
      prompt_format: ``"ids"`` (token ids, exact lengths) or ``"text"`` (random words).
      token_range: ids are drawn from ``[lo, hi)``.
      temperature: sent with every request (0: greedy).
      logprobs: ask for log-probs (``logprobs=0``) so each chunk's token count is known.
      slo_ttft_ms, slo_tpot_ms, slo_e2e_ms: latency limits for goodput (``None``: unused).
      api_key: sent as ``Authorization: Bearer``.
      timeout: seconds per request.
      extra_body: more JSON fields for every request (e.g. vLLM's ``{"ignore_eos": true}``).
      seed: lengths, prompts and arrivals.
      label: free text carried into the rows.
    """

    url: str
    model: str | None = None
    num_requests: int = 100
    rate: float = math.inf
    burstiness: float = 1.0
    concurrency: int | None = None
    prompt_len: Any = "uniform:32:128"
    output_len: Any = "64"
    dataset: str | None = None
    prompt_format: str = "ids"
    token_range: tuple[int, int] = (1000, 30000)
    temperature: float = 0.0
    logprobs: bool = False
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    api_key: str | None = None
    timeout: float = 600.0
    extra_body: dict | None = None
    seed: int = 0
    label: str = ""

    def __post_init__(self):
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        self.rate = math.inf if self.rate is None else float(self.rate)
        if not self.rate > 0:
            raise ValueError(f"rate must be positive (inf: all at once); got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.prompt_format not in ("ids", "text"):
            raise ValueError("prompt_format is 'ids' or 'text'")
        self.token_range = tuple(int(x) for x in self.token_range)
        if not 0 <= self.token_range[0] < self.token_range[1]:
            raise ValueError(f"token_range {self.token_range} is empty")
        self.prompt_len = str(Lengths.parse(self.prompt_len))
        self.output_len = str(Lengths.parse(self.output_len))
        if self.dataset is not None and not Path(self.dataset).is_file():
            raise FileNotFoundError(f"dataset {self.dataset} not found")

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def replace(self, **kw) -> LoadConfig:
        return dataclasses.replace(self, **kw)

    def to_row(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("api_key")
        d["token_range"] = f"{self.token_range[0]}:{self.token_range[1]}"
        d["extra_body"] = json.dumps(self.extra_body) if self.extra_body else None
        return d

    def load_id(self) -> str:
        """A stable id of the workload and target (resumable sweeps skip done ids)."""
        key = {k: v for k, v in self.to_row().items() if k != "label"}
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_dataset(path: str | os.PathLike) -> list[dict]:
    """JSONL lines with ``prompt`` (text or token ids) and optional ``max_tokens``
    (or ``output_len``)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(item, dict) or "prompt" not in item:
            raise ValueError(f"{path}:{n}: each line needs a 'prompt'")
        p = item["prompt"]
        if not (isinstance(p, str) and p or isinstance(p, list) and p
                and all(isinstance(t, int) for t in p)):
            raise ValueError(f"{path}:{n}: 'prompt' must be a non-empty string or id list")
        mt = item.get("max_tokens", item.get("output_len"))
        if mt is not None and (not isinstance(mt, int) or mt < 1):
            raise ValueError(f"{path}:{n}: max_tokens must be a positive integer")
        out.append({"prompt": p, "max_tokens": mt})
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def make_requests(cfg: LoadConfig) -> list[dict]:
    """The requests of a run: ``prompt``, ``prompt_len`` (tokens or words; text from a
    dataset: characters), ``max_tokens`` and ``send_at`` (s from the start)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_requests
    out_lens = Lengths.parse(cfg.output_len).sample(rng, n)
    if cfg.dataset:
        data = read_dataset(cfg.dataset)
        order = np.concatenate([rng.permutation(len(data))
                                for _ in range(-(-n // len(data)))])[:n]
        reqs = [{"prompt": data[i]["prompt"], "prompt_len": len(data[i]["prompt"]),
                 "max_tokens": int(data[i]["max_tokens"] or out_lens[j])}
                for j, i in enumerate(order)]
    else:
        lens = Lengths.parse(cfg.prompt_len).sample(rng, n)
        lo, hi = cfg.token_range
        reqs = []
        for k, m in zip(lens, out_lens, strict=True):
            if cfg.prompt_format == "ids":
                prompt = rng.integers(lo, hi, int(k)).tolist()
            else:
                prompt = " ".join(rng.choice(WORDS, int(k)).tolist())
            reqs.append({"prompt": prompt, "prompt_len": int(k), "max_tokens": int(m)})
    times = arrival_times(n, cfg.rate, cfg.burstiness, np.random.default_rng(cfg.seed + 1))
    for r, t in zip(reqs, times, strict=True):
        r["send_at"] = float(t)
    return reqs


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------
async def _models(client, cfg: LoadConfig) -> str:
    import httpx

    try:
        r = await client.get(cfg.base_url + "/models", headers=_headers(cfg))
        r.raise_for_status()
    except httpx.HTTPError as e:  # unreachable, refused, 401, 404...
        raise ValueError(f"cannot list the models at {cfg.base_url}/models ({e}); is the "
                         "server running there (optkit serve), and the URL and API key "
                         "right?") from e
    data = r.json().get("data") or []
    if not data:
        raise ValueError(f"{cfg.base_url}/models lists no models; pass model=")
    return data[0]["id"]


def _headers(cfg: LoadConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


async def _send(client, cfg: LoadConfig, model: str, req: dict, t0: float) -> dict:
    """One streaming request -> its measurements (times in seconds)."""
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"],
            "temperature": cfg.temperature, "stream": True,
            "stream_options": {"include_usage": True}, **(cfg.extra_body or {})}
    if cfg.logprobs:
        body["logprobs"] = 0
    out = {"index": req["index"], "send_at": req["send_at"], "prompt_len": req["prompt_len"],
           "max_tokens": req["max_tokens"], "start_s": None, "ttft_s": None, "e2e_s": None,
           "tpot_s": None, "output_tokens": None, "prompt_tokens": None, "chunks": 0,
           "itl_s": [], "finish_reason": None, "error": None}
    start = time.perf_counter()
    out["start_s"] = start - t0
    first = last = None
    counted = 0
    try:
        async with client.stream("POST", cfg.base_url + "/completions", json=body,
                                 headers=_headers(cfg)) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(obj["error"].get("message", str(obj["error"])))
                now = time.perf_counter()
                if obj.get("usage"):
                    out["output_tokens"] = obj["usage"].get("completion_tokens")
                    out["prompt_tokens"] = obj["usage"].get("prompt_tokens")
                for ch in obj.get("choices") or []:
                    lp = ch.get("logprobs")
                    k = len(lp["tokens"]) if lp and lp.get("tokens") is not None else None
                    if ch.get("finish_reason"):
                        out["finish_reason"] = ch["finish_reason"]
                    if not ch.get("text") and not k:
                        continue
                    k = k or 1
                    counted += k
                    out["chunks"] += 1
                    if first is None:
                        first = now
                    else:
                        out["itl_s"].extend([(now - last) / k] * k)
                    last = now
    except Exception as e:  # recorded per request; the run goes on
        out["error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return out
    end = time.perf_counter()
    if out["output_tokens"] is None:
        out["output_tokens"] = counted
    out["e2e_s"] = end - start
    if first is not None:
        out["ttft_s"] = first - start
        n = out["output_tokens"]
        if n and n > 1:
            out["tpot_s"] = (last - first) / (n - 1)
    return out


async def arun_load(cfg: LoadConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """The coroutine behind :func:`run_load`: (per-request rows, summary row)."""
    import httpx
    from tqdm.auto import tqdm

    reqs = make_requests(cfg)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 30.0))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = cfg.model or await _models(client, cfg)
        sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
        bar = tqdm(total=len(reqs), desc=f"load rate={cfg.rate:g}", unit="req",
                   disable=not progress)
        t0 = time.perf_counter()

        async def one(i: int, req: dict) -> dict:
            delay = req["send_at"] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            req = {**req, "index": i}
            if sem is None:
                res = await _send(client, cfg, model, req, t0)
            else:
                async with sem:
                    res = await _send(client, cfg, model, req, t0)
            bar.update()
            return res

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        duration = time.perf_counter() - t0
        bar.close()
    return results, summarize(results, duration, cfg, model)


def run_load(cfg: LoadConfig | None = None, progress: bool = True,
             **kw) -> tuple[list[dict], dict]:
    """Run one load test (``run_load(url=..., rate=...)`` or ``run_load(LoadConfig(...))``);
    returns (per-request rows, summary row).  Works inside Jupyter's running event loop
    (the test then runs on a thread of its own)."""
    cfg = cfg.replace(**kw) if cfg is not None else LoadConfig(**kw)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun_load(cfg, progress))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, arun_load(cfg, progress)).result()


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
PERCENTILES = (50, 90, 99)


def _stats(name: str, values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], float) * 1e3
    out = {f"{name}_mean_ms": float(v.mean()) if v.size else None}
    for p in PERCENTILES:
        out[f"{name}_p{p}_ms"] = float(np.percentile(v, p)) if v.size else None
    return out


def good(r: dict, cfg: LoadConfig) -> bool:
    """Finished without error and within every SLO that is set (a one-token answer has no
    TPOT and meets that limit)."""
    if r["error"] or r["ttft_s"] is None:
        return False
    for limit, value in ((cfg.slo_ttft_ms, r["ttft_s"]), (cfg.slo_tpot_ms, r["tpot_s"]),
                         (cfg.slo_e2e_ms, r["e2e_s"])):
        if limit is not None and value is not None and 1e3 * value > limit:
            return False
    return True


def summarize(results: list[dict], duration: float, cfg: LoadConfig, model: str = "") -> dict:
    """One row: the config, throughput, latency statistics and goodput."""
    ok = [r for r in results if not r["error"]]
    out_tokens = sum(r["output_tokens"] or 0 for r in ok)
    prompt_tokens = sum((r["prompt_tokens"] if r["prompt_tokens"] is not None
                         else r["prompt_len"]) for r in ok)
    n_good = sum(good(r, cfg) for r in ok)
    row = {
        "load_id": cfg.load_id(), **cfg.to_row(), "served_model": model,
        "completed": len(ok), "failed": len(results) - len(ok),
        "first_error": next((r["error"] for r in results if r["error"]), None),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration,
        "mean_prompt_tokens": prompt_tokens / len(ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        **_stats("ttft", [r["ttft_s"] for r in ok]),
        **_stats("tpot", [r["tpot_s"] for r in ok]),
        **_stats("itl", [x for r in ok for x in r["itl_s"]]),
        **_stats("e2e", [r["e2e_s"] for r in ok]),
        "goodput": n_good / duration, "slo_attainment": n_good / len(results),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **client_environment(),
    }
    return row


def client_environment() -> dict:
    import httpx

    import optkit

    return {"client_host": platform.node(), "python": platform.python_version(),
            "httpx": httpx.__version__, "optkit": optkit.__version__,
            "client_cpu_count": os.cpu_count()}


def request_rows(results: list[dict], summary: dict) -> list[dict]:
    """Per-request rows tagged with their run (``load_id``, ``rate``, ``label``)."""
    return [{"load_id": summary["load_id"], "rate": summary["rate"], "label": summary["label"],
             **r} for r in results]


def run_load_sweep(cfg: LoadConfig, rates: Sequence[float] | None = None,
                   output: str | os.PathLike | Sequence | None = DEFAULT_OUTPUT,
                   requests_output: str | os.PathLike | None = None, resume: bool = True,
                   progress: bool = True):
    """:func:`run_load` at each of ``rates`` (default: ``cfg.rate``); appends one summary row
    per rate to ``output`` (and every request to ``requests_output``); returns the summary
    rows as a DataFrame.  With ``resume``, rates whose ``load_id`` is already in the output
    are read back instead of run again."""
    import pandas as pd

    outputs = [] if output is None else [Path(p) for p in (
        [output] if isinstance(output, str | os.PathLike) else output)]
    done = {}
    if resume and outputs and outputs[0].exists():
        df = read_rows(outputs[0])
        if "load_id" in df:
            done = {str(r["load_id"]): r for r in df.to_dict("records")}
    rows = []
    for rate in (rates if rates is not None else [cfg.rate]):
        c = cfg.replace(rate=rate)
        if c.load_id() in done:
            rows.append(done[c.load_id()])
            continue
        results, summary = run_load(c, progress=progress)
        for p in outputs:
            append_rows([summary], p)
        if requests_output is not None:
            append_rows(request_rows(results, summary), requests_output)
        rows.append(summary)
    return pd.DataFrame(rows)
