"""Result files: rows (flat dicts) appended to ``.csv`` or ``.jsonl``, read back as DataFrames.

A CSV keeps one header: rows with the same columns are appended in place; a row bringing a
new column rewrites the file with the union of columns (old rows get empty cells), written to
a temporary file and renamed, so an interrupted write never truncates earlier results.
Values that are not scalars (lists, dicts) are stored as JSON text in CSV cells.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

SUFFIXES = (".csv", ".jsonl")
#: Hex ids that must stay text (``"123456789012"`` is not a number).
ID_COLUMNS = ("cfg_id", "baseline_id", "load_id")


def _check(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"result files end in .csv or .jsonl; got {path}")


def _cell(v):
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, default=str)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


def append_rows(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Append ``rows`` to ``path`` (``.csv`` or ``.jsonl``; created with parents if new)."""
    path = Path(path)
    _check(path)
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return path
    if path.suffix == ".jsonl":
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
        return path
    columns = list(dict.fromkeys(k for r in rows for k in r))
    header = _header(path)
    if header is not None and set(columns) <= set(header):
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
        return path
    old: list[dict] = []
    if header is not None:
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    fields = list(dict.fromkeys((header or []) + columns))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(old)
        w.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
    tmp.replace(path)
    return path


def _header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def read_rows(path: str | os.PathLike):
    """A results file as a pandas DataFrame (empty if the file does not exist)."""
    import pandas as pd

    path = Path(path)
    _check(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={c: str for c in ID_COLUMNS})
    df = pd.read_json(path, lines=True, dtype=False)
    return df.astype({c: str for c in ID_COLUMNS if c in df})
