"""The JAX model object that ``get_model`` returns, for one process and for a Ray cluster.

:class:`JaxOPT` drives an executor (``optkit.parallel`` in this process, or
``optkit.distributed.RemoteExecutor``); ids may be numpy, JAX or torch and come back as the
same kind.  Also here: how a model name splits into backend and size, and where its weights
are.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optkit.config import OPTConfig, canonical_name
from optkit.weights.folder import WeightError, folder_path, is_weight_folder
from optkit.weights.hub import hub_weights

BACKENDS = ("facebook", "jax", "alpa")


@dataclasses.dataclass
class CausalLMOutput:
    logits: Any


# --------------------------------------------------------------------------------------------
# Array kinds: return what the caller gave
# --------------------------------------------------------------------------------------------
def array_kind(x) -> str:
    if isinstance(x, jax.Array):
        return "jax"
    if type(x).__module__.startswith("torch"):
        return "torch"
    return "numpy"


def to_numpy(x) -> np.ndarray | None:
    if x is None:
        return None
    if array_kind(x) == "torch":
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_kind(x, kind: str, like=None):
    """``x`` as a numpy, JAX or torch array (integer results take ``like``'s dtype)."""
    x = np.asarray(x)
    if like is not None and np.issubdtype(x.dtype, np.integer):
        x = x.astype(to_numpy(like).dtype)
    if kind == "jax":
        return jnp.asarray(x)
    if kind == "torch":
        import torch

        return torch.from_numpy(np.array(x, copy=True))
    return x


def check_ids(ids: np.ndarray, vocab_size: int, what: str = "input_ids") -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"{what} must be (batch, length); got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{what} must be integers; got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{what} must lie in [0, {vocab_size}); got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32)


# --------------------------------------------------------------------------------------------
# The JAX model object
# --------------------------------------------------------------------------------------------
class JaxOPT:
    """An OPT model on JAX devices, driven through an executor (one device or a plan)."""

    def __init__(self, executor, name: str = "", backend: str = "jax", plan=None):
        self.executor = executor
        self.config: OPTConfig = executor.cfg
        self.name = name
        self.backend = backend
        self.plan = plan

    @property
    def dtype(self):
        return self.executor.dtype

    def __call__(self, input_ids, attention_mask=None) -> CausalLMOutput:
        kind = array_kind(input_ids)
        ids = check_ids(to_numpy(input_ids), self.config.vocab_size)
        mask = to_numpy(attention_mask)
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32).reshape(ids.shape)
        logits = self.executor.logits(ids, mask)
        if kind == "jax":
            return CausalLMOutput(logits)
        return CausalLMOutput(as_kind(np.asarray(logits, np.float32), kind))

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """HF-style ``generate`` (see :func:`optkit.generation.generate`)."""
        from optkit.generation import generate

        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        kind = array_kind(input_ids)
        ids = check_ids(to_numpy(input_ids), self.config.vocab_size)
        mask = to_numpy(attention_mask)
        out = generate(self.executor, ids, None if mask is None else np.asarray(mask, np.int32),
                       **kwargs)
        if hasattr(out, "sequences"):
            out.sequences = as_kind(out.sequences, kind, like=input_ids)
            return out
        return as_kind(out, kind, like=input_ids)

    def __repr__(self) -> str:
        return (f"JaxOPT({self.name or self.config.name}, backend={self.backend}, "
                f"dtype={jnp.dtype(self.dtype).name}, devices={self.executor.mesh.devices.size})")


# --------------------------------------------------------------------------------------------
# Names and weight locations
# --------------------------------------------------------------------------------------------
def split_name(model_name: str) -> tuple[str, str]:
    """``alpa/opt-2.7b`` -> (``alpa``, ``opt-2.7b``); bare names mean ``jax``."""
    if "/" in model_name:
        backend, short = model_name.split("/", 1)
    else:
        backend, short = "jax", model_name
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} in {model_name!r}; use one of "
                         f"{', '.join(b + '/opt-...' for b in BACKENDS)}")
    return backend, short


def weights_location(short: str, path, alpa_layout: bool = False, progress: bool = True) -> Path:
    """The weight folder or HF directory for ``path`` and the model name; with no ``path``,
    ``facebook/{short}`` from the Hugging Face cache or Hub (``optkit.weights.hub``)."""
    if path is None:
        return hub_weights(short, alpa_layout=alpa_layout, progress=progress)
    p = Path(os.path.expanduser(str(path)))
    if is_weight_folder(p) or (p / "config.json").is_file():
        return p
    f = folder_path(p, short)
    if f.is_dir():
        return f
    for candidate in (p / short, p / canonical_name(short)):
        if (candidate / "config.json").is_file():
            return candidate
    raise WeightError(f"weights for {short} not found: expected the Alpa numpy folder {f} "
                      f"(or an HF checkpoint directory at {p})")
