"""``optkit convert metaseq``: any Metaseq OPT checkpoint -> Alpa-layout weight folder.

Steps: find the files and check none is missing; optionally verify md5 sums; parse every
file's metadata and plan each output tensor (shape-checked against the config) — all before
anything is written; then assemble one tensor at a time (unflatten, glue the model-parallel
parts, take the K/V/Q third), flag extreme values, and hand it to :class:`FolderWriter`
(temporary folder, journal for resuming, manifest, rename when complete).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from optkit.config import OPTConfig
from optkit.weights.convert import output_dtype
from optkit.weights.folder import FolderWriter, WeightError
from optkit.weights.layout import folder_shapes
from optkit.weights.metaseq.consolidate import POSITIONS, clamp, find_extremes, plan
from optkit.weights.metaseq.md5 import verify_md5
from optkit.weights.metaseq.reader import MetaseqCheckpoint, discover, open_metaseq

log = logging.getLogger(__name__)

#: |x| above this in a weight is treated as corruption (fp16 max is 65504; OPT weights are
#: O(1)); metaseq issue #122 found values ~5e4 in one 175B shard.
EXTREME = 1e4
PADDED_ROWS = ("decoder.embed_tokens.weight", "decoder.embed_positions.weight")


def convert_metaseq(src: str | os.PathLike, dst: str | os.PathLike,
                    model: str | OPTConfig | None = None, md5: str | os.PathLike | None = None,
                    dtype: str = "auto", overwrite: bool = False, clamp_extremes: bool = False,
                    threshold: float = EXTREME, progress: bool = True,
                    checkpoint: MetaseqCheckpoint | None = None) -> Path:
    """Convert the Metaseq checkpoint at ``src`` (folder or file, any layout) to folder ``dst``.

    Args:
      model: preset name, ``config.json`` path or OPTConfig; default: inferred from the
        checkpoint (shapes and its ``cfg``), logged with what it was inferred from.
      md5: a sums file in Meta's format (``shard,md5sum``) to verify the files against first.
      dtype: ``auto`` keeps the stored dtype (fp16 for Meta's files), or ``float16``/``float32``.
      clamp_extremes: clip values with |x| > ``threshold`` (and NaN/inf); without it they are
        only reported, naming the tensor and the shard file.
      checkpoint: an already opened :func:`open_metaseq` result (skips re-parsing).
    Re-running after an interruption resumes: tensors already written and verified are kept.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to "
                              "replace it)")
    if md5 is not None:
        files = checkpoint.all_files if checkpoint else [f for p in discover(src) for f in p]
        verify_md5(md5, files, progress=progress)
    ckpt = checkpoint or open_metaseq(src, model)
    cfg = ckpt.config
    assemblies = plan(ckpt)
    shapes = folder_shapes(cfg)
    writer = FolderWriter(dst, cfg, overwrite=overwrite)
    total = sum(a.nbytes for a in assemblies.values())
    tensors = tqdm(total=len(shapes), unit="tensor", desc=f"convert {cfg.name}",
                   disable=not progress)
    nbytes = tqdm(total=total, unit="B", unit_scale=True, desc="bytes", disable=not progress,
                  leave=False)
    flagged = []
    try:
        for key, shape in shapes.items():
            a = assemblies[key]
            tensors.set_postfix_str(key[-40:], refresh=False)
            if not writer.done(key, shape):
                arr = a.read()
                if key == POSITIONS and arr.shape[0] > shape[0]:
                    arr = arr[:shape[0]]  # Alpa keeps max_positions + 2 rows
                if arr.shape != shape:  # plan() checked this; guard the invariant anyway
                    raise WeightError(f"{key} from {a.files[0]} has shape {arr.shape}, "
                                      f"expected {shape}")
                out = output_dtype(dtype, arr.dtype)
                if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
                    count, first, peak = find_extremes(arr, threshold)
                    if count:
                        flagged.append(key)
                        _report(a, key, count, first, peak, threshold, clamp_extremes)
                        if clamp_extremes:
                            clamp(arr, threshold)
                if key in PADDED_ROWS:
                    _check_padding_row(ckpt, key, arr)
                writer.write(key, arr.astype(out, copy=False))
                del arr
            tensors.update(1)
            nbytes.update(a.nbytes)
    finally:
        tensors.close()
        nbytes.close()
    note = f"; {len(flagged)} tensor(s) with extreme values" if flagged else ""
    clamped = f" (clamped to ±{threshold:g})" if flagged and clamp_extremes else ""
    return writer.commit(shapes, source=f"metaseq:{ckpt.src.resolve()} ({ckpt.layout}, "
                         f"{ckpt.num_parts}x{ckpt.num_shards} files){note}{clamped}")


def _check_padding_row(ckpt: MetaseqCheckpoint, key: str, arr: np.ndarray) -> None:
    """Metaseq keeps the padding row (id 1) of both embeddings at zero; anything else there
    means the tensors were cut from the wrong place of a flat parameter."""
    pad = ckpt.config.pad_token_id
    if arr.shape[0] > pad and np.any(arr[pad]):
        log.warning("%s: padding row %d is not zero, unlike every metaseq checkpoint — the "
                    "flat-parameter order assumed for layout %s may not fit these files "
                    "(350m's reshard.pt order is unconfirmed); check the converted model",
                    key, pad, ckpt.layout)


def _report(a, key, count, first, peak, threshold, clamped) -> None:
    log.warning("%s: %d value(s) with |x| > %g or not finite (max |x| %g; first at flat index %d "
                "in %s)%s", key, count, threshold, peak, first, a.locate(first),
                " — clamped" if clamped else
                " — known corruption in OPT-175B (metaseq #122)? pass --clamp to clip them")
