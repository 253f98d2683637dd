"""Shared fixtures.  Eight fake CPU devices are configured before JAX starts, so the
parallel tests see a mesh while every other test simply uses the first device."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from optkit.config import OPTConfig  # noqa: E402

#: Small configs covering the architecture variants HF parity must hold for.
CONFIGS = {
    "pre_ln": OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, ffn_dim=256, max_position_embeddings=128,
                        name="t-pre-ln"),
    "post_ln_proj": OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, ffn_dim=128, max_position_embeddings=128,
                              word_embed_proj_dim=32, do_layer_norm_before=False,
                              name="t-350m-style"),
    "odd_heads": OPTConfig(vocab_size=997, hidden_size=60, num_hidden_layers=3,
                           num_attention_heads=5, ffn_dim=120, max_position_embeddings=128,
                           name="t-odd"),
}


def hf_model(cfg: OPTConfig, seed: int = 0):
    """HF ``OPTForCausalLM`` (fp32, eval) holding optkit's deterministic random weights."""
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    from optkit.weights.random import hf_state_dict

    model = OPTForCausalLM(HFConfig(**cfg.to_hf_dict()))
    model.load_state_dict(hf_state_dict(cfg, seed), strict=True)
    return model.eval()


def left_padded_batch(cfg: OPTConfig, lengths, total=None, seed=0):
    """Random ids (B, T) with left padding given per-row real lengths."""
    rng = np.random.default_rng(seed)
    total = total or max(lengths)
    ids = np.full((len(lengths), total), cfg.pad_token_id, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        ids[i, total - n:] = rng.integers(3, cfg.vocab_size, n)
        ids[i, total - n] = cfg.bos_token_id
        mask[i, total - n:] = 1
    return ids, mask


@pytest.fixture(params=list(CONFIGS))
def cfg(request) -> OPTConfig:
    return CONFIGS[request.param]


def save_torch_bin(model, path, shards: int = 1) -> None:
    """``pytorch_model.bin`` (or shards plus ``pytorch_model.bin.index.json``), the pre-
    safetensors HF layout that transformers 5 no longer writes itself."""
    import json

    import torch

    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: sd[k] for k in part}, path / name)
        weight_map.update({k: name for k in part})
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def hf_dir(tmp_path):
    """Factory: save a random HF model of ``cfg`` to a directory and return (path, model).
    ``bin_shards=N`` writes torch ``.bin`` files instead of safetensors."""
    def make(cfg: OPTConfig, seed: int = 0, bin_shards: int = 0, **save_kw):
        model = hf_model(cfg, seed)
        path = tmp_path / f"hf-{cfg.name}-{seed}"
        if bin_shards:
            save_torch_bin(model, path, bin_shards)
        else:
            model.save_pretrained(path, **save_kw)
        return path, model
    return make


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A folder holding random fp32 ``opt-tiny-np/`` (vocab 50272, so optkit's tokenizer fits;
    loading it is much faster here than ``dummy=True``, which compiles once per shape)."""
    from optkit.weights.random import write_random_folder

    root = tmp_path_factory.mktemp("tiny-weights")
    write_random_folder(root / "opt-tiny-np", OPTConfig.from_name("opt-tiny"), seed=0,
                        dtype=np.float32, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_path(tiny_weights):
    """:func:`tiny_weights` as a string (what notebook parameters take)."""
    return str(tiny_weights)
