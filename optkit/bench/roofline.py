"""The FLOP/byte model of OPT generation and the device peaks it is measured against.

FLOPs count the matrix multiplies the hardware executes: per token through the layers
``2 L (4 H^2 + 2 H F)`` (Q, K, V, output, FC1, FC2), plus ``4 H L`` per attended
(query, key) pair (``QK^T`` and ``PV``), plus the LM head ``2 E V`` per token whose logits
are computed (and ``2 E H`` per token for each of opt-350m's projections).  Layer norms,
softmax, biases and embeddings are left out.  Bytes of a decode step: every weight read once
plus the K and V cache of the attended positions.

:func:`device_peaks` measures what bounds those costs on the first JAX device: the bandwidth
of a read-only reduction (decode only reads its weights) and the rate of a square matmul.
``benchmarks/gpu_decode.py``, :func:`optkit.bench.run_benchmark` and ``optkit bench
textgen`` all use this module.
"""

from __future__ import annotations

import functools
import time

from optkit.config import OPTConfig


def _layer_flops(cfg: OPTConfig) -> int:
    """Matmul FLOPs of one token through every layer (no attention over the cache)."""
    h, f = cfg.hidden_size, cfg.ffn_dim
    return 2 * cfg.num_hidden_layers * (4 * h * h + 2 * h * f)


def _head_flops(cfg: OPTConfig) -> int:
    return 2 * cfg.word_embed_proj_dim * cfg.vocab_size


def _proj_flops(cfg: OPTConfig) -> int:
    """opt-350m's input and output projections, per token each."""
    return 2 * cfg.word_embed_proj_dim * cfg.hidden_size if cfg.has_projections else 0


def _pair_flops(cfg: OPTConfig) -> int:
    return 4 * cfg.hidden_size * cfg.num_hidden_layers


def decode_step_flops(cfg: OPTConfig, batch: int, context: float) -> float:
    """FLOPs of one decode step of ``batch`` rows, each attending to ``context`` positions."""
    per_row = (_layer_flops(cfg) + _head_flops(cfg) + 2 * _proj_flops(cfg)
               + _pair_flops(cfg) * context)
    return float(batch * per_row)


def decode_step_bytes(cfg: OPTConfig, batch: int, context: float, itemsize: int) -> float:
    """Bytes one decode step reads: every weight once plus the K and V of ``context``
    positions for each of ``batch`` rows."""
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.hidden_size * itemsize
    return float(cfg.num_params() * itemsize + kv)


def decode_step_cost(cfg: OPTConfig, batch: int, context: float,
                     itemsize: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step (:func:`decode_step_flops`,
    :func:`decode_step_bytes`)."""
    return decode_step_flops(cfg, batch, context), decode_step_bytes(cfg, batch, context,
                                                                      itemsize)


def prefill_flops(cfg: OPTConfig, rows: int, prompt_len: int) -> float:
    """FLOPs of a prefill of ``rows`` prompts of ``prompt_len`` tokens (causal pairs; logits
    of the last position only)."""
    t = prompt_len
    pairs = t * (t + 1) / 2
    return float(rows * (_layer_flops(cfg) * t + _pair_flops(cfg) * pairs + _head_flops(cfg)
                         + _proj_flops(cfg) * (t + 1)))


def generation_flops(cfg: OPTConfig, rows: int, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of generating ``new_tokens`` per row for ``rows`` rows whose prompts are padded
    to ``prompt_len``: the prefill, then one decode step per token after the first (the last
    generated token is never fed back)."""
    if new_tokens < 1:
        return 0.0
    total = prefill_flops(cfg, rows, prompt_len)
    for i in range(1, new_tokens):
        total += decode_step_flops(cfg, rows, prompt_len + i)
    return total


def bandwidth_floor_s(step_bytes: float, read_bytes_per_s: float, devices: int = 1) -> float:
    """The shortest a decode step can take: its bytes read at ``read_bytes_per_s``, split
    evenly over ``devices`` (tensor parallelism's ideal)."""
    return step_bytes / max(devices, 1) / read_bytes_per_s


def _best_time(fn, *args, runs: int = 5) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=8)
def device_peaks(platform: str | None = None, dtype: str = "float32") -> dict:
    """Measured peaks of the first JAX device (cached per process):

    * ``peak_gbyte_per_s``: the best of a few read-only reductions over a large array (256 MiB
      on CPUs, 4 GiB elsewhere; layouts differ in how well XLA tiles them) — the bandwidth
      that bounds decoding;
    * ``peak_tflops``: a square matmul in ``dtype`` (1024 on CPUs, 8192 elsewhere).
    """
    import jax
    import jax.numpy as jnp

    dev = jax.devices(platform)[0] if platform else jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    n_bytes = (256 if on_cpu else 4096) * 2**20
    cols = 8192
    size = 1024 if on_cpu else 8192
    reductions = [lambda a: jnp.sum(a, dtype=jnp.float32),
                  lambda a: jnp.sum(a, axis=1, dtype=jnp.float32)]
    if not on_cpu:
        reductions.append(lambda a: jnp.max(a, axis=0))
    with jax.default_device(dev):
        x = jnp.ones((n_bytes // 2 // cols, cols), jnp.float16)
        t_read = min(_best_time(jax.jit(f), x) for f in reductions)
        a = jnp.ones((size, size), jnp.dtype(dtype))
        t_mm = _best_time(jax.jit(lambda m: m @ m), a)
    del x, a
    return {"peak_gbyte_per_s": n_bytes / t_read / 1e9,
            "peak_tflops": 2 * size**3 / t_mm / 1e12, "peaks_measured_on": dev.device_kind}
