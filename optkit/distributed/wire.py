"""What crosses between the driver and the workers: host arrays, PRNG keys, results.

The driver sends numpy arrays (typed PRNG keys as :class:`KeyData`); every worker gets the
same values.  A worker returns only the results it can read: a result array is first made
replicated on the devices that hold it, then the lowest-numbered process among them returns
it and the others return :data:`MISSING`; the driver merges the workers' trees leaf by leaf.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optkit.parallel.transfer import move


@dataclasses.dataclass(frozen=True)
class KeyData:
    """A typed PRNG key array as its raw data and implementation name."""

    data: np.ndarray
    impl: str


class _Missing:
    """Placeholder for a result another worker returns."""

    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self):
        return (_missing, ())


def _missing():
    return MISSING


MISSING = _Missing()


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_wire(tree):
    """Driver -> workers: every array leaf as numpy (typed keys as :class:`KeyData`)."""
    def leaf(x):
        if _is_key(x):
            return KeyData(np.asarray(jax.random.key_data(x)), str(jax.random.key_impl(x)))
        if isinstance(x, jax.Array):
            return np.asarray(x)
        return x
    return jax.tree.map(leaf, tree)


def from_wire(tree, on_device: bool = False):
    """Back to arrays: :class:`KeyData` -> typed keys; with ``on_device`` numpy leaves are
    put on this process's default device (the driver's results are JAX arrays, as a local
    executor's are)."""
    def leaf(x):
        if isinstance(x, KeyData):
            return jax.random.wrap_key_data(x.data, impl=x.impl)
        if on_device and isinstance(x, np.ndarray | np.generic):
            return jax.device_put(x)
        return x
    return jax.tree.map(leaf, tree)


def fetch(tree):
    """Worker side: the result leaves this process returns (numpy / :class:`KeyData`), the
    others :data:`MISSING`.  Every process calls it with the same tree (SPMD)."""
    return jax.tree.map(_fetch_leaf, tree)


def _fetch_leaf(x):
    if not isinstance(x, jax.Array):
        return x
    if _is_key(x):
        data = _fetch_leaf(jax.random.key_data(x))
        return data if data is MISSING else KeyData(data, str(jax.random.key_impl(x)))
    if x.is_fully_addressable:
        return np.asarray(x)
    devices = x.sharding.device_set
    if not x.sharding.is_fully_replicated:
        x = move(x, _replicated(x.sharding))
    owner = min(d.process_index for d in devices)
    if owner != jax.process_index():
        return MISSING
    return np.asarray(x.addressable_data(0))


def _replicated(s) -> NamedSharding:
    """``s``'s devices, each holding the whole array."""
    if isinstance(s, NamedSharding):
        return s.update(spec=PartitionSpec())
    devices = np.array(sorted(s.device_set, key=lambda d: d.id))
    return NamedSharding(Mesh(devices, ("all",)), PartitionSpec())


def merge(trees):
    """Driver side: one tree from the workers' :func:`fetch` results (first non-missing)."""
    def pick(*xs):
        for x in xs:
            if x is not MISSING:
                return x
        raise RuntimeError("no worker returned this result")
    return jax.tree.map(pick, *trees)
