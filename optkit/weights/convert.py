"""Write an Alpa-layout weight folder from any folder-keyed source (HF directories here;
the Metaseq importer feeds the same writer)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from optkit.config import OPTConfig
from optkit.weights.folder import FolderWriter, WeightError
from optkit.weights.layout import folder_shapes
from optkit.weights.sources import open_hf_dir

DTYPES = {"auto": None, "float16": np.float16, "fp16": np.float16, "float32": np.float32,
          "fp32": np.float32}


def output_dtype(name: str, source_dtype: np.dtype) -> np.dtype:
    """Folder dtype for ``--dtype``: ``auto`` keeps fp16/fp32 and widens anything else to fp32."""
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose from {sorted(DTYPES)}")
    if DTYPES[name] is not None:
        return np.dtype(DTYPES[name])
    return source_dtype if source_dtype in (np.float16, np.float32) else np.dtype(np.float32)


def write_folder(store: Mapping[str, np.ndarray], cfg: OPTConfig, dst: str | os.PathLike,
                 dtype: str = "auto", overwrite: bool = False, source: str = "",
                 progress: bool = True) -> Path:
    """Copy every tensor ``cfg`` needs from ``store`` into a new folder, atomically."""
    shapes = folder_shapes(cfg)
    missing = [k for k in shapes if k not in store]
    if missing:
        raise WeightError(f"{source or 'source'} lacks {len(missing)} tensor(s) of {cfg.name} "
                          f"(first: {missing[0]})")
    writer = FolderWriter(dst, cfg, overwrite=overwrite)
    bar = tqdm(total=len(shapes), unit="tensor", desc=f"convert {cfg.name}", disable=not progress)
    try:
        for key, shape in shapes.items():
            bar.set_postfix_str(key[-40:], refresh=False)
            if not writer.done(key, shape):
                arr = np.asarray(store[key])
                if key == "decoder.embed_positions.weight" and arr.shape[0] > shape[0]:
                    arr = arr[: shape[0]]
                if tuple(arr.shape) != shape:
                    raise WeightError(f"{source}: tensor {key!r} has shape {tuple(arr.shape)}, "
                                      f"expected {shape} for {cfg.name}")
                writer.write(key, arr.astype(output_dtype(dtype, arr.dtype), copy=False))
            bar.update(1)
    finally:
        bar.close()
    return writer.commit(shapes, source=source)


def convert_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "auto",
               overwrite: bool = False, progress: bool = True) -> Path:
    """``optkit convert hf``: HF OPT directory (safetensors or .bin, sharded or not) -> folder."""
    cfg, store = open_hf_dir(src)
    return write_folder(store, cfg, dst, dtype=dtype, overwrite=overwrite,
                        source=f"hf:{Path(src).resolve()}", progress=progress)
