"""Sweeps: lists of benchmark configs run one after another, rows appended as they finish.

* :func:`grid` builds the cartesian product of a few axes over a base config;
  :func:`load_sweep` reads the same from a YAML file::

      output: benchmarks/results/sweep.csv   # optional (CLI --output wins)
      base: {model: opt-125m, prompt_len: 32, new_tokens: 32}
      grid: {backend: [jax, facebook], batch_size: [1, 2, 4, 8]}
      cfgs: [{batch_size: 16, label: big}]    # optional extra configs (over base)
      baseline: {backend: facebook}           # optional (see run_sweep)

* :func:`run_sweep` runs each config with :func:`optkit.bench.core.run_benchmark`, appends
  its row to every output file (CSV and/or JSONL) at once and shows a tqdm bar.  Configs
  are reordered so that configs sharing a model run together (each model loads once).
  An interrupted sweep resumes: configs whose ``cfg_id`` already has a successful row in
  the output are skipped (a failed config is recorded with its ``error`` and retried).

Every row also carries its same-run baseline: ``baseline_id``, ``baseline_tokens_per_s``,
``speedup`` (tokens/s over the baseline's) and ``decode_speedup`` (baseline decode step
time over this one's).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optkit.bench.core import BenchConfig, ModelCache, _environment, as_config, cfg_id
from optkit.bench.core import run_benchmark as _run_benchmark
from optkit.bench.results import append_rows, read_rows

DEFAULT_OUTPUT = "benchmarks/results/sweep.csv"


def grid(base: BenchConfig | dict | None = None, **axes: Any) -> list[BenchConfig]:
    """Every combination of ``axes`` (lists; a scalar is one value) over ``base``, the last
    axis varying fastest: ``grid({"model": "opt-tiny"}, batch_size=[1, 2], backend=["jax",
    "facebook"])`` gives 4 configs."""
    base = as_config(base if base is not None else {})
    known = {f.name for f in dataclasses.fields(BenchConfig)}
    unknown = sorted(set(axes) - known)
    if unknown:
        raise ValueError(f"unknown grid axes {unknown}; known: {sorted(known)}")
    values = [v if isinstance(v, list | tuple) else [v] for v in axes.values()]
    for n, v in zip(axes, values, strict=True):
        if not v:
            raise ValueError(f"grid axis {n!r} is empty")
    return [base.replace(**dict(zip(axes, combo, strict=True)))
            for combo in itertools.product(*values)]


@dataclass
class Sweep:
    """A list of configs plus how to compare and where to write (see :func:`load_sweep`)."""

    cfgs: list[BenchConfig]
    baseline: Any = None
    output: str | None = None
    extra: dict = field(default_factory=dict)


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a YAML sweep file (format in the module docstring)."""
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a sweep file is a mapping with base / grid / cfgs keys")
    known = {"base", "grid", "cfgs", "baseline", "output"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    base = data.get("base") or {}
    cfgs = grid(base, **(data.get("grid") or {})) if data.get("grid") else []
    for c in data.get("cfgs") or []:
        cfgs.append(as_config({**base, **c}))
    if not cfgs:
        cfgs = [as_config(base)]
    return Sweep(cfgs, data.get("baseline"), data.get("output"))


def baselines(cfgs: Sequence[BenchConfig], baseline: Any = None) -> list[BenchConfig | None]:
    """Each config's baseline.  ``baseline``: ``None`` -> the first config; an int -> that
    config; a :class:`BenchConfig` -> that one; a dict -> each config with those fields
    replaced (``{"backend": "facebook"}``: HF torch at the same shape; ``{"batch_size": 1}``:
    scaling over batch 1); ``False`` -> no baseline."""
    if baseline is False:
        return [None] * len(cfgs)
    if baseline is None:
        return [cfgs[0]] * len(cfgs)
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        return [cfgs[baseline]] * len(cfgs)
    if isinstance(baseline, BenchConfig):
        return [baseline] * len(cfgs)
    if isinstance(baseline, dict):
        return [c.replace(**baseline) for c in cfgs]
    raise TypeError(f"baseline must be None, False, an index, a BenchConfig or a dict of "
                    f"fields to replace; got {baseline!r}")


def _order(cfgs: list[BenchConfig], bases: list[BenchConfig | None]) -> list[BenchConfig]:
    """Baselines first, then grouped by model (first appearance), duplicates dropped."""
    seen, out = set(), []
    for c in [b for b in bases if b is not None] + list(cfgs):
        if cfg_id(c) not in seen:
            seen.add(cfg_id(c))
            out.append(c)
    groups = list(dict.fromkeys(c.model_key() for c in out))
    return sorted(out, key=lambda c: groups.index(c.model_key()))


def _done_rows(outputs: list[Path]) -> dict[str, dict]:
    """Successful rows already in the first existing output, by cfg_id."""
    for path in outputs:
        if path.exists():
            df = read_rows(path)
            if df.empty or "cfg_id" not in df:
                return {}
            rows = df.to_dict("records")
            return {str(r["cfg_id"]): r for r in rows
                    if not _present(r.get("error")) and _present(r.get("tokens_per_s"))}
    return {}


def _present(v) -> bool:
    return v is not None and v == v and v != ""


def _error_row(cfg: BenchConfig, exc: BaseException) -> dict:
    return {"cfg_id": cfg_id(cfg), **cfg.to_dict(), "model_name": cfg.name,
            "error": f"{type(exc).__name__}: {exc}",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **_environment()}


def _compare(row: dict, base: dict | None, base_id: str | None) -> dict:
    out = {"baseline_id": base_id, "baseline_tokens_per_s": None, "speedup": None,
           "baseline_decode_step_ms": None, "decode_speedup": None}
    if base is None or row.get("error"):
        return out
    tps, btps = row.get("tokens_per_s"), base.get("tokens_per_s")
    step, bstep = row.get("decode_step_ms"), base.get("decode_step_ms")
    out.update(baseline_tokens_per_s=btps, baseline_decode_step_ms=bstep)
    if _present(tps) and _present(btps):
        out["speedup"] = tps / btps
    if _present(step) and _present(bstep) and step:
        out["decode_speedup"] = bstep / step
    return out


def run_sweep(cfgs: Iterable[BenchConfig | dict] | Sweep,
              output: str | os.PathLike | Sequence[str | os.PathLike] | None = DEFAULT_OUTPUT,
              baseline: Any = None, resume: bool = True, progress: bool = True,
              cache: ModelCache | None = None, peaks: dict | str | None = "measure",
              on_error: str = "record", log: Callable[[str], None] | None = None,
              run: Callable[..., dict] | None = None):
    """Run every config; returns a DataFrame with one row per config (baselines included).

    ``output``: one or more ``.csv`` / ``.jsonl`` files rows are appended to (``None``: keep
    rows in memory only).  ``baseline``: see :func:`baselines` (a :class:`Sweep` brings its
    own).  ``resume``: skip configs already measured in the output.  ``on_error``:
    ``"record"`` (a row with ``error``, then go on) or ``"raise"``.  ``run`` replaces
    :func:`~optkit.bench.core.run_benchmark` (same signature).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if isinstance(cfgs, Sweep):
        baseline = cfgs.baseline if baseline is None else baseline
        cfgs = cfgs.cfgs
    cfgs = [as_config(c) for c in cfgs]
    if not cfgs:
        raise ValueError("the sweep has no configs")
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise'; got {on_error!r}")
    outputs = [] if output is None else [Path(p) for p in (
        [output] if isinstance(output, str | os.PathLike) else output)]
    for p in outputs:
        if p.suffix not in (".csv", ".jsonl"):
            raise ValueError(f"sweep outputs end in .csv or .jsonl; got {p}")
    bases = baselines(cfgs, baseline)
    order = _order(cfgs, bases)

    def base_id(c: BenchConfig) -> str | None:
        if isinstance(baseline, dict):  # baselines themselves map to themselves
            return cfg_id(c.replace(**baseline))
        return None if bases[0] is None else cfg_id(bases[0])

    base_of = {cfg_id(c): base_id(c) for c in order}
    done = _done_rows(outputs) if resume else {}
    cache = cache if cache is not None else ModelCache()
    run = run or _run_benchmark
    measured: dict[str, dict] = {}
    bar = tqdm(total=len(order), desc="sweep", unit="cfg", disable=not progress)
    say = log or bar.write

    def measure(c: BenchConfig, depth: int = 0) -> dict:
        cid = cfg_id(c)
        if cid in measured:
            return measured[cid]
        if cid in done:
            measured[cid] = done[cid]
            bar.update()
            return measured[cid]
        bid = base_of.get(cid)
        if bid is not None and bid != cid and bid not in measured and depth == 0:
            pending = next((o for o in order if cfg_id(o) == bid), None)
            if pending is not None:
                measure(pending, depth + 1)
        bar.set_postfix_str(f"{c.name} bs={c.batch_size} in={c.prompt_len} "
                            f"out={c.new_tokens}" + (f" plan={c.plan_text}" if c.plan else ""))
        try:
            row = {**run(c, cache=cache, peaks=peaks), "error": None}
        except Exception as e:
            if on_error == "raise":
                bar.close()
                raise
            row = _error_row(c, e)
            say(f"{c.name} bs={c.batch_size}: failed: {row['error']}")
            if log is None:
                traceback.print_exc()
        row = {**row, **_compare(row, row if bid == cid else measured.get(bid), bid)}
        if not row.get("error"):
            say(f"{c.name} bs={c.batch_size} in={c.prompt_len} out={c.new_tokens}"
                + (f" plan={c.plan_text}" if c.plan else "")
                + f": {row['tokens_per_s']:.1f} tok/s, decode "
                + (f"{row['decode_step_ms']:.2f} ms/step" if row.get("decode_step_ms")
                   else "-")
                + (f", x{row['speedup']:.2f} vs baseline" if row.get("speedup") else ""))
        for p in outputs:
            append_rows([row], p)
        measured[cid] = row
        bar.update()
        return row

    try:
        for c in order:
            measure(c)
    finally:
        bar.close()
    return pd.DataFrame([measured[cfg_id(c)] for c in order if cfg_id(c) in measured])
