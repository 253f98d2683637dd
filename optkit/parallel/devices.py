"""Device descriptions for the planner: real devices, or clusters you only describe.

A :class:`DeviceSpec` is what the roofline needs of one accelerator (memory, HBM bandwidth,
dense 16-bit FLOP/s, per-direction link bandwidth inside a host); a :class:`Cluster` is a
count of them, grouped into hosts joined by a slower network.  Preset numbers are the
vendors' datasheet peaks (SXM parts); memory is what ``nvidia-smi`` reports.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax

GiB = 2 ** 30
MiB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One device: ``memory`` bytes, ``hbm_bandwidth`` bytes/s, ``flops`` FLOP/s (dense,
    16-bit; fp32 for CPUs), ``link_bandwidth`` bytes/s per direction to a device of the same
    host."""

    name: str
    memory: int
    hbm_bandwidth: float
    flops: float
    link_bandwidth: float
    platform: str = "gpu"

    def replace(self, **kw) -> DeviceSpec:
        return dataclasses.replace(self, **kw)


DEVICE_PRESETS: dict[str, DeviceSpec] = {d.name: d for d in [
    DeviceSpec("V100-16GB", 16 * GiB, 900e9, 125e12, 150e9),
    DeviceSpec("V100-32GB", 32 * GiB, 900e9, 125e12, 150e9),
    DeviceSpec("A100-40GB", 40 * GiB, 1555e9, 312e12, 300e9),
    DeviceSpec("A100-80GB", 80 * GiB, 2039e9, 312e12, 300e9),
    DeviceSpec("H100-80GB", 81559 * MiB, 3350e9, 989e12, 450e9),
    DeviceSpec("H200-141GB", 143771 * MiB, 4800e9, 989e12, 450e9),
]}

#: Network between hosts, bytes/s per host and direction (100 Gb/s, the seed's cluster).
DEFAULT_INTER_HOST = 12.5e9


def parse_size(text: str | int | float) -> float:
    """``16GiB`` / ``80GB`` / ``900GB/s`` / ``125T`` / ``12.5e9`` -> a number (bytes or
    per-second units; ``Gb`` (bits) divides by 8)."""
    if isinstance(text, int | float):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKMGTP]?)(i?)([bB]?)(?:/s)?\s*", str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 16GiB, 900GB/s, 125T")
    value, prefix, binary, unit = m.groups()
    power = " kMGTP".index(prefix.replace("K", "k")) if prefix else 0
    base = 1024 if binary else 1000
    out = float(value) * base ** power
    return out / 8 if unit == "b" else out


def match_preset(name: str) -> DeviceSpec | None:
    """The preset a device kind string (``NVIDIA H100 80GB HBM3``) or name refers to."""
    key = name.upper().replace(" ", "").replace("_", "-")
    if name in DEVICE_PRESETS:
        return DEVICE_PRESETS[name]
    for family, default in (("H200", "H200-141GB"), ("H100", "H100-80GB"),
                            ("A100", "A100-80GB"), ("V100", "V100-16GB")):
        if family in key:
            for preset in DEVICE_PRESETS:
                size = preset.split("-")[1]
                if preset.startswith(family) and size in key:
                    return DEVICE_PRESETS[preset]
            if family == "A100" and "40G" in key:
                return DEVICE_PRESETS["A100-40GB"]
            return DEVICE_PRESETS[default]
    return None


def preset_for_memory(memory: float) -> DeviceSpec | None:
    """The first preset whose memory is within 10% of ``memory`` bytes."""
    for spec in DEVICE_PRESETS.values():
        if abs(spec.memory - memory) <= 0.1 * spec.memory:
            return spec
    return None


@dataclasses.dataclass(frozen=True)
class Cluster:
    """``count`` devices of one kind, ``per_host`` to a host (``None``: one host).

    ``memory_fraction`` of each device's memory is the planner's budget (the rest is left to
    the runtime: CUDA context, allocator fragmentation).  ``devices`` holds the real JAX
    devices when the cluster describes this machine (plans can then be measured).
    """

    device: DeviceSpec
    count: int
    per_host: int | None = None
    inter_host_bandwidth: float = DEFAULT_INTER_HOST
    memory_fraction: float = 0.9
    devices: tuple | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"a cluster needs at least one device; got {self.count}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must lie in (0, 1]; got {self.memory_fraction}")

    @classmethod
    def preset(cls, name: str, count: int, **kw) -> Cluster:
        spec = DEVICE_PRESETS.get(name) or match_preset(name)
        if spec is None:
            raise ValueError(f"unknown device {name!r}; presets: {', '.join(DEVICE_PRESETS)}")
        return cls(spec, count, **kw)

    @classmethod
    def from_devices(cls, devices: Sequence[jax.Device] | None = None, **kw) -> Cluster:
        """The cluster of real ``devices`` (default ``jax.devices()``), with memory from the
        runtime's allocator limit and speeds from the matching preset."""
        devices = tuple(jax.devices() if devices is None else devices)
        d0 = devices[0]
        hosts = {d.process_index for d in devices}
        per_host = len(devices) // len(hosts) if len(hosts) > 1 else None
        if d0.platform == "cpu":
            import psutil

            mem = psutil.virtual_memory().total // len(devices)
            spec = DeviceSpec("cpu", int(mem), 10e9 / len(devices),
                              50e9 / len(devices), 5e9, platform="cpu")
            kw.setdefault("memory_fraction", 0.8)
        else:
            spec = match_preset(d0.device_kind) or DEVICE_PRESETS["A100-80GB"]
            stats = d0.memory_stats() or {}
            limit = stats.get("bytes_limit")
            spec = spec.replace(name=d0.device_kind, platform=d0.platform,
                                memory=int(limit) if limit else spec.memory)
            if limit:  # the allocator limit already leaves room for the runtime
                kw.setdefault("memory_fraction", 0.95)
        return cls(spec, len(devices), per_host=per_host, devices=devices, **kw)

    # Derived -------------------------------------------------------------------------------
    @property
    def budget(self) -> float:
        """Bytes a plan may use on each device."""
        return self.device.memory * self.memory_fraction

    @property
    def hosts(self) -> int:
        return 1 if not self.per_host else -(-self.count // self.per_host)

    def spans_hosts(self, first: int, count: int) -> bool:
        """Whether devices ``first .. first + count - 1`` lie on more than one host."""
        if not self.per_host:
            return False
        return first // self.per_host != (first + count - 1) // self.per_host

    def bandwidth(self, first: int, count: int) -> float:
        """Per-direction bandwidth among devices ``first .. first + count - 1``."""
        return self.inter_host_bandwidth if self.spans_hosts(first, count) else \
            self.device.link_bandwidth

    def describe(self) -> str:
        d = self.device
        hosts = f" on {self.hosts} hosts of {self.per_host}" if self.per_host else ""
        net = (f", {self.inter_host_bandwidth / 1e9:g} GB/s between hosts"
               if self.per_host and self.hosts > 1 else "")
        return (f"{self.count} x {d.name}{hosts}: {d.memory / GiB:.1f} GiB "
                f"(budget {self.budget / GiB:.1f} GiB = {self.memory_fraction:.0%}), "
                f"{d.hbm_bandwidth / 1e9:g} GB/s HBM, {d.flops / 1e12:g} TFLOP/s, "
                f"{d.link_bandwidth / 1e9:g} GB/s links{net}")
