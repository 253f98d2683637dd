"""Alpa's numpy weight folder: one ``np.save`` file per tensor, named by its state-dict key.

Files have no ``.npy`` extension (Alpa writes them through an open file handle).  optkit adds
two optional files that Alpa ignores: ``config.json`` (an HF-style OPT config, which takes
precedence over the preset chosen by name) and ``optkit-manifest.json`` (dtype and a sha256
per file).  Writers build the folder under a temporary name and rename it into place, so a
crash never leaves a folder that looks complete; re-running resumes from a journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from optkit.config import OPTConfig, canonical_name

MANIFEST = "optkit-manifest.json"
CONFIG = "config.json"
JOURNAL = ".optkit-journal.jsonl"
_NOT_TENSORS = {MANIFEST, CONFIG, JOURNAL}


class WeightError(ValueError):
    """A weight file or folder is missing, truncated, corrupt or has the wrong shape."""


def folder_path(path: str | os.PathLike, name: str) -> Path:
    """``{path}/{name}-np`` for a model name such as ``alpa/opt-2.7b`` (or ``path`` itself
    when it already is a weight folder)."""
    path = Path(path)
    if is_weight_folder(path):
        return path
    short = name.split("/")[-1]
    candidates = [path / f"{short}-np", path / f"{canonical_name(short)}-np"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def is_weight_folder(path: Path) -> bool:
    return path.is_dir() and (path / "decoder.embed_tokens.weight").is_file()


def read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an ``np.save`` file, checking it is not truncated."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                shape, fortran, dtype = np.lib.format._read_array_header(f, version)
            offset = f.tell()
    except FileNotFoundError:
        raise WeightError(f"missing weight file {path}") from None
    except Exception as e:  # numpy raises ValueError/EOFError on garbage headers
        raise WeightError(f"corrupt weight file {path}: not a numpy array file ({e})") from None
    if fortran:
        raise WeightError(f"weight file {path} is Fortran-ordered; expected C order")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise WeightError(f"truncated weight file {path}: {actual} bytes, header promises "
                          f"{expected} for shape {tuple(shape)} {dtype}")
    if actual > expected:
        raise WeightError(f"corrupt weight file {path}: {actual - expected} trailing bytes")
    return tuple(int(s) for s in shape), dtype, offset


def write_tensor(folder: Path, key: str, array: np.ndarray) -> None:
    """Write one tensor exactly as Alpa does: ``np.save`` through a handle, no extension."""
    with open(Path(folder) / key, "wb") as f:
        np.save(f, np.ascontiguousarray(array))


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FolderStore(Mapping):
    """Read-only mapping folder key -> memory-mapped array of an Alpa-layout folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise WeightError(f"weight folder {self.path} does not exist")
        self._cache: dict[str, np.ndarray] = {}
        self.manifest = None
        if (self.path / MANIFEST).is_file():
            try:
                self.manifest = json.loads((self.path / MANIFEST).read_text())
            except json.JSONDecodeError as e:
                raise WeightError(f"corrupt manifest {self.path / MANIFEST}: {e}") from None

    def config(self) -> OPTConfig | None:
        """The folder's own ``config.json``, if it has one."""
        p = self.path / CONFIG
        return OPTConfig.from_json(p) if p.is_file() else None

    def keys_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()
                      if p.is_file() and p.name not in _NOT_TENSORS and not p.name.startswith("."))

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            path = self.path / key
            shape, dtype, offset = read_header(path)
            self._cache[key] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_on_disk())

    def __len__(self) -> int:
        return len(self.keys_on_disk())

    def check(self, expected: Mapping[str, tuple[int, ...]], checksums: bool = False) -> None:
        """Raise :class:`WeightError` naming the first missing, truncated, misshapen or
        (with ``checksums`` and a manifest) corrupt file."""
        for key, shape in expected.items():
            path = self.path / key
            got, dtype, _ = read_header(path)
            if not np.issubdtype(dtype, np.floating):
                raise WeightError(f"weight file {path} has dtype {dtype}; expected a float type")
            if key == "decoder.embed_positions.weight" and len(got) == 2:
                if got[1] == shape[1] and got[0] >= shape[0]:
                    continue  # Alpa allows longer position tables and truncates them
            if got != tuple(shape):
                raise WeightError(f"weight file {path} has shape {got}; expected {tuple(shape)}")
        if checksums:
            if self.manifest is None:
                raise WeightError(f"{self.path} has no {MANIFEST}; cannot verify checksums")
            for key, info in self.manifest["files"].items():
                digest = sha256_file(self.path / key)
                if digest != info["sha256"]:
                    raise WeightError(f"corrupt weight file {self.path / key}: sha256 {digest} "
                                      f"does not match the manifest's {info['sha256']}")

    def nbytes(self) -> int:
        return sum((self.path / k).stat().st_size for k in self.keys_on_disk())


class FolderWriter:
    """Write a weight folder atomically and resumably.

    Tensors go to ``{dst}.partial/``; each finished file is recorded in a journal with its
    sha256, so an interrupted conversion skips the tensors already written and verified.
    :meth:`commit` writes ``config.json`` and the manifest, then renames the folder into place.
    """

    def __init__(self, dst: str | os.PathLike, config: OPTConfig, overwrite: bool = False):
        self.dst = Path(dst)
        self.config = config
        if self.dst.exists():
            if not overwrite:
                raise FileExistsError(f"{self.dst} already exists (pass overwrite=True / "
                                      "--overwrite to replace it)")
        self.tmp = self.dst.with_name(self.dst.name + ".partial")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.overwrite = overwrite
        self.files: dict[str, dict] = {}
        self._load_journal()

    def _load_journal(self) -> None:
        journal = self.tmp / JOURNAL
        if not journal.is_file():
            return
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            self.files[entry["key"]] = entry

    def done(self, key: str, shape: tuple[int, ...] | None = None) -> bool:
        """True when ``key`` was written in an earlier run and its file still verifies."""
        entry = self.files.get(key)
        if entry is None:
            return False
        path = self.tmp / key
        try:
            got, dtype, _ = read_header(path)
        except WeightError:
            return False
        if shape is not None and tuple(got) != tuple(shape):
            return False
        if tuple(got) != tuple(entry["shape"]) or sha256_file(path) != entry["sha256"]:
            return False
        return True

    def write(self, key: str, array: np.ndarray) -> None:
        path = self.tmp / key
        tmp = path.with_name(path.name + ".tmp")
        write_tensor(tmp.parent, tmp.name, array)
        os.replace(tmp, path)
        entry = {"key": key, "shape": list(array.shape), "dtype": str(array.dtype),
                 "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        self.files[key] = entry
        with open(self.tmp / JOURNAL, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def commit(self, expected: Mapping[str, tuple[int, ...]], source: str = "") -> Path:
        """Check every expected tensor is present with its shape, then rename into place."""
        missing = [k for k in expected if k not in self.files]
        if missing:
            raise WeightError(f"conversion incomplete: {len(missing)} tensors missing "
                              f"(first: {missing[0]})")
        store = FolderStore(self.tmp)
        store.check(expected)
        self.config.save_json(self.tmp / CONFIG)
        dtypes = sorted({e["dtype"] for e in self.files.values()})
        manifest = {"format": "alpa-numpy", "writer": "optkit", "source": source,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "config": self.config.to_hf_dict(), "dtype": dtypes,
                    "files": {k: {x: e[x] for x in ("shape", "dtype", "bytes", "sha256")}
                              for k, e in sorted(self.files.items())}}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        (self.tmp / JOURNAL).unlink(missing_ok=True)
        if self.dst.exists():
            shutil.rmtree(self.dst)
        os.replace(self.tmp, self.dst)
        return self.dst

    def abort(self) -> None:
        """Remove the partial folder (used when the inputs themselves are bad)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
