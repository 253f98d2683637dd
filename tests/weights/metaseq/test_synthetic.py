"""The synthetic writer reproduces Meta's structure (checked with torch.load, independently
of optkit's reader)."""

import argparse
import hashlib

import numpy as np
import pytest
import torch

from optkit.config import OPTConfig
from optkit.weights.metaseq import synthetic as S
from optkit.weights.metaseq.format import flat_layout, shard_sizes
from tests.weights.metaseq.conftest import ALL, MICRO, reference


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_fsdp_shards_structure_and_padding(synthetic):
    src = synthetic("micro", "fsdp", 2, 26, dtype="float16")
    names = sorted(p.name for p in src.glob("*.pt"))
    assert names == sorted(f"checkpoint_last-model_part-{p}-shard{r}.pt"
                           for p in range(2) for r in range(26))
    layout = flat_layout(MICRO, 2)
    fully_padded = 0
    for r in (0, 13, 25):
        st = load(src / f"checkpoint_last-model_part-1-shard{r}.pt")
        assert list(st) == ["cfg", "model", "criterion", "optimizer_history", "task_state",
                            "extra_state", "shard_metadata"]
        assert "last_optimizer_state" not in st
        assert list(st["model"]) == [i.flat_key for i in layout] + ["decoder.version"]
        assert torch.equal(st["model"]["decoder.version"], torch.tensor([3.0]))
        ns = st["cfg"]["model"]
        assert isinstance(ns, argparse.Namespace) and ns.model_parallel_size == 2
        assert (ns.decoder_layers, ns.decoder_embed_dim, ns.decoder_attention_heads) == (2, 8, 2)
        assert st["cfg"]["common"]["fp16"] and st["cfg"]["distributed_training"][
            "use_sharded_state"]
        meta = st["shard_metadata"]
        assert meta["buffer_names"] == ["decoder.version"]
        for inst, entry in zip(layout, meta["param_metadata"], strict=True):
            p = entry["params"]["flat_param_0"]
            assert list(p) == ["names", "shapes", "numels", "padding"]
            assert entry["fsdp_path"] == inst.fsdp_path
            assert p["shapes"] == list(inst.shapes) and all(type(s) is tuple for s in p["shapes"])
            c, real = shard_sizes(inst.numel, 26)
            t = st["model"][inst.flat_key]
            assert t.dtype == torch.float16 and t.numel() == c
            assert p["padding"] == c - real[r]
            assert not t[real[r]:].any()  # padding is zeros
            fully_padded += real[r] == 0
            assert entry["shared_param_info"] == (
                [("decoder.embed_tokens.weight", "decoder.output_projection.weight")]
                if inst.fsdp_path == "" else [])
    assert fully_padded == 3  # rank 25 holds only padding in every instance


def test_fsdp_flat_content_is_the_megatron_split(synthetic):
    """Rebuild part 1's layer-1 flat parameter by hand from the reference weights."""
    src = synthetic("pre_ln", "fsdp", 2, 5)
    ref = reference("pre_ln")
    h, f = 64, 256
    s, t = slice(32, 64), slice(128, 256)
    L = "decoder.layers.1."
    pieces = [np.concatenate([ref[L + f"self_attn.{x}_proj.weight"][s] for x in "kvq"]),
              np.concatenate([ref[L + f"self_attn.{x}_proj.bias"][s] for x in "kvq"]),
              ref[L + "self_attn.out_proj.weight"][:, s], ref[L + "self_attn.out_proj.bias"],
              ref[L + "self_attn_layer_norm.weight"], ref[L + "self_attn_layer_norm.bias"],
              ref[L + "fc1.weight"][t], ref[L + "fc1.bias"][t], ref[L + "fc2.weight"][:, t],
              ref[L + "fc2.bias"], ref[L + "final_layer_norm.weight"],
              ref[L + "final_layer_norm.bias"]]
    want = np.concatenate([p.reshape(-1) for p in pieces])
    shards = [load(src / f"checkpoint_last-model_part-1-shard{r}.pt") for r in range(5)]
    got = torch.cat([st["model"][L + "flat_param_0"][:st["model"][L + "flat_param_0"].numel() -
                     st["shard_metadata"]["param_metadata"][2]["params"]["flat_param_0"]
                     ["padding"]] for st in shards]).numpy()
    np.testing.assert_array_equal(got, want)
    assert want.size == (3 * h * h + 3 * h) // 2 + h * h // 2 + 3 * h + 2 * (h * f // 2) + \
        f // 2 + 3 * h


def test_other_layouts_structure(synthetic):
    ref = reference("post_ln_proj")
    v22 = load(synthetic("post_ln_proj", "v1_20220502", 1, dtype="float16") / "reshard.pt")
    assert "shard_metadata" not in v22 and "cfg" in v22
    assert v22["model"]["decoder.version"].dtype == torch.float16  # everything .half()
    root = v22["model"]["flat_param_0"]
    assert root.numel() == flat_layout(ALL["post_ln_proj"], 1)[0].numel
    np.testing.assert_array_equal(root[:1000 * 32].float().numpy().reshape(1000, 32),
                                  ref["decoder.embed_tokens.weight"].astype(np.float16))

    src = synthetic("post_ln_proj", "v1_20230405", 2)
    p1 = load(src / "reshard-model_part-1.pt")
    assert list(p1) == ["model", "cfg", "extra_state", "optimizer_history", "args",
                        "shard_metadata"]
    assert p1["cfg"]["model"].model_parallel_size == 2
    qkv = p1["model"]["decoder.layers.0.self_attn.qkv_proj.weight"].numpy()
    L = "decoder.layers.0.self_attn."
    np.testing.assert_array_equal(qkv, np.concatenate(
        [ref[L + f"{x}_proj.weight"][32:] for x in "kvq"]))  # local [K_p; V_p; Q_p]
    assert "decoder.layer_norm.weight" not in p1["model"]  # post-LN: no final LN
    np.testing.assert_array_equal(p1["model"]["decoder.project_in_dim.weight"].numpy(),
                                  ref["decoder.project_in_dim.weight"])

    one = load(synthetic("pre_ln", "consolidated") / "restored.pt")
    assert one["cfg"]["model"]._name == "transformer_lm_gpt"
    assert one["model"]["decoder.layers.1.self_attn.qkv_proj.weight"].shape == (192, 64)
    split = load(synthetic("pre_ln", "consolidated", split_qkv=True) / "restored.pt")
    assert "decoder.layers.1.self_attn.q_proj.bias" in split["model"]


def test_md5_file_lists_every_shard(synthetic):
    src = synthetic("pre_ln", "fsdp", 2, 3)
    lines = (src / "md5sum_shards.csv").read_bytes().decode().split("\r\n")
    assert lines[0] == "shard,md5sum" and len(lines) == 7
    name, digest = lines[3].split(",")
    assert hashlib.md5((src / name).read_bytes()).hexdigest() == digest


def test_disk_buffer_and_staged_reference_give_the_same_files(synthetic, monkeypatch, tmp_path):
    """Big files are gathered in an on-disk buffer, big random models staged in a folder."""
    a = synthetic("pre_ln", "fsdp", 2, 3)
    monkeypatch.setattr(S, "IN_MEMORY_BYTES", 0)
    b = S.write_synthetic_metaseq(tmp_path / "b", ALL["pre_ln"], "fsdp", parts=2, shards=3,
                                  dtype="float32", buffer_bytes=0, progress=False)
    assert not list(b.glob("*.buffer")) and not (b / ".reference-np").exists()
    for p in sorted(a.glob("*.pt")):
        x, y = load(p)["model"], load(b / p.name)["model"]
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_writer_refuses_bad_requests(tmp_path):
    cfg = ALL["odd_heads"]
    with pytest.raises(ValueError, match="not divisible by 2"):
        S.write_synthetic_metaseq(tmp_path / "x", cfg, "fsdp", parts=2, progress=False)
    with pytest.raises(ValueError, match="one part"):
        S.write_synthetic_metaseq(tmp_path / "x", cfg, "consolidated", parts=2, progress=False)
    with pytest.raises(ValueError, match="opt-125m splits into 1, 2, 4 parts"):
        S.write_synthetic_metaseq(tmp_path / "x", OPTConfig.from_name("opt-125m"), "fsdp",
                                  parts=8, progress=False)
    with pytest.raises(ValueError, match="unknown layout"):
        S.write_synthetic_metaseq(tmp_path / "x", cfg, "zip", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
