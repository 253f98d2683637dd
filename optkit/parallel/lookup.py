"""Token-embedding lookup from a table split over the vocabulary, placed explicitly.

Tensor parallelism splits the tied embedding / LM head by vocabulary rows.  Left to its own
partitioner, XLA on GPUs (jax 0.11) looks the tokens up by all-gathering the whole table on
every call: two all-gathers per decode step, each moving every other device's share of the
table, far more bytes than the rows looked up.  Here each device looks up only the ids in
its own rows (zeros for the others) and one all-reduce of the (B, T, E) rows sums the parts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from optkit.parallel.rules import axis_names


def vocab_lookup(mesh: Mesh, table_spec: PartitionSpec,
                 ids_spec: Callable[[tuple[int, ...]], PartitionSpec]) -> Callable | None:
    """``lookup(table, ids) -> rows`` for ``model.embed`` when ``table_spec`` splits the
    vocabulary (else None: a plain take).  ``ids_spec(shape)``: how the token ids (and so
    the rows looked up, besides the embedding axis) are split, e.g. batch rows over data."""
    vocab = axis_names(table_spec[0]) if len(table_spec) else ()
    if not vocab or mesh.devices.size == 1:
        return None
    embed = table_spec[1] if len(table_spec) > 1 else None

    def local(table, ids):
        rows = table.shape[0]
        own = ids - jax.lax.axis_index(vocab) * rows
        inside = (own >= 0) & (own < rows)
        x = jnp.take(table, jnp.where(inside, own, 0), axis=0)
        return jax.lax.psum(jnp.where(inside[..., None], x, jnp.zeros((), x.dtype)), vocab)

    def lookup(table, ids):
        spec = tuple(ids_spec(tuple(ids.shape)))
        spec += (None,) * (ids.ndim - len(spec))
        # ids split over an axis that also splits the vocabulary: each device needs them all
        spec = tuple(None if set(axis_names(e)) & set(vocab) else e for e in spec)
        fn = jax.shard_map(local, mesh=mesh, check_vma=False,
                           in_specs=(table_spec, PartitionSpec(*spec)),
                           out_specs=PartitionSpec(*spec, embed))
        return fn(table, ids)

    return lookup
