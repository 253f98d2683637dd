"""Random OPT weights of any shape (Alpa's ``dummy=True``): in memory or as a weight folder.

* :func:`random_params` makes the params pytree directly on the target devices (each leaf
  created by a jitted function with its output sharding; nothing goes through the host).
* :func:`random_state_dict` yields folder-key tensors (torch layout, numpy), one at a time,
  deterministically per (seed, key): the same tensors feed a weight folder, an HF model and
  the synthetic Metaseq writer.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from optkit.config import OPTConfig
from optkit.weights.folder import FolderWriter
from optkit.weights.layout import folder_shapes, param_specs, tree_from_specs

STD = 0.02


@functools.cache
def _group_fn(leaves: tuple, dtype: str, shardings: tuple, keep: tuple):
    """One jitted function creating a group of leaves ((shape, init) each) from one key:
    a whole layer compiles once and is reused for every layer of that shape.  It returns
    the leaves at indices ``keep`` (placed by ``shardings``)."""
    def make(key):
        # one flat draw for the whole group, then split: RNG ops dominate CPU compile time
        sizes = [math.prod(shape) for shape, _ in leaves]
        flat = STD * jax.random.normal(key, (sum(sizes),), dtype)
        out, start = [], 0
        for (shape, init), n in zip(leaves, sizes, strict=True):
            x = flat[start:start + n].reshape(shape)
            out.append(x + 1 if init == "ones" else x)
            start += n
        return tuple(out[j] for j in keep)
    return jax.jit(make, out_shardings=shardings)


def random_params(cfg: OPTConfig, seed: int = 0, dtype=jnp.float32,
                  sharding_for=None) -> dict:
    """Random params created on device (sharded by ``sharding_for(spec)`` when given)."""
    base = jax.random.key(seed)
    specs = param_specs(cfg)
    dtype = jnp.dtype(dtype).name
    groups: dict = {}
    for spec in specs:
        group = spec.path[:2] if spec.path[0] == "layers" else ("top",)
        groups.setdefault(group, []).append(spec)
    values = {}
    for i, members in enumerate(groups.values()):
        shardings = tuple(sharding_for(s) if sharding_for else None for s in members)
        # leaves on several device sets (pipeline stages): one call per set, same draw
        by_devices: dict = {}
        for j, sh in enumerate(shardings):
            by_devices.setdefault(None if sh is None else frozenset(sh.device_set), []).append(j)
        leaves = tuple((s.shape, s.init) for s in members)
        for keep in by_devices.values():
            fn = _group_fn(leaves, dtype, tuple(shardings[j] for j in keep), tuple(keep))
            for j, value in zip(keep, fn(jax.random.fold_in(base, i)), strict=True):
                values[members[j].path] = value
    return tree_from_specs(specs, lambda spec: values[spec.path])


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def random_tensor(cfg: OPTConfig, key: str, shape: tuple[int, ...], seed: int = 0,
                  dtype=np.float32) -> np.ndarray:
    """One folder tensor, deterministic in (seed, key)."""
    rng = np.random.default_rng(_key_seed(seed, key))
    if key.endswith("layer_norm.weight"):
        arr = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif key.endswith("layer_norm.bias"):
        arr = 0.05 * rng.standard_normal(shape, dtype=np.float32)
    else:
        arr = STD * rng.standard_normal(shape, dtype=np.float32)
    if key == "decoder.embed_positions.weight" or key == "decoder.embed_tokens.weight":
        arr[cfg.pad_token_id] = 0.0  # metaseq keeps the padding rows at zero
    return arr.astype(dtype)


def random_state_dict(cfg: OPTConfig, seed: int = 0, dtype=np.float32
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """(folder key, torch-layout array) for every tensor of ``cfg``, generated lazily."""
    for key, shape in folder_shapes(cfg).items():
        yield key, random_tensor(cfg, key, shape, seed, dtype)


def write_random_folder(path: str | os.PathLike, cfg: OPTConfig, seed: int = 0,
                        dtype=np.float16, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a random model of ``cfg`` as an Alpa-layout folder (fp16 by default, as Alpa)."""
    writer = FolderWriter(path, cfg, overwrite=overwrite)
    shapes = folder_shapes(cfg)
    for key, shape in tqdm(shapes.items(), desc=f"random {cfg.name}", unit="tensor",
                           disable=not progress, leave=False):
        if writer.done(key, shape):
            continue
        writer.write(key, random_tensor(cfg, key, shape, seed, dtype))
    return writer.commit(shapes, source=f"random seed={seed}")


def hf_state_dict(cfg: OPTConfig, seed: int = 0, prefix: str = "model."):
    """Random weights as an HF ``OPTForCausalLM`` torch state dict (tied head included)."""
    import torch

    from optkit.weights.keymap import to_hf_key

    sd = {to_hf_key(k, prefix): torch.from_numpy(np.ascontiguousarray(a))
          for k, a in random_state_dict(cfg, seed)}
    sd["lm_head.weight"] = sd[to_hf_key("decoder.embed_tokens.weight", prefix)]
    return sd
