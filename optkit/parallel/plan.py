"""A parallel plan: mesh shape (data x tensor x stage), rules, stage split, micro-batches, dtype.

A :class:`Plan` is written by hand (``Plan(dp=2, tp=2, pp=2)``) or chosen by the planner
(``optkit.parallel.planner``).  It is device-agnostic: :meth:`Plan.mesh` lays it over any
device list (stage-major, tensor innermost, so tensor groups are neighbouring devices).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh

from optkit.config import OPTConfig
from optkit.options import check_quantize, dtype_name
from optkit.parallel.rules import (
    CACHE_AXES,
    DEFAULT_RULES,
    check_rules,
    format_rules,
    logical_sharding,
)
from optkit.quant import quantize_specs, spec_dtype
from optkit.weights.layout import ParamSpec, param_specs


class PlanError(ValueError):
    """A plan that cannot run a model (the message says why and what would)."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage, as even as possible; extra layers go to middle stages first (the
    first and last stages also hold the embedding and the LM head)."""
    base, extra = divmod(num_layers, pp)
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 1 else [0]
    sizes = [base] * pp
    for s in order[:extra]:
        sizes[s] += 1
    return tuple(sizes)


def split_rows(batch: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges of ``batch`` rows (sizes differ by at most one)."""
    parts = max(1, min(parts, batch))
    base, extra = divmod(batch, parts)
    out, lo = [], 0
    for j in range(parts):
        hi = lo + base + (j < extra)
        out.append((lo, hi))
        lo = hi
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one model runs on ``dp * tp * pp`` devices.

    Args:
      dp: data-parallel replicas (batch rows split over them).
      tp: tensor-parallel degree (heads, MLP columns and vocabulary split; must divide the
        head count).
      pp: pipeline stages (consecutive layers, each stage on its own ``dp x tp`` sub-mesh).
      micro_batches: batch slices in flight through the pipeline (``pp > 1`` only).
      dtype: ``auto`` (fp16 on accelerators, fp32 on CPU), ``float32``, ``float16``,
        ``bfloat16``.
      stages: layers per stage (default: as even as possible).
      rules: logical axis -> mesh axis table (default: ``rules.DEFAULT_RULES``).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    dtype: str = "auto"
    stages: tuple[int, ...] | None = None
    rules: Mapping = dataclasses.field(default=None, hash=False, compare=True)

    def __post_init__(self):
        for f in ("dp", "tp", "pp", "micro_batches"):
            v = getattr(self, f)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
                raise PlanError(f"Plan.{f} must be a positive integer; got {v!r}")
            object.__setattr__(self, f, int(v))
        if self.micro_batches > 1 and self.pp == 1:
            raise PlanError("micro_batches > 1 only applies to pipeline plans (pp > 1)")
        try:
            object.__setattr__(self, "dtype", dtype_name(self.dtype))
        except ValueError as e:
            raise PlanError(f"Plan.dtype: {e}") from None
        if self.stages is not None:
            stages = tuple(int(s) for s in self.stages)
            if len(stages) != self.pp or min(stages) < 1:
                raise PlanError(f"stages={stages} must list pp={self.pp} positive layer counts")
            object.__setattr__(self, "stages", stages)
        try:
            rules = check_rules(DEFAULT_RULES if self.rules is None else self.rules)
        except ValueError as e:
            raise PlanError(str(e)) from None
        if self.pp > 1 and rules.get("layers") != "stage":
            raise PlanError(f"pp={self.pp} needs the rule layers -> stage; rules are {rules}")
        object.__setattr__(self, "rules", rules)

    # Shape ---------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def name(self) -> str:
        s = f"dp{self.dp}-tp{self.tp}-pp{self.pp}"
        return s + (f"-mb{self.micro_batches}" if self.pp > 1 else "")

    def replace(self, **kw) -> Plan:
        return dataclasses.replace(self, **kw)

    @classmethod
    def parse(cls, text: str) -> Plan:
        """``dp=2,tp=4,pp=1,mb=2`` (or ``dp2-tp4-pp1-mb2``) -> Plan."""
        keys = {"dp": "dp", "tp": "tp", "pp": "pp", "mb": "micro_batches",
                "micro_batches": "micro_batches"}
        kw = {}
        for part in re.split(r"[,\s-]+", text.strip()):
            if not part:
                continue
            m = re.fullmatch(r"([a-z_]+)=?(\d+)", part)
            if not m or m.group(1) not in keys:
                raise PlanError(f"cannot parse plan {text!r}: use e.g. 'dp=2,tp=4,pp=1,mb=1'")
            kw[keys[m.group(1)]] = int(m.group(2))
        return cls(**kw)

    # Model fit -----------------------------------------------------------------------------
    def stage_layers(self, cfg: OPTConfig) -> tuple[int, ...]:
        self.validate(cfg)
        return self.stages or split_layers(cfg.num_hidden_layers, self.pp)

    def stage_ranges(self, cfg: OPTConfig) -> list[range]:
        out, lo = [], 0
        for n in self.stage_layers(cfg):
            out.append(range(lo, lo + n))
            lo += n
        return out

    def validate(self, cfg: OPTConfig, batch: int | None = None) -> None:
        """Raise :class:`PlanError` if this plan cannot run ``cfg`` exactly."""
        a, f, n = cfg.num_attention_heads, cfg.ffn_dim, cfg.num_hidden_layers
        splits = self.rules
        if self.tp > 1 and splits.get("heads") == "tensor" and a % self.tp:
            raise PlanError(
                f"tp={self.tp} does not divide the {a} attention heads of {cfg.name}: tensor "
                f"parallelism splits whole heads; use tp in {divisors(a)}")
        if self.tp > 1 and splits.get("mlp") == "tensor" and f % self.tp:
            raise PlanError(f"tp={self.tp} does not divide ffn_dim={f} of {cfg.name}; use tp in "
                            f"{[d for d in divisors(f) if a % d == 0]}")
        if self.pp > n:
            raise PlanError(f"pp={self.pp} stages need at least one layer each, but {cfg.name} "
                            f"has {n} layers; use pp <= {n}")
        if self.stages is not None and sum(self.stages) != n:
            raise PlanError(f"stages={self.stages} hold {sum(self.stages)} layers; {cfg.name} "
                            f"has {n}")
        if batch is not None and self.micro_batches > batch:
            raise PlanError(f"{self.micro_batches} micro-batches need a batch of at least "
                            f"{self.micro_batches} rows; got {batch}")

    def notes(self, cfg: OPTConfig, batch: int | None = None) -> list[str]:
        """Dimensions that stay replicated because the mesh does not divide them."""
        out = []
        if self.tp > 1 and self.rules.get("vocab") == "tensor" and cfg.vocab_size % self.tp:
            out.append(f"vocab {cfg.vocab_size} is not a multiple of tp={self.tp}: the "
                       f"embedding / LM head stay replicated over tensor")
        if batch is not None and self.dp > 1:
            sizes = {hi - lo for lo, hi in split_rows(batch, self.micro_batches)}
            if any(s % self.dp for s in sizes):
                out.append(f"micro-batches of {sorted(sizes)} rows do not split over dp="
                           f"{self.dp}: rows are replicated (correct but redundant)")
        return out

    # Devices -------------------------------------------------------------------------------
    def device_grid(self, devices: Sequence[jax.Device] | None = None) -> np.ndarray:
        """The plan's devices as a (stage, data, tensor) array, taken from ``devices`` in
        order (default ``jax.devices()``)."""
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) < self.num_devices:
            raise PlanError(f"plan {self.name} needs {self.num_devices} devices; only "
                            f"{len(devices)} given")
        grid = np.empty(self.num_devices, dtype=object)
        grid[:] = devices[:self.num_devices]
        return grid.reshape(self.pp, self.dp, self.tp)

    def mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        return Mesh(self.device_grid(devices), ("stage", "data", "tensor"))

    def stage_meshes(self, devices: Sequence[jax.Device] | None = None) -> list[Mesh]:
        return [Mesh(g, ("data", "tensor")) for g in self.device_grid(devices)]

    def abstract_stage_mesh(self) -> AbstractMesh:
        return AbstractMesh((self.dp, self.tp), ("data", "tensor"))

    def micro_batch_rows(self, batch: int) -> list[tuple[int, int]]:
        return split_rows(batch, self.micro_batches if self.pp > 1 else 1)

    # Memory (analytic) ---------------------------------------------------------------------
    def stage_memory(self, cfg: OPTConfig, batch: int, seq_len: int, itemsize: int,
                     quantize: str | None = None) -> list[dict[str, int]]:
        """Per-device bytes of each stage's weights and KV cache, from shapes and rules
        (``quantize="int8"``: int8 matmul kernels with fp32 scales)."""
        mesh = self.abstract_stage_mesh()
        dtype = {4: jnp.float32, 2: jnp.float16}[itemsize]
        out = []
        for s, layers in enumerate(self.stage_ranges(cfg)):
            specs = stage_specs(cfg, layers, first=s == 0, last=s == self.pp - 1,
                                quantize=quantize)
            w = sum(_shard_size(p.axes, p.shape, self.rules, mesh) *
                    spec_dtype(p, dtype).itemsize for p in specs)
            kv = 0
            for lo, hi in self.micro_batch_rows(batch):
                shape = (hi - lo, seq_len, cfg.num_attention_heads, cfg.head_dim)
                kv += 2 * len(layers) * _shard_size(CACHE_AXES["kv"], shape, self.rules, mesh)
            out.append({"weights": w, "kv_cache": kv * itemsize})
        return out

    # Printing ------------------------------------------------------------------------------
    def describe(self, cfg: OPTConfig | None = None, devices=None, batch: int | None = None,
                 seq_len: int | None = None, quantize: str | None = None) -> str:
        """The plan as one table (per-stage layers, devices and memory when ``cfg`` is given;
        ``quantize="int8"``: weights sized as int8 kernels)."""
        rows = [("plan", f"{self.name}: dp={self.dp} x tp={self.tp} x pp={self.pp} = "
                         f"{self.num_devices} devices"),
                ("mesh", f"stage {self.pp} x data {self.dp} x tensor {self.tp}"),
                ("rules", format_rules(self.rules)),
                ("micro-batches", str(self.micro_batches)),
                ("dtype", self.dtype)]
        if cfg is None:
            rows.append(("stage layers", "even split" if self.stages is None
                         else " ".join(map(str, self.stages))))
        else:
            itemsize = 4 if self.dtype in ("auto", "float32") else 2
            mem = self.stage_memory(cfg, batch or 1, seq_len or cfg.max_position_embeddings,
                                    itemsize, quantize)
            ids = None
            if devices is not None:
                ids = [[d.id for d in g.reshape(-1)] for g in self.device_grid(devices)]
            for s, layers in enumerate(self.stage_ranges(cfg)):
                extra = [x for x, on in (("embed", s == 0), ("lm-head", s == self.pp - 1)) if on]
                dev = (f"devices {ids[s][0]}-{ids[s][-1]}" if ids else
                       f"devices {s * self.dp * self.tp}-{(s + 1) * self.dp * self.tp - 1}")
                rows.append((f"stage {s}",
                             f"layers {layers.start}-{layers.stop - 1} "
                             f"({len(layers)}{' + ' + ' + '.join(extra) if extra else ''}), "
                             f"{dev}, {mem[s]['weights'] / 2**20:,.1f} MiB "
                             f"{'int8 ' if quantize else ''}weights/device"
                             + ("" if batch is None else
                                f", {mem[s]['kv_cache'] / 2**20:,.1f} MiB KV/device")))
            for note in self.notes(cfg, batch):
                rows.append(("note", note))
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 2 + max(len(v) for _, v in rows))
        return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])

    def __str__(self) -> str:
        return self.describe()


def _shard_size(axes, shape, rules, mesh) -> int:
    shape = tuple(shape)
    return math.prod(logical_sharding(mesh, rules, tuple(axes), shape).shard_shape(shape))


#: Top-level params the first / last pipeline stage holds (the LM head is tied to the
#: token embedding, so with pp > 1 both ends hold a copy of ``embed_tokens``).
FIRST_STAGE = ("embed_tokens", "embed_positions", "project_in")
LAST_STAGE = ("final_ln", "project_out", "embed_tokens")


def stage_of(path: tuple, ranges: list[range]) -> int:
    """The stage that holds the parameter at ``path`` (the first, for ``embed_tokens``)."""
    if path[0] == "layers":
        for s, r in enumerate(ranges):
            if path[1] in r:
                return s
        raise PlanError(f"layer {path[1]} is in no stage")
    return 0 if path[0] in FIRST_STAGE else len(ranges) - 1


def stage_specs(cfg: OPTConfig, layers: range, first: bool, last: bool,
                quantize: str | None = None) -> list[ParamSpec]:
    """Shapes and axes of the parameters one stage holds (layers re-numbered from 0; for
    sizes and abstract compiles, not for reading: their folder keys are re-numbered too);
    ``quantize="int8"``: the int8 model's table (:func:`optkit.quant.quantize_specs`)."""
    out = []
    sub = cfg.replace(num_hidden_layers=len(layers)) if len(layers) else None
    for spec in param_specs(cfg if sub is None else sub):
        top = spec.path[0]
        if top == "layers" or (first and top in FIRST_STAGE) or (last and top in LAST_STAGE):
            out.append(spec)
    if sub is None:  # no layers: param_specs(cfg) listed every layer
        out = [s for s in out if s.path[0] != "layers"]
    check_quantize(quantize)
    return quantize_specs(out) if quantize else out
