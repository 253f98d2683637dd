"""Variants of optkit's int8 GEMV kernels, timed against each other (one GPU).

``words``: ``optkit.kernels.int8_matvec`` (CUDA cores).  ``rows``: its weights seen as
(N, K/16, 4) words, a thread's four words reduced every block (one accumulator per channel
and row instead of four), optionally (``f16``) with fp16 inputs not pre-scaled (the high
byte of each half-word widened against 2**15, whose ulp is 2**-8).  ``words2``: the
production loop with unscaled inputs and the byte flip folded into the masks, the widening
in jnp (``fold``), in PTX (``asm_widen``) or widening and FMAs in PTX (``asm_all``).
``dot``: ``optkit.kernels.int8_mma`` (tensor cores; its first version, measured in
``results/gpu/gemv_asm_dot_h200.jsonl``, also tried Triton's own int8 -> fp16 conversion,
``cvt``, 1.3-1.7x slower than ``prmt``, and padding the input rows inside the kernel).

    python benchmarks/gemv_variants.py --check                 # interpreted (CPU)
    python benchmarks/gemv_variants.py --out variants.jsonl    # on a GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from benchmarks.gemv_pallas import SHAPES, read_words, xla_gemv
from optkit.kernels.int8_matvec import _FLIP, _MAGIC, int8_matvec
from optkit.kernels.int8_mma import int8_mma

_MAGIC15 = 0x47000000  # the bits of 2.0 ** 15: an ulp of 2**-8
#: (mask, magic, offset) per byte of a half-word, either scale of inputs
_SCALED = ((0xFF, _MAGIC, 2.0 ** 23 + 128), (0xFF00, _MAGIC, 2.0 ** 23 + 128 * 256))
_PLAIN = ((0xFF, _MAGIC, 2.0 ** 23 + 128), (0xFF00, _MAGIC15, 2.0 ** 15 + 128))


def _widen(word, mask, magic, offset):
    bits = jax.lax.bitwise_or(jax.lax.bitwise_and(word, jnp.int32(mask)), jnp.int32(magic))
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(offset)


def _rows_kernel(x_ref, q_ref, s_ref, o_ref, *, rows, block_r, plain, evict):
    bn, nr, _ = q_ref.shape
    low, high = _PLAIN if plain else _SCALED

    def load(c, r):
        if evict is None:
            return q_ref[c, r, :]
        return plgpu.load(q_ref.at[c, r, :], eviction_policy=evict)

    def body(i, accs):
        r = pl.ds(pl.multiple_of(i * block_r, block_r), block_r)
        xs = [[x_ref[m, j, r, :].astype(jnp.float32) for j in range(4)] for m in range(rows)]
        out = list(accs)
        for c in range(bn):
            w = jax.lax.bitwise_xor(load(c, r), jnp.int32(_FLIP))
            hi = jax.lax.shift_right_logical(w, jnp.int32(16))
            parts = (_widen(w, *low), _widen(w, *high), _widen(hi, *low), _widen(hi, *high))
            for m in range(rows):
                s = parts[0] * xs[m][0]
                for j in range(1, 4):
                    s = s + parts[j] * xs[m][j]
                out[m * bn + c] = out[m * bn + c] + jnp.sum(s, axis=1)
        return tuple(out)

    init = tuple(jnp.zeros((block_r,), jnp.float32) for _ in range(rows * bn))
    accs = jax.lax.fori_loop(0, nr // block_r, body, init)
    channel = jnp.arange(bn)
    for m in range(rows):
        y = jnp.zeros((bn,), jnp.float32)
        for c in range(bn):
            y = y + jnp.where(channel == c, jnp.sum(accs[m * bn + c]), 0.0)
        o_ref[m, :] = (y * s_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "block_r", "num_warps", "f16",
                                             "evict", "interpret"))
def rows_matvec(x, q, scale, *, block_n=8, block_r=128, num_warps=4, f16=False,
                evict="evict_first", interpret=False):
    """(M, K) x int8 (N, K) -> (M, N) fp32, the ``rows`` layout (module docstring)."""
    (m, k), (n, _) = x.shape, q.shape
    if n % block_n or k % (16 * block_r):
        raise ValueError(f"blocks ({block_n}, {16 * block_r}) do not tile ({n}, {k})")
    words = jax.lax.bitcast_convert_type(q.reshape(n, k // 16, 4, 4), jnp.int32)
    parts = x.reshape(m, k // 4, 4).transpose(0, 2, 1)
    if f16:
        parts = parts.astype(jnp.float16)
    else:
        parts = parts.astype(jnp.float32) * jnp.asarray(
            [1.0, 1 / 256, 1.0, 1 / 256], jnp.float32)[None, :, None]
    parts = parts.reshape(m, 4, k // 16, 4)
    params = {} if interpret else {
        "compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=3)}
    return pl.pallas_call(
        functools.partial(_rows_kernel, rows=m, block_r=block_r, plain=f16,
                          evict=None if interpret else evict),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
        grid=(n // block_n,),
        in_specs=[pl.BlockSpec((m, 4, k // 16, 4), lambda i: (0, 0, 0, 0)),
                  pl.BlockSpec((block_n, k // 16, 4), lambda i: (i, 0, 0)),
                  pl.BlockSpec((block_n,), lambda i: (i,))],
        out_specs=pl.BlockSpec((m, block_n), lambda i: (0, i)),
        name="int8_rows", interpret=interpret, **params)(parts, words, scale)


#: (mask, the xor that flips the byte and sets 2**23's or 2**15's exponent, offset) per byte
#: of a half-word: the raw word needs no separate flip (and + xor fuse into one LOP3)
_FOLD = ((0xFF, 0x4B000080, 2.0 ** 23 + 128), (0xFF00, 0x47008000, 2.0 ** 15 + 128))

#: one of a word's four weights (unscaled inputs), in PTX: (shift,) LOP3, subtraction
_WIDEN_ASM = [f"lop3.b32 $0, $1, {mask}, {flip}, 0x6A;\nsub.f32 $0, $0, {off};"
              for mask, flip, off in (("0xFF", "0x4B000080", "0f4B000080"),
                                      ("0xFF00", "0x47008000", "0f47008000"))]
_WIDEN_ASM = ["{\n" + a + "\n}" for a in _WIDEN_ASM] + [
    "{\n.reg .b32 h;\nshr.u32 h, $1, 16;\n" + a.replace("$1", "h") + "\n}"
    for a in _WIDEN_ASM]
#: ... and their products with four inputs added to an accumulator: acc' = acc + w . x
_DOT4_ASM = """{
.reg .b32 h, t;
shr.u32 h, $1, 16;
lop3.b32 t, $1, 0xFF, 0x4B000080, 0x6A;
sub.f32 t, t, 0f4B000080;
fma.rn.f32 $0, t, $2, $6;
lop3.b32 t, $1, 0xFF00, 0x47008000, 0x6A;
sub.f32 t, t, 0f47008000;
fma.rn.f32 $0, t, $3, $0;
lop3.b32 t, h, 0xFF, 0x4B000080, 0x6A;
sub.f32 t, t, 0f4B000080;
fma.rn.f32 $0, t, $4, $0;
lop3.b32 t, h, 0xFF00, 0x47008000, 0x6A;
sub.f32 t, t, 0f47008000;
fma.rn.f32 $0, t, $5, $0;
}"""


def _fold_widen(word, mask, flip, offset):
    bits = jax.lax.bitwise_xor(jax.lax.bitwise_and(word, jnp.int32(mask)), jnp.int32(flip))
    return jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(offset)


def _words2_kernel(x_ref, q_ref, s_ref, o_ref, *, rows, block_w, mode, evict):
    bn, words = q_ref.shape
    f32 = jax.ShapeDtypeStruct((block_w,), jnp.float32)

    def body(i, accs):
        cols = pl.ds(pl.multiple_of(i * block_w, block_w), block_w)
        xs = [[x_ref[m, j, cols] for j in range(4)] for m in range(rows)]
        out = list(accs)
        for c in range(bn):
            w = plgpu.load(q_ref.at[c, cols], eviction_policy=evict) if evict else q_ref[c, cols]
            if mode == "asm_all":
                for m in range(rows):
                    out[m * bn + c] = plgpu.elementwise_inline_asm(
                        _DOT4_ASM, args=[w, *xs[m], out[m * bn + c]],
                        constraints="=r,r,r,r,r,r,r", pack=1, result_shape_dtypes=[f32])[0]
                continue
            if mode == "asm_widen":
                parts = [plgpu.elementwise_inline_asm(
                    asm, args=[w], constraints="=r,r", pack=1, result_shape_dtypes=[f32])[0]
                    for asm in _WIDEN_ASM]
            else:
                hi = jax.lax.shift_right_logical(w, jnp.int32(16))
                low, high = _FOLD
                parts = (_fold_widen(w, *low), _fold_widen(w, *high), _fold_widen(hi, *low),
                         _fold_widen(hi, *high))
            for m in range(rows):
                acc = out[m * bn + c]
                for j, part in enumerate(parts):
                    acc = acc + part * xs[m][j]
                out[m * bn + c] = acc
        return tuple(out)

    init = tuple(jnp.zeros((block_w,), jnp.float32) for _ in range(rows * bn))
    accs = jax.lax.fori_loop(0, words // block_w, body, init)
    channel = jnp.arange(bn)
    for m in range(rows):
        y = jnp.zeros((bn,), jnp.float32)
        for c in range(bn):
            y = y + jnp.where(channel == c, jnp.sum(accs[m * bn + c]), 0.0)
        o_ref[m, :] = (y * s_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "num_warps", "mode",
                                             "evict", "interpret"))
def words2_matvec(x, q, scale, *, block_n=8, block_k=2048, num_warps=4, mode="fold",
                  evict="evict_first", interpret=False):
    """The production kernel's loop with unscaled inputs and the flip folded into the masks;
    ``mode``: "fold" (jnp), "asm_widen" (the widening in PTX), "asm_all" (widen + FMAs)."""
    (m, k), (n, _) = x.shape, q.shape
    if n % block_n or k % block_k:
        raise ValueError(f"blocks ({block_n}, {block_k}) do not tile ({n}, {k})")
    words = jax.lax.bitcast_convert_type(q.reshape(n, k // 4, 4), jnp.int32)
    parts = x.astype(jnp.float32).reshape(m, k // 4, 4).transpose(0, 2, 1)
    params = {} if interpret else {
        "compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=3)}
    return pl.pallas_call(
        functools.partial(_words2_kernel, rows=m, block_w=block_k // 4, mode=mode,
                          evict=None if interpret else evict),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
        grid=(n // block_n,),
        in_specs=[pl.BlockSpec((m, 4, k // 4), lambda i: (0, 0, 0)),
                  pl.BlockSpec((block_n, k // 4), lambda i: (i, 0)),
                  pl.BlockSpec((block_n,), lambda i: (i,))],
        out_specs=pl.BlockSpec((m, block_n), lambda i: (0, i)),
        name=f"int8_{mode}", interpret=interpret, **params)(parts, words, scale)


def mma_gemv(x, q, scale, **cfg):
    """optkit.kernels.int8_mma (its blocks from ``cfg``, else its plan)."""
    return int8_mma(x.astype(jnp.float16), q, scale, **cfg)


def _as_vector(fn):
    def run(x, q, s, **cfg):
        y = fn(x.reshape(-1, x.shape[-1]), q, s, **cfg).astype(x.dtype)
        return y.reshape(x.shape[:-1] + y.shape[1:])
    return run


IMPLS = {"xla": xla_gemv, "read": read_words, "words": _as_vector(int8_matvec),
         "rows": _as_vector(rows_matvec), "words2": _as_vector(words2_matvec),
         "dot": _as_vector(mma_gemv)}


def configs(n: int, k: int) -> list[tuple[str, dict]]:
    out = [("read", {}), ("words", {"block_n": 8, "block_k": 2048, "num_warps": 4}),
           ("words2", {"block_n": 8, "block_k": 2048, "mode": "asm_all"}), ("dot", {})]
    dots = [{"block_n": bn, "block_k": bk, "num_stages": st}
            for bn in (32, 64) for bk in (256, 512) for st in (2, 3, 4)]
    dots += [{"block_n": 16, "block_k": 512}, {"block_n": 64, "block_k": 256, "num_warps": 8},
             {"block_n": 64, "block_k": 256, "split": 2}, {"block_n": 64, "block_k": 512,
                                                          "split": 2},
             {"block_n": 128, "block_k": 256, "num_warps": 8}]
    for cfg in dots:
        if n % cfg["block_n"] == 0 and k % (cfg["block_k"] * cfg.get("split", 1)) == 0:
            out.append(("dot", cfg))
    return out


def check() -> None:
    rng = np.random.default_rng(0)
    for n, k, bn, br in ((64, 512, 8, 16), (48, 1024, 16, 32)):
        q = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
        x = jnp.asarray(rng.standard_normal((1, k)), jnp.float16)
        s = jnp.asarray(rng.uniform(0.001, 0.01, n), jnp.float32)
        want = (x.astype(jnp.float32) @ q.astype(jnp.float32).T) * s
        for f16 in (False, True):
            got = rows_matvec(x, q, s, block_n=bn, block_r=br, f16=f16, interpret=True)
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            print(f"check rows n={n} k={k} f16={f16}: rel err {err:.2e}")
            assert err < 1e-5, err
        got = words2_matvec(x, q, s, block_n=bn // 2, block_k=16 * br, interpret=True)
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        print(f"check words2/fold n={n} k={k}: rel err {err:.2e}")
        assert err < 1e-5, err


def bench(args) -> list[dict]:
    rows = []
    dev = jax.devices()[0]
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            if args.kernels and name not in args.kernels.split(","):
                continue
            layers = max(2, int(np.ceil(args.rotate_bytes / (n * k))))
            keys = jax.random.split(jax.random.key(0), layers + 1)
            qs = [jax.random.randint(kk, (n, k), -127, 128, jnp.int8) for kk in keys[1:]]
            xs = jax.random.normal(keys[0], (k,), jnp.float16)
            ss = [jnp.full((n,), 0.01, jnp.float32)] * layers
            ref = xla_gemv(xs, qs[0], ss[0]).astype(jnp.float32)
            for kind, cfg in configs(n, k):
                fn = functools.partial(IMPLS[kind], **cfg)

                @jax.jit
                def loop(x, qs, ss, fn=fn):
                    def body(i, acc):
                        for q, s in zip(qs, ss, strict=True):
                            xi = x + (acc.reshape(-1)[0] * 1e-30).astype(x.dtype)
                            acc = acc + fn(xi, q, s).astype(jnp.float32)
                        return acc
                    rounds = max(1, args.iters // len(qs))
                    shape = jax.eval_shape(fn, x, qs[0], ss[0]).shape
                    return jax.lax.fori_loop(0, rounds, body, jnp.zeros(shape, jnp.float32))

                try:
                    loop(xs, qs, ss).block_until_ready()
                    one = fn(xs, qs[0], ss[0]).astype(jnp.float32)
                    err = float(jnp.linalg.norm(one - ref) / jnp.linalg.norm(ref))
                    ts = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        loop(xs, qs, ss).block_until_ready()
                        ts.append(time.perf_counter() - t0)
                    t = sorted(ts)[len(ts) // 2] / (max(1, args.iters // layers) * layers)
                    row = {"model": model, "kernel": name, "n": n, "k": k, "impl": kind,
                           **cfg, "us": t * 1e6, "GBps": n * k / t / 1e9, "rel_err": err,
                           "card": dev.device_kind, "jax": jax.__version__}
                except Exception as e:  # a config Triton cannot compile: record why
                    row = {"model": model, "kernel": name, "impl": kind, **cfg,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del qs
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="check the kernels (interpreted)")
    p.add_argument("--models", default="175b/tp2")
    p.add_argument("--kernels", default="", help="only these kernels (qkv,out,fc1,fc2)")
    p.add_argument("--iters", type=int, default=200, help="products per timed call")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rotate-bytes", type=float, default=400e6,
                   help="rotate over this many bytes of kernels (far more than L2)")
    p.add_argument("--out", default="gemv_variants.jsonl")
    args = p.parse_args()
    if args.check:
        check()
        return
    rows = bench(args)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
