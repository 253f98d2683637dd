"""Read ``torch.save`` checkpoints lazily and safely: metadata now, tensor bytes on demand.

A zip-format torch file (every torch >= 1.6 writes one) is an uncompressed zip archive holding
``{archive}/data.pkl`` (the pickled object, tensors as persistent ids naming storages) and one
record ``{archive}/data/{key}`` per storage.  :func:`load` unpickles ``data.pkl`` and turns
every tensor into a :class:`LazyTensor` that knows its file, byte offset, dtype and shape; its
data is read later with positional reads straight into the caller's buffer.

Why not ``torch.load(mmap=True, weights_only=False)``:

* memory: pages of a mapped file count towards the process RSS until it is unmapped, and a
  992-file conversion touches every byte once, so a long-lived mapping grows the RSS to the
  model size; plain reads go through the (reclaimable) page cache only;
* safety: Metaseq files pickle ``argparse.Namespace`` configs and possibly metaseq-only or
  OmegaConf classes; ``weights_only=False`` would execute arbitrary pickled callables and
  need metaseq installed, ``weights_only=True`` refuses the files.  The restricted unpickler
  here builds only plain containers, Namespaces and numpy scalars; any other class becomes an
  inert :class:`Opaque` record of its name and state.

Legacy (pre-zip) torch files are refused with a clear error.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import functools
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from optkit.weights.folder import WeightError

_STORAGE_DTYPES = {
    "HalfStorage": "float16", "FloatStorage": "float32", "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_READ_CHUNK = 1 << 30  # Linux read() returns at most ~2 GiB at a time


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class LazyTensor:
    """A tensor stored in a torch file, not yet read."""

    __slots__ = ("path", "offset", "dtype", "shape", "stride", "storage_bytes")

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...],
                 stride: tuple[int, ...], storage_bytes: int):
        self.path, self.offset, self.dtype = path, offset, dtype
        self.shape, self.stride, self.storage_bytes = shape, stride, storage_bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        expect, ok = 1, True
        for size, st in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and st != expect:
                ok = False
            expect *= size
        return ok

    def __repr__(self) -> str:
        return f"LazyTensor({self.path.name}@{self.offset}, {self.dtype}, {self.shape})"

    def read_into(self, out: np.ndarray, start: int = 0) -> np.ndarray:
        """Fill the 1-D contiguous ``out`` with flattened elements ``[start, start+out.size)``."""
        if out.dtype != self.dtype or out.ndim != 1 or not out.flags.c_contiguous:
            raise ValueError("read_into needs a contiguous 1-D buffer of the tensor's dtype")
        if start < 0 or start + out.size > self.numel:
            raise ValueError(f"elements [{start}, {start + out.size}) outside {self.shape}")
        if not self.is_contiguous:
            out[:] = self.numpy().reshape(-1)[start:start + out.size]
            return out
        buf = memoryview(out.view(np.uint8))
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset + start * self.dtype.itemsize)
                done = 0
                while done < len(buf):
                    n = f.readinto(buf[done:done + _READ_CHUNK])
                    if not n:
                        raise WeightError(f"truncated checkpoint file {self.path}: {self} "
                                          f"ends past the end of the file")
                    done += n
        except FileNotFoundError:
            raise WeightError(f"missing checkpoint file {self.path}") from None
        except OSError as e:
            raise WeightError(f"cannot read checkpoint file {self.path}: {e}") from None
        return out

    def numpy(self) -> np.ndarray:
        """The whole tensor as a new array (any strides)."""
        if self.is_contiguous:
            return self.read_into(np.empty(self.numel, self.dtype)).reshape(self.shape)
        span = 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride, strict=True))
        raw = LazyTensor(self.path, self.offset, self.dtype, (span,), (1,), self.storage_bytes)
        flat = raw.read_into(np.empty(span, self.dtype))
        item = self.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat, self.shape, [s * item for s in self.stride])
        return np.array(view)


class Opaque:
    """Stand-in for a pickled object of a class the safe reader does not construct."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items = args, None, {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.items[len(self.items)] = value

    def extend(self, values):
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


@functools.cache
def _opaque_class(module: str, name: str) -> type:
    return type(name, (Opaque,), {"qualname": f"{module}.{name}"})


def plain(obj: Any) -> Any:
    """Best effort: an OmegaConf ``DictConfig`` (kept :class:`Opaque`) as a plain dict."""
    if isinstance(obj, Opaque) and isinstance(obj.state, dict):
        state = obj.state
        if "_content" in state:
            content = state["_content"]
            if isinstance(content, dict):
                return {k: plain(v) for k, v in content.items()}
            return plain(content)
        if "_val" in state:
            return plain(state["_val"])
        return {k: plain(v) for k, v in state.items()}
    return obj


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np_dtype(_STORAGE_DTYPES[name])


_SAFE = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): lambda s, enc="utf-8": s.encode(enc),
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray, ("builtins", "object"): object,
    ("numpy", "dtype"): np.dtype,
}
try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _SAFE[(_mod, "scalar")] = _np_scalar
    _SAFE[(_mod, "_reconstruct")] = _np_reconstruct
_SAFE[("numpy", "ndarray")] = np.ndarray


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, path: Path, records: dict[str, tuple[int, int]]):
        super().__init__(f)
        self.path, self.records = path, records

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 (Python 2) names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return lambda st, off, size, stride, rg, hooks, dtype, meta=None: \
                self._rebuild_tensor(st, off, size, stride)
        if module == "torch._utils" and name in ("_rebuild_parameter",
                                                  "_rebuild_parameter_with_state"):
            return lambda data, *rest: data
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda func, new_type, args, state: func(*args)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and not name[:1].isupper():
            return f"torch.{name}"  # dtypes, layouts, devices: recorded by name
        return _opaque_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise WeightError(f"{self.path}: unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        else:  # UntypedStorage: bytes
            dtype = np.dtype(np.uint8)
        if key not in self.records:
            raise WeightError(f"corrupt checkpoint file {self.path}: storage {key} is missing")
        offset, size = self.records[key]
        if size < numel * dtype.itemsize:
            raise WeightError(f"corrupt checkpoint file {self.path}: storage {key} holds {size} "
                              f"bytes, {numel * dtype.itemsize} expected")
        return (offset, dtype, size)

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *rest):
        offset, dtype, nbytes = storage
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        t = LazyTensor(self.path, offset + int(storage_offset) * dtype.itemsize, dtype, size,
                       stride, nbytes)
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1
        if math.prod(size) and last * dtype.itemsize > nbytes:
            raise WeightError(f"corrupt checkpoint file {self.path}: a tensor of shape {size} "
                              f"runs past the end of its storage")
        return t


def _record_offsets(path: Path, zf: zipfile.ZipFile) -> tuple[str, dict[str, tuple[int, int]]]:
    """(archive prefix, storage key -> (absolute data offset, size)) of a torch zip file."""
    pkl = [i for i in zf.infolist() if i.filename.endswith("data.pkl")]
    if len(pkl) != 1:
        raise WeightError(f"{path} is not a torch checkpoint (no unique data.pkl in the zip)")
    prefix = pkl[0].filename[: -len("data.pkl")]
    records = {}
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        for info in zf.infolist():
            if not info.filename.startswith(prefix + "data/"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise WeightError(f"{path}: record {info.filename} is compressed; torch writes "
                                  "stored records")
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise WeightError(f"corrupt checkpoint file {path}: bad zip header of "
                                  f"{info.filename}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + name_len + extra_len
            if offset + info.file_size > file_size:
                raise WeightError(f"truncated checkpoint file {path}: record {info.filename} "
                                  f"ends past the end of the file")
            records[info.filename[len(prefix) + len("data/"):]] = (offset, info.file_size)
    return prefix, records


def load(path: str | os.PathLike) -> Any:
    """The object saved in torch file ``path``, with :class:`LazyTensor` for every tensor."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            prefix, records = _record_offsets(path, zf)
            byteorder = prefix + "byteorder"
            if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
                raise WeightError(f"{path} was saved on a big-endian machine; not supported")
            with zf.open(prefix + "data.pkl") as f:
                return _Unpickler(f, path, records).load()
    except FileNotFoundError:
        raise WeightError(f"missing checkpoint file {path}") from None
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] == b"\x80\x02" or magic[:1] == b"\x80":
            raise WeightError(f"{path} is a legacy (pre-zip) torch file; re-save it with "
                              "torch>=1.6 to convert it") from None
        raise WeightError(f"corrupt or truncated checkpoint file {path}: {e}") from None
    except WeightError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, zipfile.LargeZipFile, OSError) as e:
        raise WeightError(f"corrupt checkpoint file {path}: {type(e).__name__}: {e}") from None
