"""Build the params pytree from a folder-keyed tensor store, one device slice at a time.

With a ``sharding_for(spec)`` callback each device's slice is read straight from the
memory-mapped files through ``jax.make_array_from_callback``; no host materializes a whole
model (only the slice a device needs, one tensor at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from optkit.config import OPTConfig
from optkit.weights.folder import FolderStore, WeightError
from optkit.weights.layout import ParamSpec, folder_shapes, param_specs, tree_from_specs

ShardingFor = Callable[[ParamSpec], jax.sharding.Sharding | None]


def check_store(store: Mapping[str, np.ndarray], cfg: OPTConfig, checksums: bool = False) -> None:
    """Every tensor ``cfg`` needs is present with the right shape (errors name the file)."""
    expected = folder_shapes(cfg)
    if isinstance(store, FolderStore):
        store.check(expected, checksums=checksums)
        return
    for key, shape in expected.items():
        if key not in store:
            raise WeightError(f"checkpoint lacks tensor {key!r} (shape {shape})")
        got = tuple(store[key].shape)
        if key == "decoder.embed_positions.weight" and got[1:] == shape[1:] and got[0] >= shape[0]:
            continue
        if got != shape:
            raise WeightError(f"tensor {key!r} has shape {got}; expected {shape}")


def _full(spec: ParamSpec) -> tuple[slice, ...]:
    return tuple(slice(None) for _ in spec.shape)


def _norm_index(spec: ParamSpec, idx) -> tuple[slice, ...]:
    idx = tuple(idx) + (slice(None),) * (len(spec.shape) - len(idx))
    return idx


def read_leaf(store: Mapping[str, np.ndarray], spec: ParamSpec, dtype,
              sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """One parameter read from ``store`` as ``dtype``: placed on ``sharding`` one device slice
    at a time, or whole on the default device."""
    np_dtype = jnp.dtype(dtype)
    try:
        if sharding is None:
            arr = jax.device_put(np.asarray(spec.read(store, _full(spec)), np_dtype))
        else:
            def cb(idx):
                return np.asarray(spec.read(store, _norm_index(spec, idx)), np_dtype)
            arr = jax.make_array_from_callback(spec.shape, sharding, cb, dtype=np_dtype)
    except WeightError:
        raise
    except (OSError, ValueError) as e:
        raise WeightError(f"cannot read {'/'.join(map(str, spec.path))} from "
                          f"{', '.join(spec.sources[:3])}: {e}") from e
    if tuple(arr.shape) != spec.shape:
        raise WeightError(f"{spec.sources[0]} gave shape {arr.shape}; expected {spec.shape}")
    return arr


def load_bar(cfg: OPTConfig, dtype, progress: bool) -> tqdm:
    """A progress bar over the bytes of ``cfg``'s parameters in ``dtype``."""
    total = sum(s.size for s in param_specs(cfg)) * jnp.dtype(dtype).itemsize
    return tqdm(total=total, unit="B", unit_scale=True, desc="load weights",
                disable=not progress, leave=False)


def load_params(store: Mapping[str, np.ndarray], cfg: OPTConfig, dtype=jnp.float32,
                sharding_for: ShardingFor | None = None, check: bool = True,
                checksums: bool = False, progress: bool = True) -> dict:
    """Params pytree of ``cfg`` read from ``store`` (folder keys, torch layout)."""
    if check:
        check_store(store, cfg, checksums=checksums)
    itemsize = jnp.dtype(dtype).itemsize
    bar = load_bar(cfg, dtype, progress)

    def leaf(spec: ParamSpec):
        arr = read_leaf(store, spec, dtype, sharding_for(spec) if sharding_for else None)
        bar.update(spec.size * itemsize)
        return arr

    try:
        return tree_from_specs(param_specs(cfg), leaf)
    finally:
        bar.close()
