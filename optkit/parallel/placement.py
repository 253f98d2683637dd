"""Where one model's arrays live on one mesh under a rule table.

A :class:`Placement` answers every "which sharding?" question about a model (parameters, KV
cache, token batches, logits) through :func:`optkit.parallel.rules.logical_sharding`, and
resolves what depends on those shardings: the token lookup from a split embedding table and
the decode step's Pallas kernels.  Executors, sharded loading and the planner's abstract
compiles all place arrays through it, so what is planned is what runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from jax.sharding import Mesh, NamedSharding

from optkit.config import OPTConfig
from optkit.options import Kernels
from optkit.parallel.kernels import decode_kernels
from optkit.parallel.lookup import vocab_lookup
from optkit.parallel.rules import CACHE_AXES, Rules, logical_sharding
from optkit.quant import KERNELS, quantized_specs
from optkit.weights.layout import ParamSpec, embed_tokens_spec


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """Shardings of model ``cfg``'s arrays on ``mesh`` under ``rules``."""

    cfg: OPTConfig
    mesh: Mesh
    rules: Rules

    def sharding(self, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
        return logical_sharding(self.mesh, self.rules, axes, shape)

    def param(self, spec: ParamSpec) -> NamedSharding:
        return self.sharding(spec.axes, spec.shape)

    def kv(self, batch: int, max_len: int) -> NamedSharding:
        """One layer's K (or V) cache."""
        shape = (batch, max_len, self.cfg.num_attention_heads, self.cfg.head_dim)
        return self.sharding(CACHE_AXES["kv"], shape)

    def cache(self, batch: int, max_len: int) -> dict:
        """The sharding tree of ``model.init_cache(cfg, batch, max_len)``."""
        kv = [self.kv(batch, max_len)] * self.cfg.num_hidden_layers
        return {"k": kv, "v": kv, "mask": self.sharding(CACHE_AXES["mask"], (batch, max_len)),
                "index": self.sharding(CACHE_AXES["index"], (batch,))}

    def pool(self, num_blocks: int, block_size: int) -> NamedSharding:
        """One layer's paged K (or V) pool (``model.init_pools``)."""
        shape = (self.cfg.num_attention_heads, num_blocks, block_size, self.cfg.head_dim)
        return self.sharding(CACHE_AXES["pool"], shape)

    def pools(self, num_blocks: int, block_size: int) -> dict:
        """The sharding tree of ``model.init_pools(cfg, num_blocks, block_size)``."""
        kv = [self.pool(num_blocks, block_size)] * self.cfg.num_hidden_layers
        return {"k": kv, "v": kv}

    def batch(self, shape: tuple[int, ...]) -> NamedSharding:
        """Arrays with a leading batch axis (tokens, masks, hidden states)."""
        return self.sharding(("batch",) + (None,) * (len(shape) - 1), shape)

    def logits(self, shape: tuple[int, ...]) -> NamedSharding:
        """Logits: batch first, vocabulary last."""
        return self.sharding(("batch",) + (None,) * (len(shape) - 2) + ("vocab",), shape)

    @functools.cached_property
    def embed_lookup(self) -> Callable | None:
        """The token lookup ``model.embed`` takes on this mesh (``optkit.parallel.lookup``):
        None unless the rules split the table's vocabulary."""
        return vocab_lookup(self.mesh, self.param(embed_tokens_spec(self.cfg)).spec,
                            lambda shape: self.batch(shape).spec)

    @functools.cached_property
    def int8_kernel_specs(self) -> dict:
        """Kernel name -> (shape, PartitionSpec) of one layer's int8 ``kernel_q``."""
        specs = {s.path[2]: s for s in quantized_specs(self.cfg)
                 if s.path[:2] == ("layers", 0) and s.path[-1] == "kernel_q"}
        return {name: (specs[name].shape, self.param(specs[name]).spec) for name in KERNELS}

    def decode_kernels(self, kernels: Kernels, batch: int, max_len: int, int8: bool,
                       dtype) -> dict:
        """Keyword arguments (``attention``, ``matvec``) of ``model.decode_step`` for this
        batch and cache (see ``optkit.parallel.kernels``)."""
        return decode_kernels(kernels, self.cfg, self.mesh, self.kv(batch, max_len).spec,
                              self.int8_kernel_specs if int8 else {}, int8, dtype)
