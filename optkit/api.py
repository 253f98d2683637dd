"""``get_model``: the seed-compatible entry point (Alpa's ``llm_serving.model.wrapper``).

``facebook/opt-*`` -> HF transformers in torch; ``jax/opt-*`` -> one JAX device;
``alpa/opt-*`` -> model-parallel over all visible devices (automatic plan unless one is given).
Every returned object has ``__call__(input_ids, attention_mask=None)`` with ``.logits`` and an
HF-style ``generate``; ids may be numpy, JAX or torch and come back as the same kind.
"""

from __future__ import annotations

import logging
import os

import jax

from optkit.config import OPTConfig
from optkit.lm import JaxOPT, split_name, weights_location
from optkit.options import ModelOptions
from optkit.weights.sources import open_weights

log = logging.getLogger(__name__)


def resolve_config(short: str, own: OPTConfig | None) -> OPTConfig:
    """A folder's own config.json wins over the preset chosen by name."""
    if own is not None:
        return own
    return OPTConfig.from_name(short)


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
      dtype: ``auto`` (fp16 on GPU, fp32 on CPU), ``float32``, ``float16`` or ``bfloat16``
        (or ``fp32``, ``fp16``, ``half``, ``bf16``).
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
        ``"pallas"`` (all that apply), or names joined by commas from ``"attention"``,
        ``"matvec"`` (int8 models; ``optkit.parallel.kernels``).

    ``dtype``, ``quantize`` and ``kernels`` are checked here, once, into one
    :class:`optkit.options.ModelOptions` that the loaders and executors receive.
    """
    backend, short = split_name(model_name)
    if kwargs:
        raise TypeError(f"get_model() got unexpected arguments: {sorted(kwargs)}")
    options = ModelOptions(dtype=dtype, quantize=quantize, kernels=kernels)
    if backend == "facebook" and options.quantize:
        raise ValueError("quantize= runs on JAX: use jax/ or alpa/ (the same weights)")
    if backend == "facebook" and options.kernels != ModelOptions().kernels:
        raise ValueError("kernels= picks the JAX decode kernels: use jax/ or alpa/")
    if cluster is not None:
        from optkit.distributed import load_model

        return load_model(cluster, model_name, path=path, options=options, dummy=dummy, plan=plan,
                          seed=seed, config=config, checksums=checksums, progress=progress)
    if backend == "facebook":
        from optkit.hf_backend import get_hf_model

        return get_hf_model(short, path=path, dtype=options.dtype, dummy=dummy, device=device,
                            seed=seed, config=config)

    store = None
    if dummy:
        cfg = config or OPTConfig.from_name(short)
    else:
        own, store = open_weights(weights_location(short, path, alpa_layout=True,
                                                   progress=progress))
        cfg = config or resolve_config(short, own)

    if backend == "alpa":
        from optkit.parallel.planner import build_parallel

        executor, plan = build_parallel(cfg, store, options, plan=plan, seed=seed,
                                        checksums=checksums, progress=progress)
        return JaxOPT(executor, name=model_name, backend=backend, plan=plan)

    if plan is not None:
        raise ValueError("plan= applies to alpa/ models; jax/ runs on one device")
    from optkit.parallel import Plan, build_executor

    dev = device or jax.devices()[0]
    executor = build_executor(cfg, Plan(), store, devices=[dev], options=options, seed=seed,
                              checksums=checksums, progress=progress)
    return JaxOPT(executor, name=model_name, backend=backend)
