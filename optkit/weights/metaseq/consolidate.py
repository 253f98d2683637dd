"""Glue model-parallel parts into folder tensors, one tensor at a time (spec §1.7).

:func:`plan` maps every folder key to an :class:`Assembly`: which metaseq tensor it comes
from (via the declarative key map, which also picks the K, V or Q third of a fused
``qkv_proj``), along which dim the parts are concatenated (``format.MP_RULES``) and the
resulting shape.  :meth:`Assembly.read` allocates the output once and reads each part's
bytes straight into place (a part-sized buffer only for tensors glued along dim 1), so the
memory a tensor needs is about its own size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from optkit.weights.folder import WeightError
from optkit.weights.keymap import map_source_keys
from optkit.weights.layout import folder_shapes
from optkit.weights.metaseq.format import split_dim
from optkit.weights.metaseq.reader import MetaseqCheckpoint, PartTensor

log = logging.getLogger(__name__)

POSITIONS = "decoder.embed_positions.weight"


@dataclasses.dataclass(frozen=True)
class Assembly:
    """How one folder tensor is built from the model-parallel parts."""

    folder_key: str
    src_key: str
    third: int | None  # K=0, V=1, Q=2 third of a fused qkv, or None
    dim: int | None  # concatenation dim, None = every part holds it whole
    pieces: tuple[PartTensor, ...]  # one per part

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = self.pieces[0].shape
        if self.third is None:
            return shape
        return (shape[0] // 3, *shape[1:])

    @property
    def local_start(self) -> int:
        """First element of the (third of the) part tensor."""
        return 0 if self.third is None else self.third * math.prod(self.local_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.local_shape)
        if self.dim is not None:
            shape[self.dim] *= len(self.pieces)
        return tuple(shape)

    @property
    def dtype(self) -> np.dtype:
        return self.pieces[0].dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(f for p in self.pieces for f in p.files))

    def read(self) -> np.ndarray:
        """The glued tensor (fresh memory, source dtype)."""
        out = np.empty(self.shape, self.dtype)
        n, start = math.prod(self.local_shape), self.local_start
        if self.dim == 0 or len(self.pieces) == 1:
            flat = out.reshape(-1)
            for p, piece in enumerate(self.pieces):
                piece.read_into(flat[p * n:(p + 1) * n], start)
        elif self.dim == 1:
            tmp = np.empty(n, self.dtype)
            cols = self.local_shape[1]
            for p, piece in enumerate(self.pieces):
                out[:, p * cols:(p + 1) * cols] = piece.read_into(tmp, start).reshape(
                    self.local_shape)
        else:  # replicated: take part 0, report parts that disagree
            self.pieces[0].read_into(out.reshape(-1), start)
            tmp = np.empty(n, self.dtype)
            differ = [p for p, piece in enumerate(self.pieces[1:], 1)
                      if not np.array_equal(piece.read_into(tmp, start), out.reshape(-1),
                                            equal_nan=True)]
            if differ:
                log.warning("%s: model-parallel part(s) %s differ from part 0 (%s); using "
                            "part 0", self.folder_key, differ, self.pieces[0].files[0])
        return out

    def locate(self, index: int) -> Path:
        """The shard file holding element ``index`` (flat, C order) of the glued tensor."""
        pos = np.unravel_index(index, self.shape)
        local = list(pos)
        part = 0
        if self.dim is not None:
            size = self.local_shape[self.dim]
            part, local[self.dim] = divmod(int(pos[self.dim]), size)
        flat = int(np.ravel_multi_index(local, self.local_shape))
        return self.pieces[part].locate(self.local_start + flat)


def plan(ckpt: MetaseqCheckpoint) -> dict[str, Assembly]:
    """Folder key -> Assembly for every tensor of ``ckpt.config``; raises WeightError naming
    the tensor and a file on any missing, unknown or misshapen tensor."""
    cfg = ckpt.config
    part0 = ckpt.parts[0]
    try:
        mapping = map_source_keys("metaseq", list(part0))
    except ValueError as e:
        raise WeightError(f"{ckpt.files[0][0]}: {e}") from None
    expected = folder_shapes(cfg)
    out: dict[str, Assembly] = {}
    for key, (src_key, third) in mapping.items():
        pieces = tuple(part[src_key] for part in ckpt.parts)
        if third is not None and pieces[0].shape[0] % 3:
            raise WeightError(f"{pieces[0].files[0]}: fused {src_key} has {pieces[0].shape[0]} "
                              "rows, not a multiple of 3")
        a = Assembly(key, src_key, third, split_dim(src_key) if len(pieces) > 1 else None, pieces)
        if key not in expected:
            raise WeightError(f"shape mismatch: {src_key} in {a.files[0]} has no place in "
                              f"{cfg.name} ({_short(cfg)}); wrong --model?")
        want = expected[key]
        ok = a.shape == want or (key == POSITIONS and len(a.shape) == 2 and
                                 a.shape[1] == want[1] and a.shape[0] >= want[0])
        if not ok:
            raise WeightError(f"shape mismatch: {key} assembled from {src_key} in "
                              f"{a.files[0]}{' ...' if len(a.files) > 1 else ''} has shape "
                              f"{a.shape}; {cfg.name} ({_short(cfg)}) needs {want}")
        out[key] = a
    missing = [k for k in expected if k not in out]
    if missing:
        raise WeightError(f"{ckpt.files[0][0]}: the checkpoint lacks {len(missing)} tensor(s) "
                          f"of {cfg.name} (first: {missing[0]})")
    return {k: out[k] for k in expected}


def _short(cfg) -> str:
    return (f"L={cfg.num_hidden_layers} H={cfg.hidden_size} F={cfg.ffn_dim} "
            f"V={cfg.vocab_size} E={cfg.word_embed_proj_dim}")


# --------------------------------------------------------------------------------------------
# Extreme values (metaseq issue #122: part-5 shard51 layer 15 fc1 holds values ~5e4)
# --------------------------------------------------------------------------------------------
_CHUNK = 1 << 22


def find_extremes(arr: np.ndarray, threshold: float) -> tuple[int, int, float]:
    """(count, first flat index, max |x|) of non-finite values or values with |x| > threshold.

    Compares the IEEE bit patterns with the sign masked off (monotonic in |x|; NaN and inf
    sort above every finite value), a fast integer pass without float temporaries.
    """
    flat = arr.reshape(-1)
    uint = np.dtype(f"uint{8 * arr.dtype.itemsize}")
    magnitude = uint.type(np.iinfo(uint).max >> 1)
    limit = np.array(threshold, arr.dtype).view(uint)
    count, first, peak = 0, -1, 0.0
    for s in range(0, flat.size, _CHUNK):
        bits = flat[s:s + _CHUNK].view(uint) & magnitude
        if bits.size == 0 or bits.max() <= limit:
            continue
        bad = bits > limit
        if first < 0:
            first = s + int(np.argmax(bad))
        count += int(bad.sum())
        values = np.abs(flat[s:s + _CHUNK][bad].astype(np.float32))
        peak = max(peak, float(values.max()) if np.isfinite(values).all() else float("inf"))
    return count, first, peak


def clamp(arr: np.ndarray, threshold: float) -> None:
    """Clip to [-threshold, threshold] in place (NaN -> 0), chunk by chunk."""
    flat = arr.reshape(-1)
    for s in range(0, flat.size, _CHUNK):
        block = flat[s:s + _CHUNK]
        np.nan_to_num(block, copy=False, nan=0.0, posinf=threshold, neginf=-threshold)
        np.clip(block, -threshold, threshold, out=block)
