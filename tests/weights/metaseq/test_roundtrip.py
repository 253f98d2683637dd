"""Synthetic Metaseq checkpoint (every layout) -> convert -> optkit logits == HF logits."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from optkit import model as M
from optkit.weights.folder import FolderStore
from optkit.weights.load import load_params
from optkit.weights.metaseq import convert_metaseq, open_metaseq, write_synthetic_metaseq
from optkit.weights.metaseq.reference import naive_consolidate
from tests.weights.metaseq.conftest import (
    ALL,
    assert_folder_equals_reference,
    hf_logits,
    reference,
)

# (config, layout, parts P, shards W)
CASES = [
    ("pre_ln", "fsdp", 2, 5),  # ragged last rank
    ("pre_ln", "fsdp", 4, 3),
    ("post_ln_proj", "fsdp", 2, 5),  # opt-350m style: post-LN, E < H, project_in/out
    ("odd_heads", "fsdp", 1, 7),
    ("micro", "fsdp", 2, 26),  # fully padded trailing ranks in every instance
    ("pre_ln", "v1_20220502", 2, 1),
    ("post_ln_proj", "v1_20220502", 1, 1),  # 350m's single reshard.pt
    ("pre_ln", "v1_20230405", 1, 1),
    ("pre_ln", "v1_20230405", 4, 1),
    ("post_ln_proj", "v1_20230405", 2, 1),
    ("odd_heads", "consolidated", 1, 1),
    ("post_ln_proj", "consolidated", 1, 1),
]


def optkit_vs_hf(folder, name) -> float:
    store = FolderStore(folder)
    cfg = store.config()
    params = load_params(store, cfg, progress=False)
    ids, mask, ref = hf_logits(name)
    out = np.asarray(M.forward(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    return float(np.abs(out - ref)[mask == 1].max())


@pytest.mark.parametrize("name,layout,parts,shards", CASES,
                         ids=[f"{n}-{lay}-{p}x{w}" for n, lay, p, w in CASES])
def test_round_trip_logits_match_hf(synthetic, tmp_path, caplog, name, layout, parts, shards):
    src = synthetic(name, layout, parts, shards)
    ckpt = open_metaseq(src)
    assert ckpt.layout == layout
    assert (ckpt.num_parts, ckpt.num_shards) == (parts, shards)
    assert ckpt.config == ALL[name].replace(name=ckpt.config.name)  # inferred from the files
    with caplog.at_level(logging.WARNING):
        out = convert_metaseq(src, tmp_path / "out-np", progress=False)
    assert not caplog.records  # no extreme values, padding rows zero, parts agree
    assert_folder_equals_reference(out, name)  # bit-exact data movement
    assert optkit_vs_hf(out, name) <= 1e-4


def test_350m_reshard_file_name_and_get_model(synthetic, tmp_path):
    from optkit.api import get_model

    src = synthetic("post_ln_proj", "v1_20220502", 1)
    assert [p.name for p in sorted(src.glob("*.pt"))] == ["reshard.pt"]
    convert_metaseq(src / "reshard.pt", tmp_path / "opt-x-np", progress=False)
    m = get_model("jax/opt-x", path=tmp_path, dtype="float32", progress=False)
    ids, mask, ref = hf_logits("post_ln_proj")
    out = np.asarray(m(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits)
    assert np.abs(out - ref)[mask == 1].max() <= 1e-4


@pytest.mark.parametrize("layout,parts,shards", [("fsdp", 2, 5), ("v1_20230405", 2, 1)])
def test_fp16_is_kept_and_bit_exact(synthetic, tmp_path, layout, parts, shards):
    src = synthetic("pre_ln", layout, parts, shards, dtype="float16")
    out = convert_metaseq(src, tmp_path / "h-np", progress=False)
    assert_folder_equals_reference(out, "pre_ln", dtype=np.float16)
    out32 = convert_metaseq(src, tmp_path / "f-np", dtype="float32", progress=False)
    assert FolderStore(out32)["decoder.layers.1.fc2.weight"].dtype == np.float32


def test_already_split_qkv_consolidated(synthetic, tmp_path):
    src = synthetic("pre_ln", "consolidated", split_qkv=True)
    out = convert_metaseq(src, tmp_path / "o-np", progress=False)
    assert_folder_equals_reference(out, "pre_ln")


@pytest.mark.parametrize("layout,parts,shards",
                         [("fsdp", 2, 5), ("micro-fsdp", 2, 26), ("v1_20230405", 4, 1)])
def test_streaming_equals_naive_load_everything(synthetic, layout, parts, shards):
    """The independent torch.cat implementation of §1.6/§1.7 agrees bit for bit."""
    name = "micro" if layout.startswith("micro") else "pre_ln"
    src = synthetic(name, layout.removeprefix("micro-"), parts, shards)
    naive = naive_consolidate(src)
    ref = reference(name)
    assert sorted(naive) == sorted(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(naive[k], v, err_msg=k)


def test_resharding_the_output_reproduces_the_shards(synthetic, tmp_path):
    """Inverse: split the converted folder again -> the same shard files, tensor for tensor."""
    from optkit.weights.metaseq import torchfile

    src = synthetic("post_ln_proj", "fsdp", 2, 5, dtype="float16")
    out = convert_metaseq(src, tmp_path / "o-np", progress=False)
    again = write_synthetic_metaseq(tmp_path / "again", ALL["post_ln_proj"], "fsdp", parts=2,
                                    shards=5, weights=FolderStore(out), dtype="float16",
                                    progress=False)
    files = sorted(p.name for p in src.glob("*.pt"))
    assert files == sorted(p.name for p in again.glob("*.pt")) and len(files) == 10
    for name in files:
        a, b = torch.load(src / name, weights_only=False), torch.load(again / name,
                                                                       weights_only=False)
        assert a["shard_metadata"] == b["shard_metadata"]
        assert list(a["model"]) == list(b["model"])
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
        # the lazy reader sees the same bytes as torch.load
        lazy = torchfile.load(src / name)["model"]
        for k, t in a["model"].items():
            np.testing.assert_array_equal(lazy[k].numpy(), t.numpy())


def test_resume_skips_tensors_already_written(synthetic, tmp_path, monkeypatch):
    from optkit.weights.metaseq import consolidate

    src = synthetic("pre_ln", "fsdp", 2, 5)
    dst = tmp_path / "o-np"
    reads = []
    real_read = consolidate.Assembly.read

    def failing_read(self):
        if len(reads) == 10:
            raise KeyboardInterrupt  # a crash in the middle of the conversion
        reads.append(self.folder_key)
        return real_read(self)

    monkeypatch.setattr(consolidate.Assembly, "read", failing_read)
    with pytest.raises(KeyboardInterrupt):
        convert_metaseq(src, dst, progress=False)
    assert not dst.exists() and (tmp_path / "o-np.partial").is_dir()
    first = list(reads)
    reads.clear()
    monkeypatch.setattr(consolidate.Assembly, "read",
                        lambda self: reads.append(self.folder_key) or real_read(self))
    convert_metaseq(src, dst, progress=False)
    assert not set(first) & set(reads)  # nothing converted twice
    assert len(first) + len(reads) == len(reference("pre_ln"))
    assert_folder_equals_reference(dst, "pre_ln")
