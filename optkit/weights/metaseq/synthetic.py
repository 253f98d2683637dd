"""Write synthetic Metaseq OPT checkpoints in each released layout (spec §6).

:func:`write_synthetic_metaseq` splits a model's weights (random ones by default, the same
tensors :func:`optkit.weights.random.random_state_dict` gives, hence the same as the test
suite's HF reference model; or any folder-keyed mapping such as a converted folder) into
Megatron model-parallel parts, flattens and FSDP-shards them exactly as metaseq/fairscale
did, and saves each file with ``torch.save`` under Meta's file names and dict keys:

* ``fsdp``: ``{prefix}-model_part-{p}-shard{r}.pt`` with ``cfg``, ``model`` (``flat_param_0``,
  ``decoder.layers.{i}.flat_param_0``, ``decoder.version``), ``criterion``,
  ``optimizer_history``, ``task_state``, ``extra_state`` and ``shard_metadata`` (each rank's own
  padding; trailing ranks may hold only padding);
* ``v1_20220502``: ``reshard-model_part-{p}.pt`` (``reshard.pt`` for one part, as 350m) with
  unsharded flat parameters and no ``shard_metadata``;
* ``v1_20230405``: ``reshard-model_part-{p}.pt`` with unflattened tensors, the part-local fused
  ``qkv_proj`` ([K_p; V_p; Q_p]), ``args`` and rank 0's ``shard_metadata``;
* ``consolidated``: ``restored.pt``, one unflattened state dict (fused qkv, or split with
  ``split_qkv``, as Alpa's consolidation writes it).

It streams: each file's tensors are gathered chunk by chunk from the source weights into one
buffer (on disk for files over ``buffer_bytes``), so writing never holds the whole model.
Random weights of models over 512 MB are first written to a temporary weight folder.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from optkit.config import OPTConfig
from optkit.weights.folder import FolderStore
from optkit.weights.keymap import map_key
from optkit.weights.metaseq.format import (
    SHARED_PARAMS,
    VERSION_KEY,
    FlatInstance,
    cfg_namespace,
    check_parallel,
    flat_layout,
    shard_sizes,
    split_dim,
)
from optkit.weights.metaseq.md5 import write_md5_csv

SYNTHETIC_LAYOUTS = ("fsdp", "v1_20220502", "v1_20230405", "consolidated")
MD5_FILE = "md5sum_shards.csv"
_CHUNK = 1 << 23  # elements copied per step
#: Random reference weights up to this size are generated in memory, larger ones are
#: written to a temporary weight folder first.
IN_MEMORY_BYTES = 1 << 29
_ALIGN = 64


# --------------------------------------------------------------------------------------------
# One part-local tensor, read lazily from folder-keyed weights
# --------------------------------------------------------------------------------------------
class _Local:
    """Part ``p`` of metaseq tensor ``key``: row blocks of the source weights (views)."""

    def __init__(self, weights: Mapping[str, np.ndarray], key: str, part: int, parts: int):
        targets = sorted(map_key("metaseq", key) or [], key=lambda t: t.part or 0)
        if not targets:
            raise KeyError(key)
        d = split_dim(key) if parts > 1 else None
        self.blocks = []
        for t in targets:
            a = weights[t.folder_key]
            if d is not None:
                n = a.shape[d] // parts
                a = a[(slice(None),) * d + (slice(part * n, (part + 1) * n),)]
            self.blocks.append(a)
        self.shape = (sum(b.shape[0] for b in self.blocks), *self.blocks[0].shape[1:])
        self.numel = math.prod(self.shape)

    def fill(self, out: np.ndarray, start: int) -> None:
        """Copy flattened elements ``[start, start + out.size)`` into ``out``."""
        stop, pos = start + out.size, 0
        for b in self.blocks:
            lo, hi = max(start, pos), min(stop, pos + b.size)
            if lo < hi:
                _copy_range(b, lo - pos, hi - pos, out[lo - start:hi - start])
            pos += b.size


def _copy_range(b: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
    if b.ndim <= 1:
        out[:] = b[start:stop]
        return
    cols = math.prod(b.shape[1:])
    pos = start
    while pos < stop:
        r0 = pos // cols
        r1 = min(-(-stop // cols), r0 + max(1, _CHUNK // cols))
        rows = np.asarray(b[r0:r1]).reshape(-1)
        lo, hi = pos - r0 * cols, min(stop, r1 * cols) - r0 * cols
        out[pos - start:pos - start + hi - lo] = rows[lo:hi]
        pos += hi - lo


class _Flat:
    """The flat parameter of one FSDP instance of one part: its tensors concatenated."""

    def __init__(self, weights, inst: FlatInstance, part: int, parts: int):
        self.inst = inst
        self.locals = [_Local(weights, inst.key(n), part, parts) for n in inst.names]
        for loc, shape in zip(self.locals, inst.shapes, strict=True):
            if loc.shape != shape:
                raise ValueError(f"{inst.fsdp_path}: source gives {loc.shape}, layout {shape}")
        self.numel = inst.numel

    def fill(self, out: np.ndarray, start: int) -> None:
        stop, pos = start + out.size, 0
        for loc in self.locals:
            lo, hi = max(start, pos), min(stop, pos + loc.numel)
            if lo < hi:
                loc.fill(out[lo - start:hi - start], lo - pos)
            pos += loc.numel


# --------------------------------------------------------------------------------------------
# Saving one file
# --------------------------------------------------------------------------------------------
Filler = Callable[[np.ndarray], None]


def _save(path: Path, tensors: list[tuple[str, tuple[int, ...], np.dtype, Filler]],
          make: Callable[[dict], dict], buffer_bytes: int) -> None:
    """Gather ``tensors`` into one buffer (a file if large) and ``torch.save(make(model))``."""
    import torch

    offsets, total = [], 0
    for _, shape, dtype, _ in tensors:
        offsets.append(total)
        total += -(-math.prod(shape) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
    scratch = path.with_name(path.name + ".buffer")
    if total > buffer_bytes:
        buf = np.memmap(scratch, np.uint8, "w+", shape=(total,))
    else:
        buf = np.empty(max(total, 1), np.uint8)
    model = {}
    for (name, shape, dtype, fill), off in zip(tensors, offsets, strict=True):
        n = math.prod(shape)
        region = buf[off:off + n * np.dtype(dtype).itemsize].view(dtype)
        fill(region)
        model[name] = torch.from_numpy(region).view(shape)
    model[VERSION_KEY] = torch.tensor([3.0])
    tmp = path.with_name(path.name + ".tmp")
    torch.save(make(model), tmp)
    os.replace(tmp, path)
    del model, region, buf
    scratch.unlink(missing_ok=True)


def _filler(source, start: int, count: int) -> Filler:
    def fill(out):
        source.fill(out[:count], start)
        out[count:] = 0
    return fill


def _checkpoint_cfg(cfg: OPTConfig, parts: int, dtype: np.dtype, sharded: bool,
                    arch: str = "transformer_lm_megatron") -> dict:
    fp16 = np.dtype(dtype) == np.float16
    return {"common": {"fp16": fp16, "memory_efficient_fp16": fp16},
            "distributed_training": {"use_sharded_state": sharded},
            "model": cfg_namespace(cfg, parts, arch)}


_HISTORY = [{"criterion_name": "VocabParallelCrossEntropyCriterion",
             "optimizer_name": "MemoryEfficientFP16Optimizer",
             "lr_scheduler_state": {"best": None}, "num_updates": 0}]
_EXTRA = {"metrics": {}, "previous_training_time": 0.0,
          "train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True}}


def shard_metadata(layout: list[FlatInstance], paddings: list[int]) -> dict:
    """fairscale's ``local_metadata_dict`` for one rank (spec §1.4)."""
    return {
        "param_metadata": [
            {"fsdp_path": inst.fsdp_path,
             "params": {"flat_param_0": {"names": list(inst.names),
                                         "shapes": [tuple(s) for s in inst.shapes],
                                         "numels": list(inst.numels), "padding": pad}},
             "no_broadcast_optim_state": False,
             "shared_param_info": list(SHARED_PARAMS) if not inst.fsdp_path else []}
            for inst, pad in zip(layout, paddings, strict=True)],
        "buffer_names": [VERSION_KEY],
    }


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------
def _fsdp_files(weights, cfg, parts, shards, dtype, prefix):
    layout = flat_layout(cfg, parts)
    for p in range(parts):
        flats = [_Flat(weights, inst, p, parts) for inst in layout]
        for r in range(shards):
            tensors, paddings = [], []
            for inst, flat in zip(layout, flats, strict=True):
                c, real = shard_sizes(inst.numel, shards)
                paddings.append(c - real[r])
                tensors.append((inst.flat_key, (c,), dtype, _filler(flat, r * c, real[r])))
            meta = shard_metadata(layout, paddings)

            def make(model, meta=meta):
                return {"cfg": _checkpoint_cfg(cfg, parts, dtype, True), "model": model,
                        "criterion": {}, "optimizer_history": _HISTORY, "task_state": {},
                        "extra_state": _EXTRA, "shard_metadata": meta}
            yield f"{prefix}-model_part-{p}-shard{r}.pt", tensors, make


def _part_name(parts: int, p: int, single: str | None) -> str:
    return single if parts == 1 and single else f"reshard-model_part-{p}.pt"


def _v2022_files(weights, cfg, parts, dtype):
    layout = flat_layout(cfg, parts)
    for p in range(parts):
        tensors = [(inst.flat_key, (inst.numel,), dtype,
                    _filler(_Flat(weights, inst, p, parts), 0, inst.numel)) for inst in layout]

        def make(model):
            model[VERSION_KEY] = model[VERSION_KEY].to(model["flat_param_0"].dtype)  # .half()
            return {"cfg": _checkpoint_cfg(cfg, parts, dtype, False), "model": model,
                    "criterion": {}, "optimizer_history": _HISTORY, "task_state": {},
                    "extra_state": _EXTRA}
        yield _part_name(parts, p, "reshard.pt"), tensors, make


def _unflat_files(weights, cfg, parts, dtype, layout_name, split_qkv):
    layout = flat_layout(cfg, parts)
    for p in range(parts):
        tensors = []
        for inst in layout:
            for name in inst.names:
                key = inst.key(name)
                keys = [key]
                if split_qkv and "qkv_proj" in key:
                    keys = [key.replace("qkv", x) for x in "qkv"]
                for k in keys:
                    loc = _Local(weights, k, p, parts)
                    tensors.append((k, loc.shape, dtype, _filler(loc, 0, loc.numel)))
        if layout_name == "consolidated":
            def make(model):
                return {"model": model,
                        "cfg": _checkpoint_cfg(cfg, 1, dtype, False, "transformer_lm_gpt"),
                        "extra_state": _EXTRA, "optimizer_history": _HISTORY, "args": None}
            yield "restored.pt", tensors, make
        else:
            meta = shard_metadata(layout, [0] * len(layout))

            def make(model, meta=meta):
                return {"model": model, "cfg": _checkpoint_cfg(cfg, parts, dtype, False),
                        "extra_state": _EXTRA, "optimizer_history": _HISTORY, "args": None,
                        "shard_metadata": meta}
            yield _part_name(parts, p, None), tensors, make


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def write_synthetic_metaseq(dst: str | os.PathLike, cfg: OPTConfig, layout: str = "fsdp",
                            parts: int = 1, shards: int = 1, seed: int = 0,
                            weights: Mapping[str, np.ndarray] | None = None,
                            dtype="float16", prefix: str = "checkpoint_last",
                            split_qkv: bool = False, md5: bool = True, overwrite: bool = False,
                            buffer_bytes: int = 1 << 30, progress: bool = True) -> Path:
    """Write a Metaseq checkpoint of ``cfg`` in ``layout`` into folder ``dst``.

    Args:
      layout: ``fsdp`` (P x W shard files), ``v1_20220502``, ``v1_20230405`` or
        ``consolidated`` (see the module docstring).
      parts, shards: model-parallel parts P and FSDP shards W (``shards`` only for ``fsdp``).
      weights: folder-keyed torch-layout tensors (e.g. a ``FolderStore``); default: random
        weights of ``seed`` (``random_state_dict(cfg, seed)``).
      dtype: dtype of the stored weights (Meta's files are float16).
      md5: also write ``md5sum_shards.csv`` in Meta's format.
    Returns ``dst``.  The folder is built under ``{dst}.partial`` and renamed when complete.
    """
    dst = Path(dst)
    dtype = np.dtype(dtype)
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {SYNTHETIC_LAYOUTS}")
    if parts < 1 or shards < 1:
        raise ValueError("parts and shards must be >= 1")
    if layout != "fsdp" and shards != 1:
        raise ValueError(f"layout {layout} has one file per part; shards must be 1")
    if layout == "consolidated" and parts != 1:
        raise ValueError("a consolidated checkpoint has one part")
    if split_qkv and layout != "consolidated":
        raise ValueError("split_qkv applies to the consolidated layout only")
    check_parallel(cfg, parts)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if weights is None:
            from optkit.weights.random import random_state_dict, write_random_folder

            if cfg.num_params() * dtype.itemsize <= IN_MEMORY_BYTES:
                weights = dict(random_state_dict(cfg, seed, dtype))
            else:
                ref = write_random_folder(tmp / ".reference-np", cfg, seed=seed, dtype=dtype,
                                          progress=progress)
                weights = FolderStore(ref)
        if layout == "fsdp":
            files = _fsdp_files(weights, cfg, parts, shards, dtype, prefix)
        elif layout == "v1_20220502":
            files = _v2022_files(weights, cfg, parts, dtype)
        else:
            files = _unflat_files(weights, cfg, parts, dtype, layout, split_qkv)
        n_files = parts * shards
        written = []
        with tqdm(total=n_files, unit="file", desc=f"write {layout} {cfg.name}",
                  disable=not progress) as bar:
            for name, tensors, make in files:
                _save(tmp / name, tensors, make, buffer_bytes)
                written.append(tmp / name)
                bar.update(1)
        weights = None
        shutil.rmtree(tmp / ".reference-np", ignore_errors=True)
        if md5:
            write_md5_csv(tmp / MD5_FILE, written)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst
