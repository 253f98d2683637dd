"""Naive, load-everything consolidation (what Alpa's step 2 and metaseq's scripts do).

Not for real use — it loads every shard of a part fully, keeps every unflattened part and
then the glued model in memory (about twice the checkpoint, Alpa's "175B x 2 bytes x 2 =
700 GB").  It is written independently of the streaming reader, with ``torch.load`` and
``torch.cat`` following the spec (§1.6 unflatten, §1.7 glue) literally, and serves as the
test suite's second opinion and the benchmark's baseline.  Handles the ``fsdp``,
``v1_20230405`` and ``consolidated`` layouts (those that carry their own shapes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from optkit.weights.metaseq.reader import discover

_DROP = ("decoder.version", "decoder.output_projection.weight")


def _unflatten(states: list[dict]) -> dict:
    import torch

    meta = states[0].get("shard_metadata")
    model = states[0]["model"]
    if meta is None or not any(k.endswith("flat_param_0") for k in model):
        return dict(model)
    out = {}
    for k, entry in enumerate(meta["param_metadata"]):
        path = entry["fsdp_path"]
        for flat_name, p in entry["params"].items():
            key = f"{path}.{flat_name}" if path else flat_name
            names, shapes, numels, _ = p.values()
            pieces = []
            for st in states:
                pad = st["shard_metadata"]["param_metadata"][k]["params"][flat_name]["padding"]
                t = st["model"][key]
                pieces.append(t[:t.numel() - pad])
            full = torch.cat(pieces)
            for name, shape, t in zip(names, shapes, full.split(list(numels)), strict=True):
                out[f"{path}.{name}" if path else name] = t.view(tuple(shape))
    for name in meta.get("buffer_names", []):
        out[name] = model[name]
    return out


def _glue(parts: list[dict]) -> dict:
    import torch

    out = {}
    for key in parts[0]:
        ts = [p[key] for p in parts]
        if "qkv" in key:
            thirds = [t.chunk(3, dim=0) for t in ts]
            for i, x in enumerate("kvq"):
                out[key.replace("qkv", x)] = torch.cat([th[i] for th in thirds], dim=0)
        elif "layer_norm" in key:
            out[key] = ts[0]
        elif "fc1" in key or any(f".{x}_proj." in key for x in "kqv"):
            out[key] = torch.cat(ts, dim=0)
        elif ("fc2" in key or "out_proj" in key) and key.endswith("weight"):
            out[key] = torch.cat(ts, dim=1)
        elif "embed_tokens" in key:
            out[key] = torch.cat(ts, dim=0)
        else:
            out[key] = ts[0]
    return out


def naive_consolidate(src: str | os.PathLike) -> dict[str, np.ndarray]:
    """Folder key -> array, from every file loaded fully at once."""
    import torch

    parts = []
    for part in discover(src):
        states = [torch.load(f, map_location="cpu", weights_only=False) for f in part]
        parts.append(_unflatten(states))
        del states
    glued = _glue(parts)
    del parts
    return {k: v.numpy() for k, v in glued.items() if k not in _DROP}


def naive_convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write :func:`naive_consolidate`'s tensors as ``np.save`` files (Alpa's step 3)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for key, arr in naive_consolidate(src).items():
        with open(dst / key, "wb") as f:
            np.save(f, np.ascontiguousarray(arr))
    return dst
