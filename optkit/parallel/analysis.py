"""Abstract compiles of pipeline stages: XLA's own memory and cost figures, no weights.

A :class:`StageJob` names one stage step (prefill or decode; first/last stage; layer count;
micro-batch rows; sub-mesh ``dp x tp``).  :func:`compile_job` lowers the same jitted function
the executors run with ``jax.ShapeDtypeStruct`` arguments carrying their shardings, compiles
it, and reads ``memory_analysis()``, ``cost_analysis()`` and the collectives in the optimized
HLO into a :class:`Cost`.

Described clusters are compiled on fake CPU devices.  XLA's CPU backend computes 16-bit
matmuls in f32 (it adds f32 copies of the weights as temporaries), so 16-bit jobs on CPU are
compiled in f32 and the byte counts of arguments, outputs and collectives are halved
(``Cost.scaled``; temporaries keep their f32 size, an upper bound).  Jobs that need more CPU
devices than this process has run in a subprocess (``python -m optkit.parallel.analysis``)
started with ``jax_num_cpu_devices`` set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from optkit.config import OPTConfig
from optkit.options import Kernels
from optkit.parallel.placement import Placement
from optkit.parallel.plan import stage_specs
from optkit.parallel.stages import stage_decode, stage_prefill
from optkit.quant import spec_dtype
from optkit.weights.layout import tree_from_specs

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class StageJob:
    """One abstract compile: a stage step on a ``dp x tp`` sub-mesh."""

    kind: str  # "prefill" | "decode"
    dp: int
    tp: int
    rules: tuple  # sorted (logical, mesh axis) pairs
    batch: int  # micro-batch rows
    prompt_len: int
    cache_len: int
    first: bool
    last: bool
    layers: int
    dtype: str  # the dtype compiled (see module docstring)
    quantize: str | None = None  # "int8": int8 matmul kernels (optkit.quant)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> StageJob:
        d = dict(d)
        d["rules"] = tuple((name, tuple(t) if isinstance(t, list) else t)
                           for name, t in d["rules"])
        return cls(**d)


@dataclasses.dataclass
class Cost:
    """What XLA says one device does and holds for one compiled step."""

    flops: float = 0.0
    bytes_accessed: float = 0.0
    argument: float = 0.0
    output: float = 0.0
    alias: float = 0.0
    temp: float = 0.0
    #: "op:group_size" -> [count, bytes]
    collectives: dict = dataclasses.field(default_factory=dict)

    @property
    def traffic(self) -> float:
        """HBM bytes if every buffer is touched once: arguments read, non-aliased outputs
        written, temporaries written and read.  (XLA:CPU's "bytes accessed" counts an
        in-place cache update as a full copy, so it is not used for the roofline.)"""
        return self.argument + max(0.0, self.output - self.alias) + 2 * self.temp

    @property
    def live(self) -> float:
        """Bytes resident while the step runs: inputs, non-aliased outputs, temporaries."""
        return self.argument + self.output - self.alias + self.temp

    def combine(self, other: Cost, a: float = 1.0, b: float = 1.0) -> Cost:
        """``a * self + b * other`` (linear extrapolation over layers)."""
        out = Cost(**{f: a * getattr(self, f) + b * getattr(other, f)
                      for f in ("flops", "bytes_accessed", "argument", "output", "alias",
                                "temp")})
        for key in set(self.collectives) | set(other.collectives):
            x = self.collectives.get(key, [0, 0])
            y = other.collectives.get(key, [0, 0])
            out.collectives[key] = [max(0.0, a * x[0] + b * y[0]), max(0.0, a * x[1] + b * y[1])]
        out.temp = max(out.temp, 0.0)
        return out

    def scaled(self, factor: float) -> Cost:
        """Byte counts times ``factor`` (f32 compiles standing in for 16-bit plans).
        Temporaries keep their f32 size: an upper bound, since attention scores and
        LayerNorm statistics are f32 in 16-bit models too."""
        out = dataclasses.replace(self, collectives={k: [v[0], v[1] * factor]
                                                     for k, v in self.collectives.items()})
        for f in ("bytes_accessed", "argument", "output", "alias"):
            setattr(out, f, getattr(self, f) * factor)
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Reading XLA's analyses (jax 0.10 returns a dict from cost_analysis(), older ones a list)
# --------------------------------------------------------------------------------------------
def _cost_dict(stage) -> dict:
    """``cost_analysis()`` of a lowered or compiled module as one dict."""
    ca = stage.cost_analysis()
    if isinstance(ca, list | tuple):
        merged: dict = {}
        for d in ca:
            for k, v in (d or {}).items():
                merged[k] = merged.get(k, 0.0) + float(v)
        return merged
    return dict(ca or {})


def _shape_bytes(shape: str) -> list[int]:
    """Bytes of each array in an HLO shape string (``f32[2,3]{1,0}`` or a tuple of them)."""
    out = []
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", shape):
        if dtype in _ITEMSIZE:
            n = int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1
            out.append(n * _ITEMSIZE[dtype])
    return out


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'?([A-Za-z_0-9]+)'?=(\d+)", m.group(1)))
        names = re.findall(r"'?([A-Za-z_0-9]+)'?", m.group(2))
        return int(np.prod([int(sizes.get(n, 1)) for n in names])) if names else num_devices
    if "source_target_pairs" in line:
        return 2
    return num_devices


def hlo_collectives(hlo_text: str, num_devices: int) -> dict:
    """"op:group_size" -> [count, bytes] of the collectives in optimized HLO text."""
    out: dict = {}
    pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        sizes = _shape_bytes(m.group(1))
        if not sizes:
            continue
        op = m.group(2)
        nbytes = sizes[-1] if m.group(3) and len(sizes) > 1 else sum(sizes)
        key = f"{op}:{_group_size(line, num_devices)}"
        c = out.setdefault(key, [0, 0])
        c[0] += 1
        c[1] += nbytes
    return out


def cost_of(compiled, num_devices: int) -> Cost:
    """A :class:`Cost` from a compiled executable (per device)."""
    ma = compiled.memory_analysis()
    ca = _cost_dict(compiled)
    get = (lambda name: float(getattr(ma, name, 0) or 0)) if ma is not None else (lambda n: 0.0)
    return Cost(flops=float(ca.get("flops", 0.0)),
                bytes_accessed=float(ca.get("bytes accessed", 0.0)),
                argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
                alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
                collectives=hlo_collectives(compiled.as_text(), num_devices))


# --------------------------------------------------------------------------------------------
# Compiling a job
# --------------------------------------------------------------------------------------------
def _abstract(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        tree, shardings)


def lower_job(cfg: OPTConfig, job: StageJob, devices: Sequence[jax.Device]):
    """The job's jitted stage function, lowered with abstract (sharded) arguments."""
    from optkit import model as M

    n = job.dp * job.tp
    if len(devices) < n:
        raise ValueError(f"job needs {n} devices; {len(devices)} given")
    grid = np.empty(n, dtype=object)
    grid[:] = list(devices[:n])
    mesh = Mesh(grid.reshape(job.dp, job.tp), ("data", "tensor"))
    dtype = jnp.dtype(job.dtype)
    sub = cfg.replace(num_hidden_layers=job.layers)
    place = Placement(sub, mesh, dict(job.rules))
    specs = stage_specs(cfg, range(job.layers), job.first, job.last, job.quantize)
    params = tree_from_specs(specs, lambda s: jax.ShapeDtypeStruct(
        s.shape, spec_dtype(s, dtype), sharding=place.param(s)))
    b, t, s_len = job.batch, job.prompt_len, job.cache_len
    cache = _abstract(jax.eval_shape(lambda: M.init_cache(sub, b, s_len, dtype)),
                      place.cache(b, s_len))
    h, v = cfg.hidden_size, cfg.vocab_size
    lookup = place.embed_lookup if job.first else None  # as the executors look tokens up

    def arg(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=place.batch(shape))

    if job.kind == "prefill":
        x = arg((b, t), jnp.int32) if job.first else arg((b, t, h), dtype)
        out = (b, v) if job.last else (b, t, h)
        fn = jax.jit(lambda p, x, m, c: stage_prefill(p, sub, x, m, c, first=job.first,
                                                       last=job.last, lookup=lookup),
                     donate_argnums=(3,),
                     out_shardings=(place.logits(out) if job.last else place.batch(out),
                                    place.cache(b, s_len)))
        return fn.lower(params, x, arg((b, t), jnp.int32), cache)
    if job.kind != "decode":
        raise ValueError(f"unknown job kind {job.kind!r}")
    x = arg((b,), jnp.int32) if job.first else arg((b, 1, h), dtype)
    out = (b, v) if job.last else (b, 1, h)
    # Pallas kernels on GPUs as ``auto`` picks them (int8 products stay XLA's here)
    kern = place.decode_kernels(Kernels(), b, s_len, int8=False, dtype=dtype)
    fn = jax.jit(lambda p, x, c: stage_decode(p, sub, x, c, first=job.first, last=job.last,
                                              lookup=lookup, **kern),
                 donate_argnums=(2,),
                 out_shardings=(place.logits(out) if job.last else place.batch(out),
                                place.cache(b, s_len)))
    return fn.lower(params, x, cache)


#: The CPU executables are only analysed, never run: skipping LLVM's optimisations leaves
#: XLA's memory and cost analyses unchanged and compiles 2-3x faster.
CPU_ANALYSIS_OPTIONS = {"xla_backend_optimization_level": 0}


def unpartitioned_flops(cfg: OPTConfig, job: StageJob) -> float:
    """Flops of the job's whole step on one device, from XLA:CPU's analysis of the lowered
    (not compiled) module."""
    one = dataclasses.replace(job, dp=1, tp=1)
    return float(_cost_dict(lower_job(cfg, one, jax.devices("cpu")[:1])).get("flops", 0.0))


def compile_job(cfg: OPTConfig, job: StageJob, devices: Sequence[jax.Device]) -> Cost:
    """The job's :class:`Cost` per device.

    XLA:GPU's analysis of a compiled step counts no flops for the GEMMs it hands to cuBLAS
    (seen on jax 0.11.2: 2.2 GFLOP for an opt-13b layer's 2048-token prefill of 1.3 TFLOP),
    and it analyses no lowered modules; off CPU, flops are therefore the step's unpartitioned
    flops (:func:`unpartitioned_flops`) split over the job's devices, where that is more."""
    lowered = lower_job(cfg, job, devices)
    if devices[0].platform == "cpu":
        return cost_of(lowered.compile(compiler_options=CPU_ANALYSIS_OPTIONS), job.dp * job.tp)
    cost = cost_of(lowered.compile(), job.dp * job.tp)
    cost.flops = max(cost.flops, unpartitioned_flops(cfg, job) / (job.dp * job.tp))
    return cost


def compile_jobs(cfg: OPTConfig, jobs: Sequence[StageJob], devices: Sequence[jax.Device],
                 progress: bool = True) -> list[Cost]:
    from tqdm.auto import tqdm

    return [compile_job(cfg, j, devices) for j in
            tqdm(jobs, desc=f"compile {cfg.name} stages", disable=not progress, leave=False)]


def compile_jobs_on_fake_cpus(cfg: OPTConfig, jobs: Sequence[StageJob], num_devices: int,
                              progress: bool = True) -> list[Cost]:
    """Compile on ``num_devices`` fake CPU devices: here if this process has them, else in a
    subprocess started with that many."""
    if not jobs:
        return []
    try:
        cpus = jax.devices("cpu")
    except RuntimeError:
        cpus = []
    if len(cpus) >= num_devices:
        return compile_jobs(cfg, jobs, cpus, progress)
    request = {"cfg": dataclasses.asdict(cfg), "devices": num_devices, "progress": progress,
               "jobs": [j.to_json() for j in jobs]}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    # With progress the worker's bar (stderr) shows live; otherwise stderr is kept for errors.
    proc = subprocess.run([sys.executable, "-m", "optkit.parallel.analysis"],
                          input=json.dumps(request), stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"abstract compile on {num_devices} fake CPU devices failed "
                           f"(exit {proc.returncode}):\n{(proc.stderr or '')[-4000:]}")
    return [Cost(**c) for c in json.loads(proc.stdout)]


def _main() -> int:
    request = json.loads(sys.stdin.read())
    jax.config.update("jax_num_cpu_devices", int(request["devices"]))
    cfg = OPTConfig(**request["cfg"])
    jobs = [StageJob.from_json(j) for j in request["jobs"]]
    costs = compile_jobs(cfg, jobs, jax.devices("cpu"), progress=request.get("progress", False))
    sys.stdout.write(json.dumps([c.to_json() for c in costs]))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
