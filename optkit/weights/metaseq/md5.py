"""Meta's md5 sums files (``opt175b_md5sum_shards.csv``): read, write and verify.

Format (spec §1.1): header ``shard,md5sum``, then ``<file name>,<32 lowercase hex>`` rows in
lexicographic order of the names, CRLF line ends, no newline after the last row.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from optkit.weights.folder import WeightError

log = logging.getLogger(__name__)

HEADER = "shard,md5sum"
_CHUNK = 1 << 24


def md5_file(path: Path, bar: tqdm | None = None) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


def write_md5_csv(path: str | os.PathLike, files: Iterable[Path]) -> Path:
    """Write the sums of ``files`` in Meta's format."""
    path = Path(path)
    rows = [f"{f.name},{md5_file(f)}" for f in sorted(files, key=lambda f: f.name)]
    path.write_bytes("\r\n".join([HEADER, *rows]).encode())
    return path


def read_md5_csv(path: str | os.PathLike) -> dict[str, str]:
    """File name -> md5 of a sums file (CRLF or LF, with or without a final newline)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise WeightError(f"cannot read md5 sums file {path}: {e}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].replace(" ", "").lower() != HEADER:
        raise WeightError(f"{path} is not an md5 sums file: first line must be {HEADER!r}")
    sums = {}
    for n, line in enumerate(lines[1:], 2):
        name, _, digest = line.partition(",")
        digest = digest.strip().lower()
        if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            raise WeightError(f"{path} line {n}: {line!r} is not '<file>,<md5>'")
        sums[name.strip()] = digest
    return sums


def verify_md5(sums_file: str | os.PathLike, files: Iterable[Path], progress: bool = True,
               workers: int = 2) -> None:
    """Check ``files`` against a sums file; raise :class:`WeightError` naming the first file
    that is listed but missing or whose md5 differs.  Files the list lacks are reported."""
    sums = read_md5_csv(sums_file)
    files = list(files)
    by_name = {f.name: f for f in files}
    missing = sorted(set(sums) - set(by_name))
    if missing:
        folder = files[0].parent if files else Path(".")
        raise WeightError(f"missing checkpoint file {folder / missing[0]} (listed in "
                          f"{sums_file}" + (f", with {len(missing) - 1} more)" if len(missing) > 1
                                            else ")"))
    unlisted = sorted(set(by_name) - set(sums))
    if unlisted:
        log.warning("%d file(s) are not listed in %s and are not verified (first: %s)",
                    len(unlisted), sums_file, unlisted[0])
    todo = [by_name[n] for n in sorted(sums)]
    total = sum(f.stat().st_size for f in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc="md5", disable=not progress) as bar:
        with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL
            for f, digest in zip(todo, pool.map(lambda f: md5_file(f, bar), todo), strict=True):
                if digest != sums[f.name]:
                    raise WeightError(f"md5 mismatch for checkpoint file {f}: {digest}, "
                                      f"{sums_file} says {sums[f.name]} (corrupt or "
                                      "incomplete download)")
