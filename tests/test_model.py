"""Parity of the pure JAX model with HF transformers' OPTForCausalLM (torch, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from optkit import model as M
from optkit.kernels import decode_attention as K
from optkit.weights.folder import FolderStore
from optkit.weights.load import load_params
from optkit.weights.random import random_state_dict
from tests.conftest import hf_model, left_padded_batch

LENGTHS = [7, 4, 1, 6]


def params_of(cfg, dtype=jnp.float32, seed=0):
    return load_params(dict(random_state_dict(cfg, seed)), cfg, dtype=dtype, progress=False)


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_prefill_logits_match_hf(cfg):
    ids, mask = left_padded_batch(cfg, LENGTHS)
    ref = hf_logits(hf_model(cfg), ids, mask)
    params = params_of(cfg)
    out = np.asarray(M.forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(out - ref)[real].max() <= 1e-4


def test_decode_steps_match_full_forward(cfg):
    """Prefill a prefix, then decode token by token: each step equals HF's logits."""
    ids, mask = left_padded_batch(cfg, [7, 4, 5, 9], total=9)  # positions 5.. are real
    ref = hf_logits(hf_model(cfg), ids, mask)
    params = params_of(cfg)
    # the fused decode-attention kernel (interpreted here) where it takes the head size
    kernels = {"xla": {}, "pallas": {}}
    if K.supported(cfg.head_dim):
        kernels["pallas"]["attention"] = lambda qkv, k, v, mask, index, live, scale: \
            K.decode_attention(qkv, k, v, K.mask_bias(mask), index, scale=scale, block_k=4,
                               interpret=True)
    for name in kernels:
        p = params
        cache = M.init_cache(cfg, ids.shape[0], 12)
        logits, cache = M.prefill(p, cfg, jnp.asarray(ids[:, :5]), jnp.asarray(mask[:, :5]),
                                  cache, all_logits=False)
        assert np.abs(np.asarray(logits) - ref[:, 4])[mask[:, 4] == 1].max() <= 1e-4
        step = jax.jit(lambda p, t, c, kw=kernels[name]: M.decode_step(p, cfg, t, c, **kw),
                       donate_argnums=2)
        for t in range(5, 9):
            logits, cache = step(p, jnp.asarray(ids[:, t]), cache)
            assert np.abs(np.asarray(logits) - ref[:, t]).max() <= 1e-4, (name, t)
        assert np.asarray(cache["index"]).tolist() == [9] * 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_close_to_fp32(dtype):
    from tests.conftest import CONFIGS

    cfg = CONFIGS["pre_ln"]
    ids, mask = left_padded_batch(cfg, LENGTHS)
    ref = hf_logits(hf_model(cfg), ids, mask)
    out = np.asarray(M.forward(params_of(cfg, dtype), cfg, jnp.asarray(ids), jnp.asarray(mask)),
                     np.float32)
    real = mask.astype(bool)
    scale = np.abs(ref[real]).max()
    # bf16 keeps 8 bits of mantissa, fp16 11: errors relative to the logit scale
    tol = 0.03 if dtype == jnp.bfloat16 else 0.005
    assert np.abs(out - ref)[real].max() <= tol * scale
    assert (out[real].argmax(-1) == ref[real].argmax(-1)).mean() > 0.9


def test_padding_does_not_change_real_rows(cfg):
    """A row's logits are the same alone and inside a left-padded batch."""
    params = params_of(cfg)
    ids, mask = left_padded_batch(cfg, [3, 8])
    batch = np.asarray(M.forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    alone = np.asarray(M.forward(params, cfg, jnp.asarray(ids[:1, -3:])))
    assert np.abs(batch[0, -3:] - alone[0]).max() <= 1e-5


def test_alpa_folder_params_match_in_memory(tmp_path, cfg):
    from optkit.weights.random import write_random_folder

    write_random_folder(tmp_path / "m-np", cfg, seed=3, dtype=np.float32, progress=False)
    a = load_params(FolderStore(tmp_path / "m-np"), cfg, progress=False)
    b = params_of(cfg, seed=3)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_decode_reading_only_the_live_prefix_is_exact():
    from tests.conftest import CONFIGS

    cfg = CONFIGS["pre_ln"]
    params = params_of(cfg)
    ids, mask = left_padded_batch(cfg, [5, 3], total=5)
    outs = []
    for live in (None, 8):
        cache = M.init_cache(cfg, 2, 40)
        _, cache = M.prefill(params, cfg, jnp.asarray(ids), jnp.asarray(mask), cache)
        logits = []
        for t in range(3):
            lg, cache = M.decode_step(params, cfg, jnp.asarray([7 + t, 9 + t]), cache, live)
            logits.append(np.asarray(lg))
        outs.append(np.stack(logits))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
