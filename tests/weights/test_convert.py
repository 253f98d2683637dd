"""``optkit convert hf``: every HF checkpoint layout -> folder -> HF-equal logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from optkit import model as M
from optkit.cli import main
from optkit.weights.convert import convert_hf
from optkit.weights.folder import FolderStore, WeightError
from optkit.weights.load import load_params
from optkit.weights.sources import open_hf_dir
from tests.conftest import CONFIGS, left_padded_batch

LAYOUTS = {
    "safetensors": {},
    "safetensors-sharded": {"max_shard_size": "20KB"},
    "bin": {"bin_shards": 1},
    "bin-sharded": {"bin_shards": 3},
}


def logits_match(cfg, params, hf):
    ids, mask = left_padded_batch(cfg, [6, 3])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(M.forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    return np.abs(out - ref)[mask == 1].max()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_convert_each_hf_layout(hf_dir, tmp_path, layout):
    cfg = CONFIGS["odd_heads"]
    src, hf = hf_dir(cfg, **LAYOUTS[layout])
    names = {p.name for p in src.iterdir()}
    assert any(n.endswith(".bin" if "bin" in layout else ".safetensors") for n in names)
    assert any(n.endswith("index.json") for n in names) == ("sharded" in layout)
    out = main(["convert", "hf", str(src), str(tmp_path / "o-np"), "--no-progress"])
    assert out == 0
    store = FolderStore(tmp_path / "o-np")
    assert store.config() == cfg.replace(name=store.config().name)
    assert logits_match(cfg, load_params(store, store.config(), progress=False), hf) <= 1e-4


def test_direct_hf_directory_load(hf_dir):
    cfg = CONFIGS["post_ln_proj"]
    src, hf = hf_dir(cfg)
    own, store = open_hf_dir(src)
    assert logits_match(own, load_params(store, own, progress=False), hf) <= 1e-4


def test_hf_keys_without_model_prefix(hf_dir, tmp_path):
    """opt-350m on the Hub stores keys without the ``model.`` prefix."""
    from safetensors.torch import load_file, save_file

    cfg = CONFIGS["post_ln_proj"]
    src, hf = hf_dir(cfg)
    sd = load_file(src / "model.safetensors")
    save_file({k.removeprefix("model."): v.contiguous() for k, v in sd.items()},
              src / "model.safetensors", metadata={"format": "pt"})
    convert_hf(src, tmp_path / "o-np", progress=False)
    store = FolderStore(tmp_path / "o-np")
    assert logits_match(cfg, load_params(store, store.config(), progress=False), hf) <= 1e-4


def test_fp16_output_and_bf16_input(hf_dir, tmp_path):
    cfg = CONFIGS["pre_ln"]
    src, hf = hf_dir(cfg)
    convert_hf(src, tmp_path / "h-np", dtype="float16", progress=False)
    assert FolderStore(tmp_path / "h-np")["decoder.layers.0.fc1.weight"].dtype == np.float16
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    convert_hf(tmp_path / "bf16", tmp_path / "b-np", progress=False)
    assert FolderStore(tmp_path / "b-np")["decoder.layers.0.fc1.weight"].dtype == np.float32


def test_missing_shard_is_named_and_nothing_complete_is_left(hf_dir, tmp_path):
    cfg = CONFIGS["pre_ln"]
    src, _ = hf_dir(cfg, max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (src / victim).unlink()
    with pytest.raises(WeightError, match=victim):
        convert_hf(src, tmp_path / "o-np", progress=False)
    assert not (tmp_path / "o-np").exists()


def test_truncated_checkpoint_is_named(hf_dir, tmp_path):
    cfg = CONFIGS["pre_ln"]
    src, _ = hf_dir(cfg, bin_shards=1)
    f = src / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(WeightError, match="pytorch_model.bin"):
        convert_hf(src, tmp_path / "o-np", progress=False)
    assert not (tmp_path / "o-np").exists()


def test_shape_mismatch_is_refused(hf_dir, tmp_path):
    cfg = CONFIGS["pre_ln"]
    src, _ = hf_dir(cfg)
    conf = json.loads((src / "config.json").read_text())
    conf["ffn_dim"] = 512
    (src / "config.json").write_text(json.dumps(conf))
    with pytest.raises(WeightError, match="fc1.weight"):
        convert_hf(src, tmp_path / "o-np", progress=False)
    assert not (tmp_path / "o-np").exists()


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["convert", "hf", str(tmp_path / "nope"), str(tmp_path / "o")]) == 1
    assert "config.json" in capsys.readouterr().err
