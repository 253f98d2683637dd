"""Fixtures for the Metaseq tests: tiny configs, cached reference weights and HF logits."""

import functools

import numpy as np
import pytest

from optkit.config import OPTConfig
from optkit.weights.random import random_state_dict
from tests.conftest import CONFIGS, hf_model, left_padded_batch

#: So small that with W=26 every FSDP instance has fully padded trailing ranks.
MICRO = OPTConfig(vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                  ffn_dim=16, max_position_embeddings=14, name="t-micro")
ALL = {**CONFIGS, "micro": MICRO}


@functools.cache
def reference(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The folder tensors every synthetic checkpoint of ALL[name] is written from (fp32)."""
    return dict(random_state_dict(ALL[name], seed))


@functools.cache
def hf_logits(name: str, seed: int = 0):
    """(ids, mask, logits) of HF ``OPTForCausalLM`` holding the reference weights."""
    import torch

    cfg = ALL[name]
    ids, mask = left_padded_batch(cfg, [7, 4], seed=1)
    with torch.no_grad():
        out = hf_model(cfg, seed)(input_ids=torch.tensor(ids),
                                  attention_mask=torch.tensor(mask)).logits.numpy()
    return ids, mask, out


def assert_folder_equals_reference(folder, name: str, dtype=np.float32, seed: int = 0):
    """Every folder tensor bit-equal to the reference (cast to the checkpoint's dtype)."""
    from optkit.weights.folder import FolderStore

    store = FolderStore(folder)
    ref = reference(name, seed)
    assert sorted(store.keys_on_disk()) == sorted(ref)
    for key, want in ref.items():
        got = np.asarray(store[key])
        assert got.dtype == dtype, key
        np.testing.assert_array_equal(got, want.astype(dtype), err_msg=key)


@pytest.fixture
def synthetic(tmp_path):
    """Factory: write a synthetic checkpoint of ALL[name] and return its folder."""
    from optkit.weights.metaseq import write_synthetic_metaseq

    def make(name, layout="fsdp", parts=1, shards=1, dtype="float32", **kw):
        extra = "".join(f"-{k}={v}" for k, v in sorted(kw.items()))
        dst = tmp_path / f"{name}-{layout}-{parts}x{shards}-{dtype}{extra}"
        return write_synthetic_metaseq(dst, ALL[name], layout=layout, parts=parts,
                                       shards=shards, dtype=dtype, progress=False, **kw)
    return make
