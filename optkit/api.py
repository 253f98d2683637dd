"""``get_model``: the seed-compatible entry point (Alpa's ``llm_serving.model.wrapper``).

``facebook/opt-*`` -> HF transformers in torch; ``jax/opt-*`` -> one JAX device;
``alpa/opt-*`` -> model-parallel over all visible devices (automatic plan unless one is given).
Every returned object has ``__call__(input_ids, attention_mask=None)`` with ``.logits`` and an
HF-style ``generate``; ids may be numpy, JAX or torch and come back as the same kind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optkit.config import OPTConfig, canonical_name
from optkit.parallel.kernels import check_kernels
from optkit.quant import check_quantize
from optkit.weights.folder import WeightError, folder_path, is_weight_folder
from optkit.weights.hub import hub_weights
from optkit.weights.sources import open_weights

log = logging.getLogger(__name__)

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


def resolve_dtype(dtype, platform: str):
    """``auto`` -> fp16 on accelerators (as Alpa), fp32 on CPU."""
    if dtype in (None, "auto"):
        return jnp.float32 if platform == "cpu" else jnp.float16
    names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    try:
        return jnp.dtype(names.get(str(dtype), dtype))
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


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
# get_model
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


def resolve_config(short: str, own: OPTConfig | None) -> OPTConfig:
    """A folder's own config.json wins over the preset chosen by name."""
    if own is not None:
        return own
    return OPTConfig.from_name(short)


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


def get_model(model_name: str, path: str | os.PathLike | None = None, dtype="auto",
              dummy: bool = False, device=None, plan=None, seed: int = 0,
              config: OPTConfig | None = None, checksums: bool = False,
              progress: bool = True, cluster=None, quantize: str | None = None,
              kernels: str = "auto", **kwargs):
    """Load an OPT model for inference (Alpa's ``get_model``).

    Args:
      model_name: ``facebook/opt-*`` (HF transformers, torch), ``jax/opt-*`` (one JAX device)
        or ``alpa/opt-*`` (all visible devices, automatic or given ``plan``).
      path: where weights live: a folder containing ``{name}-np/``, the folder itself, or an
        HF checkpoint directory; if not given, ``facebook/{name}`` from the Hugging Face cache
        (downloaded when online; converted once for ``jax/`` and ``alpa/``).
      dtype: ``auto`` (fp16 on GPU, fp32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
      dummy: random weights of the named shape instead of loading (Alpa's ``dummy=True``).
      device: a ``jax.Device`` (``jax/``) or torch device string (``facebook/``).
      plan: an explicit parallel plan for ``alpa/`` (see ``optkit.parallel``).
      config: override the shape (custom configs with ``dummy=True``).
      cluster: run an ``alpa/`` model on a Ray cluster: an address (``"auto"``,
        ``"ray://head:10001"``) or an :class:`optkit.distributed.RayCluster`; the plan spans
        every host's devices and the weights must be at ``path`` on every host.
      quantize: ``"int8"``: int8 weight-only matmul kernels, quantized while loading
        (``jax/`` and ``alpa/``; see ``optkit.quant``).
      kernels: Pallas kernels in the decode step of ``jax/`` and ``alpa/`` models: ``"auto"``
        (on GPUs, those that apply: fused attention, int8 products), ``"xla"`` (none),
        ``"pallas"`` (all, with the fused residual add + LayerNorm), or names joined by commas
        from ``"attention"``, ``"norm"``, ``"matvec"`` (``optkit.parallel.kernels``).
    """
    backend, short = split_name(model_name)
    if kwargs:
        raise TypeError(f"get_model() got unexpected arguments: {sorted(kwargs)}")
    check_quantize(quantize)
    check_kernels(kernels)
    if quantize and backend == "facebook":
        raise ValueError("quantize= runs on JAX: use jax/ or alpa/ (the same weights)")
    if kernels != "auto" and backend == "facebook":
        raise ValueError("kernels= picks the JAX decode kernels: use jax/ or alpa/")
    if cluster is not None:
        from optkit.distributed import load_model

        return load_model(cluster, model_name, path=path, dtype=dtype, dummy=dummy, plan=plan,
                          seed=seed, config=config, checksums=checksums, progress=progress,
                          quantize=quantize, kernels=kernels)
    if backend == "facebook":
        from optkit.hf_backend import get_hf_model

        return get_hf_model(short, path=path, dtype=dtype, dummy=dummy, device=device,
                            seed=seed, config=config)

    store = None
    if dummy:
        cfg = config or OPTConfig.from_name(short)
    else:
        own, store = open_weights(weights_location(short, path, alpa_layout=True,
                                                   progress=progress))
        cfg = config or resolve_config(short, own)

    if backend == "alpa":
        from optkit.parallel import build_parallel

        executor, plan = build_parallel(cfg, store, dtype=dtype, plan=plan, seed=seed,
                                        checksums=checksums, progress=progress,
                                        quantize=quantize, kernels=kernels)
        return JaxOPT(executor, name=model_name, backend=backend, plan=plan)

    if plan is not None:
        raise ValueError("plan= applies to alpa/ models; jax/ runs on one device")
    from optkit.parallel import Plan, build_executor

    dev = device or jax.devices()[0]
    executor = build_executor(cfg, Plan(), store, devices=[dev], dtype=dtype, seed=seed,
                              checksums=checksums, progress=progress, quantize=quantize,
                              kernels=kernels)
    return JaxOPT(executor, name=model_name, backend=backend)
