"""int8 weight-only quantization: error bounds, structure, and sharded execution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from optkit import model as M
from optkit.parallel import TENSOR_RULES, Placement
from optkit.parallel.executor import MeshExecutor
from optkit.quant import quantize_kernel, quantize_params, quantized_specs, random_int8_params
from optkit.weights.load import load_params
from optkit.weights.random import random_state_dict
from tests.conftest import CONFIGS, left_padded_batch


def test_kernel_round_trip_error_is_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (64, 3, 4, 16)) * 0.02
    q, scale = quantize_kernel(w, 1)
    assert q.dtype == jnp.int8 and q.shape == (3, 4, 16, 64) and scale.shape == (3, 4, 16)
    err = jnp.abs(jnp.moveaxis(q, -1, 0).astype(jnp.float32) * scale - w)
    assert bool(jnp.all(err <= scale / 2 + 1e-7))


def test_quantized_model_tracks_fp32_logits():
    cfg = CONFIGS["odd_heads"]
    params = load_params(dict(random_state_dict(cfg)), cfg, progress=False)
    ids, mask = left_padded_batch(cfg, [6, 4])
    ref = np.asarray(M.forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    out = np.asarray(M.forward(quantize_params(params), cfg, jnp.asarray(ids),
                               jnp.asarray(mask)))
    real = mask == 1
    rel = np.linalg.norm((out - ref)[real]) / np.linalg.norm(ref[real])
    assert rel < 0.02
    assert (out[real].argmax(-1) == ref[real].argmax(-1)).mean() > 0.9


def test_specs_keep_output_axes_for_scales():
    cfg = CONFIGS["pre_ln"]
    specs = {s.path[2:]: s for s in quantized_specs(cfg) if s.path[:2] == ("layers", 0)}
    assert specs[("qkv", "kernel_scale")].axes == (None, "heads", "head_dim")
    assert specs[("fc1", "kernel_scale")].shape == (cfg.ffn_dim,)
    assert specs[("out", "kernel_q")].axes == ("embed", "heads", "head_dim")  # output-major
    assert specs[("qkv", "kernel_q")].shape == (3, cfg.num_attention_heads, cfg.head_dim,
                                                 cfg.hidden_size)


def test_one_row_reduction_matches_the_dot():
    """A single row takes the multiply-reduce path, several rows the dot: same numbers, and
    decoding row by row reproduces the full forward of the quantized model."""
    cfg = CONFIGS["odd_heads"]
    q = quantize_params(load_params(dict(random_state_dict(cfg)), cfg, progress=False))
    for name, eq, shape in (("qkv", "bth,hkad->btkad", (3, 1, cfg.hidden_size)),
                            ("out", "btad,adh->bth",
                             (3, 1, cfg.num_attention_heads, cfg.head_dim)),
                            ("fc1", "...i,io->...o", (3, 1, cfg.hidden_size))):
        x = jax.random.normal(jax.random.key(1), shape)
        p = q["layers"][0][name]
        many = M.project(p, x, eq)
        ones = jnp.concatenate([M.project(p, x[i:i + 1], eq) for i in range(3)])
        np.testing.assert_allclose(np.asarray(ones), np.asarray(many), rtol=1e-5, atol=1e-5)
    ids = np.array([[2, 11, 12, 13, 14, 15]])
    full = np.asarray(M.forward(q, cfg, jnp.asarray(ids)))
    cache = M.init_cache(cfg, 1, 8)
    logits, cache = M.prefill(q, cfg, jnp.asarray(ids[:, :3]), jnp.ones((1, 3), jnp.int32),
                              cache, all_logits=False)
    steps = [logits]
    for t in range(3, 6):
        logits, cache = M.decode_step(q, cfg, jnp.asarray(ids[:, t]), cache)
        steps.append(logits)
    np.testing.assert_allclose(np.stack([np.asarray(s)[0] for s in steps]), full[0, 2:],
                               rtol=1e-4, atol=1e-4)


def test_random_int8_model_runs_tensor_parallel():
    cfg = CONFIGS["pre_ln"]
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "tensor"))
    place = Placement(cfg, mesh, TENSOR_RULES)
    params = random_int8_params(cfg, dtype=jnp.float32, sharding_for=place.param)
    assert params["layers"][0]["fc1"]["kernel_q"].dtype == jnp.int8
    assert len(params["layers"][0]["fc1"]["kernel_q"].sharding.device_set) == 2
    sharded = MeshExecutor(cfg, params, mesh, TENSOR_RULES)
    single = MeshExecutor(cfg, jax.device_put(params, jax.devices()[0]))
    ids = np.array([[2, 5, 6, 7]])
    np.testing.assert_allclose(np.asarray(sharded.logits(ids)), np.asarray(single.logits(ids)),
                               atol=1e-4)
    # one row per step: the multiply-reduce path, reducing over sharded input axes
    outs = []
    for ex in (sharded, single):
        logits, cache = ex.prefill(ids, np.ones_like(ids), ex.init_cache(1, 8))
        logits, cache = ex.decode(np.array([9]), cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


def test_get_model_quantizes_while_loading(tmp_path):
    """get_model(quantize="int8") gives the same int8 weights (and logits) as quantizing a
    loaded model, on one device and tensor-parallel over two; random int8 weights too."""
    from optkit import get_model
    from optkit.parallel import Plan
    from optkit.weights.random import write_random_folder

    cfg = CONFIGS["post_ln_proj"]
    write_random_folder(tmp_path / "m-np", cfg, seed=0, dtype=np.float32, progress=False)
    full = get_model("jax/m", path=tmp_path / "m-np", progress=False)
    want = quantize_params(full.executor.params)
    ids, mask = left_padded_batch(cfg, [6, 4])
    ref = np.asarray(M.forward(want, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    one = get_model("jax/m", path=tmp_path / "m-np", quantize="int8", progress=False)
    got = one.executor.params["layers"][1]["fc2"]
    assert got["kernel_q"].dtype == jnp.int8 and "kernel" not in got
    np.testing.assert_array_equal(np.asarray(got["kernel_q"]),
                                  np.asarray(want["layers"][1]["fc2"]["kernel_q"]))
    two = get_model("alpa/m", path=tmp_path / "m-np", quantize="int8", plan=Plan(tp=2),
                    progress=False)
    assert len(two.executor.params["layers"][0]["qkv"]["kernel_q"].sharding.device_set) == 2
    # the planner sizes the int8 model (here: its own choice over the fake devices)
    auto = get_model("alpa/m", path=tmp_path / "m-np", quantize="int8", progress=False)
    assert sum(x.dtype == jnp.int8 for x in jax.tree.leaves(auto.executor.params)) == \
        4 * cfg.num_hidden_layers
    for model in (one, two, auto):
        out = np.asarray(model(ids, attention_mask=mask).logits)
        np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_array_equal(
        one.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5),
        two.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5))
    dummy = get_model("jax/opt-tiny", dummy=True, quantize="int8", progress=False)
    assert dummy.executor.params["layers"][0]["out"]["kernel_q"].dtype == jnp.int8
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        get_model("jax/opt-tiny", dummy=True, quantize="int4")
    with pytest.raises(ValueError, match="jax/ or alpa/"):
        get_model("facebook/opt-tiny", dummy=True, quantize="int8")
