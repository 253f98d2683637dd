"""Place arrays on a sharding, also when the source and target devices lie in other processes.

In one process :func:`move` is ``jax.device_put``.  Under ``jax.distributed`` (one process per
host, a global mesh) a pipeline stage's sub-mesh may belong to another process, and
``device_put`` between processes is not supported by the CPU and GPU runtimes of JAX 0.10 /
0.11.  Every process then calls :func:`move` with the same arguments (SPMD) and:

* host values (numpy, or JAX arrays not yet placed on a mesh, typed PRNG keys included) are
  placed with ``jax.make_array_from_callback``: each process fills only its own devices'
  shards, with no collective;
* a ``jax.Array`` on another device set travels through one ``ppermute`` over a two-row
  "pair" mesh stacking the source mesh on the target mesh (shard ``i`` of the source goes to
  device ``i`` of the target: NCCL on GPUs, gloo on CPUs); processes that own none of the
  devices involved only build the (empty) result handle.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optkit.parallel.dispatch import settle

PAIR = "_pair"


def move(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (numpy or ``jax.Array``, typed PRNG keys included) placed on ``sharding``; see
    the module docstring."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(move(jax.random.key_data(x), sharding),
                                        impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.committed and x.is_fully_addressable:
        x = np.asarray(x)  # a value every process holds (not placed on any mesh yet)
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx],
                                            dtype=x.dtype)
    if x.sharding == sharding:
        return x
    src = x.sharding
    procs = {d.process_index for d in src.device_set | sharding.device_set}
    if procs == {jax.process_index()}:
        return jax.device_put(x, sharding)
    if jax.process_index() not in procs:
        return jax.make_array_from_single_device_arrays(x.shape, sharding, [], dtype=x.dtype)
    if src.device_set == sharding.device_set:  # same devices, other layout
        return settle(_reshard(x, sharding))
    if src.device_set & sharding.device_set or len(src.device_set) != sharding.num_devices:
        raise ValueError(f"cannot move an array from {src} to {sharding} across processes: "
                         "the source and target device sets must be disjoint and of one size")
    if not (isinstance(src, NamedSharding) and src.spec == sharding.spec
            and src.mesh.devices.shape == sharding.mesh.devices.shape):
        # re-layout on the source devices first, as the target is laid out
        devices = sorted(src.device_set, key=lambda d: d.id)
        mesh = Mesh(np.array(devices).reshape(sharding.mesh.devices.shape),
                    sharding.mesh.axis_names)
        x = _reshard(x, NamedSharding(mesh, sharding.spec))
    return settle(_permute(x, sharding))


def _reshard(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``x`` laid out as ``sharding`` on the same devices (a jitted identity)."""
    return _identity(sharding)(x)


@functools.cache
def _identity(sharding):
    return jax.jit(lambda a: a, out_shardings=sharding)


def _permute(x: jax.Array, target: NamedSharding) -> jax.Array:
    src_mesh, spec = x.sharding.mesh, target.spec
    pair = Mesh(np.stack([src_mesh.devices, target.mesh.devices]),
                (PAIR,) + tuple(src_mesh.axis_names))
    pair_sharding = NamedSharding(pair, PartitionSpec(PAIR, *spec))
    shape = (2,) + tuple(x.shape)
    shard_shape = pair_sharding.shard_shape(shape)
    mine = {s.device: s.data for s in x.addressable_shards}
    parts = []
    for d in pair_sharding.addressable_devices:
        if d in mine:
            parts.append(mine[d].reshape(shard_shape))
        else:
            parts.append(jax.device_put(np.zeros(shard_shape, x.dtype), d))
    both = jax.make_array_from_single_device_arrays(shape, pair_sharding, parts)
    out = _send_fn(pair, PartitionSpec(PAIR, *spec))(both)
    dst = set(target.addressable_devices)
    arrays = [s.data.reshape(target.shard_shape(x.shape)) for s in out.addressable_shards
              if s.device in dst]
    return jax.make_array_from_single_device_arrays(x.shape, target, arrays, dtype=x.dtype)


@functools.cache
def _send_fn(pair: Mesh, spec: PartitionSpec):
    """Jitted: row 0 of the pair mesh sends its shards to row 1."""
    def send(a):
        return jax.lax.ppermute(a, PAIR, [(0, 1)])
    return jax.jit(jax.shard_map(send, mesh=pair, in_specs=spec, out_specs=spec))
