"""GPU decode/prefill benchmark: optkit (JAX) vs HF transformers eager and static-cache+compile.

Runs on one card with only what the GPU machine has (jax, torch, transformers; no network).
Each (framework, model size) runs in its own subprocess so allocators never compete; every
row goes to a JSONL file with the card, software versions and the same run's ceilings
(read bandwidth, copy bandwidth, matmul rate).

    python benchmarks/gpu_decode.py --sizes 6.7b,13b --batches 1,16,64 --out results.jsonl

Per-step decode time = (time of 128 new tokens - time of the prefill) / 127, greedy, EOS
ignored.  Bandwidth floor of a step = (weight bytes + live KV bytes read) / read bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CB = "--xla_gpu_enable_command_buffer="
#: Named XLA flag sets tried for optkit (recorded in every row).
_NCCL_SYNC = ("--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false "
              "--xla_gpu_disable_async_collectives=ALLREDUCE")
VARIANTS = {
    "default": "",
    "graphs_all": _CB + "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL "
                  "--xla_gpu_graph_min_graph_size=1",
    "no_graphs": _CB,
    "default+sdpa": "",
    "default+cudnn": "",
    "graphs_all+cudnn": _CB + "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL "
                        "--xla_gpu_graph_min_graph_size=1",
    # fp16 kernels output-major (see use_transposed_kernels); int8 ones always are
    "default+gemvT": "",
    "default+dotT": "",
    "graphs_all+gemvT": _CB + "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL "
                        "--xla_gpu_graph_min_graph_size=1",
    "default+packed": "",
    "graphs_all+packed": _CB + "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL "
                         "--xla_gpu_graph_min_graph_size=1",
    # int8 multiply-reduce up to 8 rows instead of 1 (optkit.model.INT8_REDUCE_ROWS)
    "default+rows8": "",
    # tensor-parallel all-reduce latency (decode moves a few KiB per all-reduce)
    "ar_oneshot": "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true",
    "ar_sync": "--xla_gpu_disable_async_collectives=ALLREDUCE",
    "ar_symmetric": "--xla_gpu_experimental_enable_nccl_symmetric_buffers=true",
    "graphs_collectives": _CB + "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES,WHILE,"
                          "CONDITIONAL --xla_gpu_graph_min_graph_size=1",
    "ar_oneshot+sync": "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true "
                       "--xla_gpu_disable_async_collectives=ALLREDUCE",
    # NCCL's low-latency protocol only (see VARIANT_ENV)
    "ar_ll": "",
    "ar_symmetric_ll": "--xla_gpu_experimental_enable_nccl_symmetric_buffers=true",
    # decode attention / int8 products / both through XLA's code instead of the Pallas
    # kernels (the default on GPUs, optkit.parallel.kernels)
    "default+xla_attn": "",
    "default+xla_matvec": "",
    # the default kernels plus the fused residual add + LayerNorm (optkit.kernels.
    # add_layer_norm; not under kernels="auto": no faster on an H200, 2026-11-26)
    "default+norm_kernel": "",
    "default+xla_kernels": "",
    # decode jits without optkit's CUDA-graph options (MeshExecutor.decode_options)
    "default+no_cb": "",
    # the one-device decode options plus collectives in the CUDA graphs (decode jits only)
    "default+cb_collectives": "",
    # several GPUs with the one-device decode options (WHILE graphs, collectives outside
    # them through XLA's one-shot kernel): optkit's default until 2026-11-26
    "default+while_graphs": "",
    # collectives in the CUDA graphs but no WHILE/CONDITIONAL graphs: NCCL collectives in a
    # graph with conditional nodes fail cudaGraphInstantiate (NVIDIA/nccl#1986)
    "default+cb_collectives_nowhile": "",
    # every all-reduce through NCCL (not XLA's one-shot kernel, which stays outside CUDA
    # graphs), on the compute stream, inside CUDA graphs without WHILE/CONDITIONAL nodes:
    # a whole decode step becomes one graph
    "nccl_sync+cb_collectives_nowhile": _NCCL_SYNC,
    # ... and the int8 kernel's weights loaded evict_first (since then its default)
    "nccl_sync+cb_collectives_nowhile+evict": _NCCL_SYNC,
    # int8 products without the tensor-core kernel (optkit.kernels.int8_mma: fp16 models'
    # OPT-175B-sized kernels since 2026-11-26, and 2-16 rows of any kernel it tiles since
    # the ninth session): one row on the CUDA cores (optkit.kernels.int8_matvec), more
    # through XLA's dot
    "default+words": "",
    "default+words+while_graphs": "",
    # the int8 kernel's weight loads without an eviction policy (before: evict_first)
    "default+no_evict": "",
    # fp16 products through XLA's Triton GEMMs at every batch (before 2026-11-26 evening:
    # not through cuBLASLt from optkit.parallel.executor.LARGE_BATCH_ROWS rows on)
    "default+triton_gemm": "",
    # fp16 products through cuBLASLt (bias adds in its epilogues) at every batch, not only
    # from LARGE_BATCH_ROWS rows on
    "default+cublaslt": "",
    # int8 products of up to 16 / 32 rows on the tensor-core kernel (int8_mma.MAX_ROWS: 32
    # since the tenth session, 16 before, when the rows32 rows were measured)
    "default+rows16": "",
    "default+rows32": "",
    # NCCL without its support for graphs mixed with uncaptured launches (less event
    # traffic around each captured collective; see VARIANT_ENV)
    "ar_no_graph_mixing": "",
    # small all-reduces through NVSHMEM where XLA's build has it (experimental; jax
    # 0.11.2's XLA does not know the flag: the run fails)
    "ar_nvshmem": "--xla_gpu_experimental_enable_nvshmem=true",
    # NCCL user-buffer registration of the collectives' buffers
    "ar_user_buffers": "--xla_gpu_enable_nccl_user_buffers=true",
}
# collectives in CUDA graphs without optkit's decode compiler options (which would override
# the flag)
VARIANTS["graphs_collectives+no_cb"] = VARIANTS["graphs_collectives"]
#: Environment variables a variant sets besides XLA_FLAGS (recorded in every row).
VARIANT_ENV = {"ar_ll": {"NCCL_PROTO": "LL"}, "ar_symmetric_ll": {"NCCL_PROTO": "LL"},
               "ar_no_graph_mixing": {"NCCL_GRAPH_MIXING_SUPPORT": "0"}}
#: ... and those set by the caller that change what optkit runs (recorded too).
RECORDED_ENV = ("OPTKIT_CUDA_GRAPHS", "NCCL_PROTO", "NCCL_GRAPH_MIXING_SUPPORT", "XLA_FLAGS")
sys.path.insert(0, str(ROOT))


def versions() -> dict:
    out = {}
    for mod in ("jax", "jaxlib", "torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


# ---------------------------------------------------------------------------------------------
# Ceilings of this card
# ---------------------------------------------------------------------------------------------
def ceilings() -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    def bench(fn, *args, reps=20):
        fn(*args).block_until_ready()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]

    n = 2 ** 31  # 4 GiB of fp16
    x = jax.random.normal(jax.random.key(0), (n // 8192, 8192), jnp.float16)
    # the best of a few read-only reductions (layouts differ in how well XLA tiles them)
    read = min(bench(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x),
               bench(jax.jit(lambda a: jnp.sum(a, axis=1, dtype=jnp.float32)), x),
               bench(jax.jit(lambda a: jnp.max(a, axis=0)), x),
               bench(jax.jit(lambda a: jnp.sum(a.reshape(-1, 64, 8192).astype(jnp.float32),
                                               axis=(1, 2))), x))
    copy = bench(jax.jit(lambda a: a * jnp.float16(1.0001)), x)
    del x
    m = 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.float16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.float16)
    mm = bench(jax.jit(lambda p, q: p @ q), a, b)
    del a, b
    ta = torch.randn(n // 2, device="cuda", dtype=torch.float16)
    tb = torch.empty_like(ta)
    torch.cuda.synchronize()
    for _ in range(3):
        tb.copy_(ta)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        tb.copy_(ta)
    torch.cuda.synchronize()
    tcopy = (time.perf_counter() - t) / 10
    del tb
    tsum = []
    for _ in range(10):  # torch's read-only reductions
        torch.cuda.synchronize()
        t = time.perf_counter()
        ta.sum(dtype=torch.float32)
        torch.cuda.synchronize()
        tsum.append(time.perf_counter() - t)
    tmm_a = torch.randn(m, m, device="cuda", dtype=torch.float16)
    tmm_b = torch.randn(m, m, device="cuda", dtype=torch.float16)
    for _ in range(3):
        tmm_a @ tmm_b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        tmm_a @ tmm_b
    torch.cuda.synchronize()
    tmm = (time.perf_counter() - t) / 10
    del ta, tmm_a, tmm_b
    return {
        "read_GBps": max(n * 2 / read, n / sorted(tsum)[5]) / 1e9,
        "read_GBps_jax": n * 2 / read / 1e9,
        "read_GBps_torch": n / sorted(tsum)[5] / 1e9,
        "matmul_TFLOPs_fp16_torch": 2 * m ** 3 / tmm / 1e12,
        "copy_GBps_jax": 2 * n * 2 / copy / 1e9,
        "copy_GBps_torch": 2 * (n // 2) * 2 / tcopy / 1e9,
        "matmul_TFLOPs_fp16": 2 * m ** 3 / mm / 1e12,
    }


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
def flops_per_token(cfg, context: int) -> float:
    """2 x non-embedding params + LM head + attention (QK^T and PV over ``context``)."""
    n = cfg.num_params() - cfg.vocab_size * cfg.word_embed_proj_dim - cfg.num_positions * \
        cfg.hidden_size
    return 2 * n + 2 * cfg.vocab_size * cfg.word_embed_proj_dim + \
        4 * cfg.num_hidden_layers * context * cfg.hidden_size


def use_sdpa_attention(implementation=None) -> None:
    """Experiment: route the model's attention through ``jax.nn.dot_product_attention``."""
    import jax

    from optkit import model as M

    def attention(q, k, v, allowed, scale):
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale,
                                            implementation=implementation)

    M._attention = attention


def use_transposed_kernels(params: dict, mode: str, max_rows: int = 8) -> dict:
    """Experiment: every fp16 projection kernel stored 2-D as (outputs, inputs), so a product
    of few rows reads each output's weights contiguously (what ``optkit.quant`` does for int8
    kernels).  ``mode`` "reduce": with at most ``max_rows`` rows, a fused multiply + row
    reduction; "dot": XLA's dot on the transposed kernel.  One device, unrolled layers."""
    import math

    import jax
    import jax.numpy as jnp

    from optkit import model as M

    dot = M.project
    transpose = jax.jit(lambda k, c: k.reshape(math.prod(k.shape[:c]), -1).T,
                        static_argnums=1)
    contract = {"qkv": 1, "out": 2, "fc1": 1, "fc2": 1}
    for lp in params["layers"]:
        for name, c in contract.items():
            p = lp[name]
            if "kernel" in p:
                p["kernel_t"] = transpose(p.pop("kernel"), c)
                jax.block_until_ready(p["kernel_t"])

    def project(p, x, eq, matvec=None, relu=False):
        if "kernel_t" not in p:
            return dot(p, x, eq, matvec, relu)
        w = p["kernel_t"]
        c = w.shape[1]
        n = 1
        while math.prod(x.shape[x.ndim - n:]) != c:
            n += 1
        lead = x.shape[:x.ndim - n]
        rows = math.prod(lead)
        x2 = x.reshape(rows, c)
        if mode == "reduce" and rows <= max_rows:
            y = jnp.sum(x2[:, None, :].astype(jnp.float32) * w[None].astype(jnp.float32), -1)
        else:
            y = jnp.einsum("rc,oc->ro", x2, w.astype(x.dtype),
                           preferred_element_type=jnp.float32)
        y = y.astype(x.dtype).reshape(*lead, *p["bias"].shape) + p["bias"]
        return jax.nn.relu(y) if relu else y

    M.project = project
    return params


def use_packed_int8() -> None:
    """Experiment: the one-row int8 product reads the output-major int8 kernel as int32 words
    (four weights per load, unpacked with shifts inside the same fused reduction)."""
    import math

    import jax
    import jax.numpy as jnp

    from optkit import model as M

    dot = M.project

    def project(p, x, eq, matvec=None, relu=False):
        if "kernel_q" not in p:
            return dot(p, x, eq, matvec, relu)
        q, scale = p["kernel_q"], p["kernel_scale"]
        n_out = scale.ndim
        n_in = q.ndim - n_out
        lead = x.shape[:x.ndim - n_in]
        if math.prod(lead) > 1 or q.shape[-1] % 4:
            return dot(p, x, eq, matvec, relu)
        w = jax.lax.bitcast_convert_type(q.reshape(q.shape[:-1] + (q.shape[-1] // 4, 4)),
                                         jnp.int32)
        xs = x.astype(jnp.float32).reshape(lead + (1,) * n_out + x.shape[x.ndim - n_in:-1]
                                           + (x.shape[-1] // 4, 4))
        prod = sum(xs[..., k] * jax.lax.shift_right_arithmetic(
            jax.lax.shift_left(w, jnp.int32(24 - 8 * k)), jnp.int32(24)).astype(jnp.float32)
            for k in range(4))
        y = jnp.sum(prod, axis=tuple(range(-n_in, 0)))
        y = (y * scale).astype(x.dtype) + p["bias"]
        return jax.nn.relu(y) if relu else y

    M.project = project


def device_memory(devices, key: str) -> list[float] | None:
    """``memory_stats()[key]`` of each device in GiB (None where the backend has none)."""
    stats = [d.memory_stats() for d in devices]
    if any(not s or key not in s for s in stats):
        return None
    return [round(s[key] / 2**30, 2) for s in stats]


def planned_executor(cfg, devices, args):
    """The executor of ``cfg`` on ``devices`` with random fp16 (or int8) weights, built by
    ``optkit.parallel.build_executor`` under plain tensor parallelism (``--plan tp``) or the
    automatic planner's plan on these devices, chosen for batch ``args.batches[0]``
    (``--plan auto``; then also the planner's predictions per batch and for the long
    prefill): ``(executor, {batch | "prefill": {...}})``."""
    from optkit.parallel import Plan
    from optkit.parallel.build import build_executor
    from optkit.parallel.planner import auto_plan

    quantize = "int8" if args.int8 else None

    def predict(batch, prompt, gen, plans=None):
        t = time.perf_counter()
        report = auto_plan(cfg, batch=batch, prompt_len=prompt, gen_len=gen,
                           dtype="float16", devices=devices, all_devices=True,
                           plans=plans, progress=False, quantize=quantize)
        print(report, flush=True)
        c = report.chosen
        return c.plan, {"plan": c.plan.name, "tp": c.plan.tp, "planner_s": time.perf_counter() - t,
                        "predicted_prefill_ms": c.prefill * 1e3,
                        "predicted_step_ms": c.decode * 1e3,
                        "predicted_mem_GiB": c.memory / 2**30,
                        "predicted_analytic_GiB": c.analytic / 2**30}

    planned = {}
    if args.plan == "auto":
        plan, planned[args.batches[0]] = predict(args.batches[0], args.prompt, args.new_tokens)
        for b in args.batches[1:]:
            planned[b] = predict(b, args.prompt, args.new_tokens, [plan])[1]
        if args.long_prefill:
            planned["prefill"] = predict(1, args.long_prefill, 0, [plan])[1]
    else:
        plan = Plan(tp=len(devices), dtype="float16")
    ex = build_executor(cfg, plan, None, devices, dtype="float16", progress=False,
                        quantize=quantize, kernels=args.kernels)
    return ex, planned


def mesh_executors(ex) -> list:
    """The executor itself, or a pipeline executor's stage executors."""
    return getattr(ex, "stages", [ex])


def optkit_worker(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    if args.variant.endswith("+sdpa"):
        use_sdpa_attention()
    if args.variant.endswith("+cudnn"):
        use_sdpa_attention("cudnn")
    if args.variant.endswith("+packed"):
        use_packed_int8()
    if {"evict", "no_evict"} & set(args.variant.split("+")):
        from optkit.kernels import int8_matvec as K

        evict = "evict_first" if "evict" in args.variant.split("+") else None
        K.int8_matvec = functools.partial(K.int8_matvec, evict=evict)
    if "words" in args.variant.split("+"):
        from optkit.kernels import int8_mma

        int8_mma.plan = lambda n, k, rows=1: None
    if args.variant.endswith("+triton_gemm"):
        from optkit.parallel import executor

        executor.LARGE_BATCH_ROWS = 1 << 30
    for rows in (16, 32):
        if args.variant.endswith(f"+rows{rows}"):
            from optkit.kernels import int8_mma

            int8_mma.MAX_ROWS = rows
    if args.variant.endswith("+cublaslt"):
        from optkit.parallel import executor

        executor.LARGE_BATCH_ROWS = 1
    if args.variant.endswith("+rows8"):
        from optkit import model as M

        M.INT8_REDUCE_ROWS = 8

    from optkit.config import OPTConfig
    from optkit.parallel.executor import (
        GPU_DECODE_OPTIONS,
        GPU_MULTI_DECODE_OPTIONS,
        MeshExecutor,
    )

    cfg = OPTConfig.from_name("opt-" + args.size)
    devices = jax.devices()[:args.devices]
    int8_kernels = "matvec," if args.int8 else ""
    args.kernels = {"+xla_attn": "matvec" if args.int8 else "xla", "+xla_matvec": "attention",
                    "+norm_kernel": int8_kernels + "attention,norm",
                    "+xla_kernels": "xla"}.get("+" + args.variant.partition("+")[2], "auto")
    t0 = time.perf_counter()
    ex, planned = planned_executor(cfg, devices, args)
    if args.variant.endswith("+no_cb"):
        for st in mesh_executors(ex):
            st.decode_options = {}
    if args.variant.endswith("+cb_collectives"):
        for st in mesh_executors(ex):
            st.decode_options = {**GPU_DECODE_OPTIONS, "xla_gpu_enable_command_buffer":
                                 GPU_DECODE_OPTIONS["xla_gpu_enable_command_buffer"]
                                 + ",COLLECTIVES"}
    if args.variant.endswith("+while_graphs"):  # several GPUs as optkit ran them until
        for st in mesh_executors(ex):            # 2026-11-26: the one-device options
            st.decode_options = dict(GPU_DECODE_OPTIONS)
    if "cb_collectives_nowhile" in args.variant.split("+"):
        for st in mesh_executors(ex):
            st.decode_options["xla_gpu_enable_command_buffer"] = \
                GPU_MULTI_DECODE_OPTIONS["xla_gpu_enable_command_buffer"]
    params = ex.params
    jax.block_until_ready(params)
    for suffix, layout in (("+gemvT", "reduce"), ("+dotT", "dot")):
        if args.variant.endswith(suffix):
            params = use_transposed_kernels(params, layout)
            ex = MeshExecutor(cfg, params, ex.mesh, ex.rules, dtype=jnp.float16,
                              kernels=args.kernels,
                              command_buffers=bool(ex.decode_options))
    init_s = time.perf_counter() - t0
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    resident = device_memory(devices, "bytes_in_use")
    framework = "optkit-int8" if args.int8 else "optkit"
    rows = []

    @jax.jit
    def first(logits):
        return jnp.argmax(logits, -1).astype(jnp.int32)

    def step(logits, state):
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        return tok, state, tok

    for b in args.batches:
        rng = np.random.default_rng(b)
        ids = rng.integers(4, 50000, (b, args.prompt)).astype(np.int32)
        mask = np.ones_like(ids)
        s = args.prompt + args.new_tokens
        n_dec = args.new_tokens - 1

        def run(b=b, s=s, ids=ids, mask=mask, n_dec=n_dec):
            cache = ex.init_cache(b, s)
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            logits, cache = ex.prefill(ids, mask, cache)
            tok = first(logits)
            tok.block_until_ready()
            t1 = time.perf_counter()
            done = 0
            while done < n_dec:
                k = min(args.steps_per_dispatch, n_dec - done)
                tok, cache, _, toks = ex.decode_loop(step, tok, cache, (), k)
                done += k
            toks.block_until_ready()
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1

        t = time.perf_counter()
        run()
        compile_s = time.perf_counter() - t
        if args.dump_hlo and b == args.batches[0] and hasattr(ex, "_fns"):
            fn = next(f for k, f in ex._fns.items() if k[0] == "loop")
            cache = ex.init_cache(b, s)
            tok0 = jnp.zeros((b,), jnp.int32)
            text = fn.lower(ex.params, tok0, cache, (), jnp.int32(1)).compile().as_text()
            Path(args.dump_hlo).write_text(text)
            del cache
        times = [run() for _ in range(args.reps)]
        prefill_s = sorted(x[0] for x in times)[len(times) // 2]
        decode_s = sorted(x[1] for x in times)[len(times) // 2]
        rows.append({"framework": framework, "size": args.size, "batch": b,
                     "devices": args.devices, "weight_bytes": weight_bytes,
                     "prompt": args.prompt, "new_tokens": args.new_tokens,
                     "prefill_ms": prefill_s * 1e3, "step_ms": decode_s / n_dec * 1e3,
                     "first_run_s": compile_s, "init_s": init_s,
                     "steps_per_dispatch": args.steps_per_dispatch,
                     "kernels": args.kernels,
                     **{k: "xla" if v is None else "pallas"
                        for k, v in mesh_executors(ex)[0].decode_kernels(b, s).items()},
                     "command_buffers": bool(mesh_executors(ex)[0].decode_options),
                     "cublaslt": "xla_gpu_enable_cublaslt" in
                                 mesh_executors(ex)[0].decode_options_for(b),
                     "resident_GiB": resident,
                     "peak_GiB": device_memory(devices, "peak_bytes_in_use"),
                     **planned.get(b, {})})
        print(json.dumps(rows[-1]), flush=True)

    if args.long_prefill:
        t = args.long_prefill
        ids = np.random.default_rng(0).integers(4, 50000, (1, t)).astype(np.int32)
        mask = np.ones_like(ids)

        def pre():
            cache = ex.init_cache(1, t)
            t0 = time.perf_counter()
            logits, cache = ex.prefill(ids, mask, cache)
            logits.block_until_ready()
            return time.perf_counter() - t0

        c0 = time.perf_counter()
        pre()
        compile_s = time.perf_counter() - c0
        ts = sorted(pre() for _ in range(args.reps))
        rows.append({"framework": framework, "size": args.size, "batch": 1, "prompt": t,
                     "devices": args.devices, "weight_bytes": weight_bytes,
                     "new_tokens": 0, "prefill_ms": ts[len(ts) // 2] * 1e3,
                     "first_run_s": compile_s, "resident_GiB": resident,
                     "peak_GiB": device_memory(devices, "peak_bytes_in_use"),
                     **planned.get("prefill", {})})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def int8_accuracy_worker(args) -> list[dict]:
    """int8 weight-only vs fp16 logits of the same random model (batch 4, prompt 128)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from optkit import model as M
    from optkit.config import OPTConfig
    from optkit.quant import quantize_params
    from optkit.weights.random import random_params

    cfg = OPTConfig.from_name("opt-" + args.size)
    params = random_params(cfg, seed=0, dtype=jnp.float16)
    ids = jnp.asarray(np.random.default_rng(0).integers(4, 50000, (4, args.prompt)))
    fwd = jax.jit(lambda p, x: M.forward(p, cfg, x).astype(jnp.float32))
    ref = fwd(params, ids)
    q = quantize_params(params)
    del params
    out = fwd(q, ids)
    lp_ref = jax.nn.log_softmax(ref, -1)
    lp_out = jax.nn.log_softmax(out, -1)
    kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp_out), -1)
    row = {"framework": "int8-accuracy", "size": args.size, "batch": 4, "prompt": args.prompt,
           "max_abs_diff": float(jnp.abs(out - ref).max()),
           "rel_l2": float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)),
           "top1_agree": float((out.argmax(-1) == ref.argmax(-1)).mean()),
           "mean_kl": float(kl.mean()), "logit_std": float(ref.std())}
    print(json.dumps(row), flush=True)
    return [row]


def hf_worker(args) -> list[dict]:
    import torch
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    from optkit.config import OPTConfig

    cfg = OPTConfig.from_name("opt-" + args.size)
    torch.set_default_dtype(torch.float16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = OPTForCausalLM(HFConfig(**cfg.to_hf_dict())).eval()
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    static = args.framework == "hf-static-compile"
    rows = []
    for b in args.batches:
        ids = torch.randint(4, 50000, (b, args.prompt), device="cuda")
        mask = torch.ones_like(ids)
        kw = dict(do_sample=False, pad_token_id=1)
        if static:
            kw["cache_implementation"] = "static"

        def gen(n, ids=ids, mask=mask, kw=kw):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                     min_new_tokens=n, **kw)
            torch.cuda.synchronize()
            assert out.shape[1] == args.prompt + n
            return time.perf_counter() - t

        t = time.perf_counter()
        gen(args.new_tokens)
        gen(1)
        first = time.perf_counter() - t
        full = sorted(gen(args.new_tokens) for _ in range(args.reps))[args.reps // 2]
        one = sorted(gen(1) for _ in range(args.reps))[args.reps // 2]
        rows.append({"framework": args.framework, "size": args.size, "batch": b,
                     "prompt": args.prompt, "new_tokens": args.new_tokens,
                     "prefill_ms": one * 1e3,
                     "step_ms": (full - one) / (args.new_tokens - 1) * 1e3,
                     "first_run_s": first, "init_s": init_s})
        print(json.dumps(rows[-1]), flush=True)
    if args.long_prefill and not static:
        ids = torch.randint(4, 50000, (1, args.long_prefill), device="cuda")

        def pre():
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        pre()
        ts = sorted(pre() for _ in range(args.reps))
        rows.append({"framework": args.framework, "size": args.size, "batch": 1,
                     "prompt": args.long_prefill, "new_tokens": 0,
                     "prefill_ms": ts[len(ts) // 2] * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def annotate(row: dict, ceil: dict) -> dict:
    from optkit.config import OPTConfig

    if "prefill_ms" not in row:  # accuracy rows
        return row
    cfg = OPTConfig.from_name("opt-" + row["size"])
    weight_bytes = row.get("weight_bytes", cfg.num_params() * 2)
    devices = row.get("devices", 1)
    b = row["batch"]
    if row.get("new_tokens"):
        live = row["prompt"] + row["new_tokens"] / 2  # average live positions per step
        kv_bytes = 2 * cfg.num_hidden_layers * b * live * cfg.hidden_size * 2
        # each of the tp devices of a model replica reads its share of the weights and
        # cache (ideal split; pipeline stages run one after another)
        floor_ms = (weight_bytes + kv_bytes) / row.get("tp", devices) / \
            (ceil["read_GBps"] * 1e9) * 1e3
        row["floor_ms"] = floor_ms
        row["frac_floor"] = floor_ms / row["step_ms"]
        row["tokens_per_s"] = b / row["step_ms"] * 1e3
    else:
        t = row["prompt"]
        flops = sum(flops_per_token(cfg, c) for c in range(1, t + 1)) - \
            2 * cfg.vocab_size * cfg.word_embed_proj_dim * (t - 1)
        row["prefill_TFLOPs"] = flops / (row["prefill_ms"] / 1e3) / 1e12
        best = max(ceil["matmul_TFLOPs_fp16"], ceil.get("matmul_TFLOPs_fp16_torch", 0))
        row["mfu_vs_measured"] = row["prefill_TFLOPs"] / best / devices
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1.3b,6.7b,13b")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--frameworks", default="optkit,hf-eager,hf-static-compile")
    p.add_argument("--hf-batches", default=None, help="batches for HF (default: --batches)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--long-prefill", type=int, default=0, help="also time one prefill of N")
    p.add_argument("--long-prefill-sizes", default="13b")
    p.add_argument("--steps-per-dispatch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="gpu_decode.jsonl")
    p.add_argument("--ceilings", help="reuse (or write) this run's ceilings JSON file")
    p.add_argument("--variants", default="default", help=f"XLA flag sets: {list(VARIANTS)}")
    p.add_argument("--dump-hlo", default="", help="write optimized HLO of the b=1 decode loop")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--framework", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1,
                   help="optkit: run over this many GPUs")
    p.add_argument("--plan", choices=("tp", "auto"), default="tp",
                   help="optkit over --devices: plain tensor parallelism (tp) or the "
                        "automatic planner's plan on these GPUs (auto; its predictions are "
                        "recorded next to the measurements)")
    args = p.parse_args()
    args.batches = [int(x) for x in str(args.batches).split(",")]

    if args.worker:
        if args.framework == "ceilings":
            rows = [ceilings()]
        elif args.framework in ("optkit", "optkit-int8"):
            args.int8 = args.framework == "optkit-int8"
            rows = optkit_worker(args)
        elif args.framework == "int8-accuracy":
            rows = int8_accuracy_worker(args)
        else:
            rows = hf_worker(args)
        Path(args.worker).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return

    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tmp = Path(args.ceilings or Path(args.out).with_suffix(".ceilings.json"))
    if not tmp.exists():
        subprocess.run([sys.executable, __file__, "--worker", str(tmp), "--framework",
                        "ceilings"], check=True)
    ceil = json.loads(tmp.read_text())
    print(json.dumps({"card": card, **ceil, **versions()}), flush=True)
    out = Path(args.out)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    jobs = [(size, fw, v) for size in args.sizes.split(",") for fw in args.frameworks.split(",")
            for v in (VARIANTS if fw.startswith("optkit") else ["default"])
            if not fw.startswith("optkit") or v in args.variants.split(",")]
    for size, fw, variant in jobs:
        tmp = out.with_suffix(f".{fw}.{size}.{variant}.{args.devices}.part")
        batches = args.batches if fw.startswith("optkit") or not args.hf_batches else \
            [int(x) for x in args.hf_batches.split(",")]
        long = args.long_prefill if size in args.long_prefill_sizes.split(",") else 0
        cmd = [sys.executable, __file__, "--worker", str(tmp), "--framework", fw,
               "--size", size, "--batches", ",".join(map(str, batches)),
               "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
               "--long-prefill", str(long), "--reps", str(args.reps),
               "--steps-per-dispatch", str(args.steps_per_dispatch), "--variant", variant,
               "--devices", str(args.devices), "--plan", args.plan]
        if args.dump_hlo and fw.startswith("optkit"):
            cmd += ["--dump-hlo", f"{args.dump_hlo}.{size}.{variant}.txt"]
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92",
                   TOKENIZERS_PARALLELISM="false")
        env.update(VARIANT_ENV.get(variant, {}))
        flags = (env.get("XLA_FLAGS", "") + " " + VARIANTS[variant]).strip()
        if flags:
            env["XLA_FLAGS"] = flags
        t = time.perf_counter()
        r = subprocess.run(cmd, env=env)
        print(f"# {fw} {size} {variant}: rc={r.returncode} {time.perf_counter() - t:.0f}s",
              flush=True)
        if r.returncode or not tmp.exists():
            continue
        with open(out, "a") as f:
            for line in tmp.read_text().splitlines():
                row = annotate(json.loads(line), ceil)
                row.update({"card": card, "time": stamp, **versions(),
                            "variant": variant, "xla_flags": VARIANTS[variant],
                            "env": {**{k: os.environ[k] for k in RECORDED_ENV
                                       if k in os.environ}, **VARIANT_ENV.get(variant, {})},
                            "ceilings": ceil})
                f.write(json.dumps(row) + "\n")
        tmp.unlink()
    summarize(out)


def summarize(path: Path) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    print(f"{'framework':<18}{'variant':>13}{'size':>6}{'batch':>6}{'prompt':>7}{'step ms':>9}"
          f"{'tok/s':>9}{'floor%':>8}{'prefill ms':>11}{'MFU':>6}")
    for r in rows:
        if "prefill_ms" not in r:
            print(json.dumps(r))
            continue
        nan = float("nan")
        name = f"{r['framework']}x{r.get('devices', 1)}"
        print(f"{name:<18}{r.get('variant', ''):>13}{r['size']:>6}{r['batch']:>6}"
              f"{r['prompt']:>7}{r.get('step_ms', nan):>9.2f}{r.get('tokens_per_s', nan):>9.0f}"
              f"{100 * r.get('frac_floor', nan):>8.1f}{r['prefill_ms']:>11.1f}"
              f"{100 * r.get('mfu_vs_measured', nan):>6.1f}")


if __name__ == "__main__":
    main()
