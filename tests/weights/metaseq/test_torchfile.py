"""The lazy, restricted torch-file reader agrees with torch.load and executes nothing."""

import argparse
import os

import numpy as np
import pytest
import torch

from optkit.weights.folder import WeightError
from optkit.weights.metaseq import torchfile


class Evil:
    def __reduce__(self):
        return (os.system, ("touch evil-was-here",))


class Unknown:
    def __init__(self):
        self.x = 1


def test_tensors_equal_torch_load(tmp_path):
    big = torch.randn(50, 7)
    shared = torch.arange(100, dtype=torch.float16)
    obj = {"model": {"plain": torch.randn(3, 4).half(), "view": big[5:20],
                     "t": torch.randn(6, 5).t(), "col": big[:, 2],
                     "bf16": torch.randn(9).bfloat16(),
                     "long": torch.arange(5), "a": shared[:40].view(5, 8), "b": shared[40:],
                     "param": torch.nn.Parameter(torch.ones(4)), "empty": torch.zeros(0, 3),
                     "scalar": torch.tensor(2.5)},
           "cfg": {"model": argparse.Namespace(decoder_layers=2, name="x")},
           "meta": [(3, 4), torch.Size([2, 2])], "np": np.float32(1.5), "bytes": b"xy",
           "set": {1, 2}}
    torch.save(obj, tmp_path / "f.pt")
    lazy = torchfile.load(tmp_path / "f.pt")
    assert lazy["cfg"]["model"] == obj["cfg"]["model"]
    assert lazy["meta"] == [(3, 4), (2, 2)] and lazy["np"] == 1.5 and lazy["set"] == {1, 2}
    assert lazy["bytes"] == b"xy"
    for k, t in obj["model"].items():
        lt = lazy["model"][k]
        assert lt.shape == tuple(t.shape), k
        want = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
        np.testing.assert_array_equal(lt.numpy().astype(want.dtype), want, err_msg=k)
    assert not lazy["model"]["t"].is_contiguous
    part = np.empty(10, np.float16)
    lazy["model"]["b"].read_into(part, 25)  # a slice of a tensor in a shared storage
    np.testing.assert_array_equal(part, shared[65:75].numpy())


def test_unknown_classes_are_inert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"evil": Evil(), "unknown": Unknown(), "w": torch.ones(2)}, tmp_path / "f.pt")
    lazy = torchfile.load(tmp_path / "f.pt")
    assert not (tmp_path / "evil-was-here").exists()
    assert isinstance(lazy["evil"], torchfile.Opaque) and "system" in repr(lazy["evil"])
    assert isinstance(lazy["unknown"], torchfile.Opaque) and lazy["unknown"].state == {"x": 1}
    np.testing.assert_array_equal(lazy["w"].numpy(), np.ones(2, np.float32))


def test_omegaconf_like_state_becomes_plain():
    node = torchfile._opaque_class("omegaconf.nodes", "AnyNode")()
    node.__setstate__({"_val": 96})
    conf = torchfile._opaque_class("omegaconf.dictconfig", "DictConfig")()
    conf.__setstate__({"_content": {"decoder_attention_heads": node}, "_metadata": None})
    assert torchfile.plain(conf) == {"decoder_attention_heads": 96}


def test_bad_files_are_named(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "f.pt")
    data = (tmp_path / "f.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:2000])
    with pytest.raises(WeightError, match="truncated checkpoint file .*cut.pt"):
        torchfile.load(tmp_path / "cut.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(WeightError, match="old.pt is a legacy"):
        torchfile.load(tmp_path / "old.pt")
    with pytest.raises(WeightError, match="missing checkpoint file .*nope.pt"):
        torchfile.load(tmp_path / "nope.pt")
    # a tensor whose bytes vanish after opening (file replaced mid-conversion)
    lazy = torchfile.load(tmp_path / "f.pt")["w"]
    (tmp_path / "f.pt").write_bytes(data[:1200])
    with pytest.raises(WeightError, match="f.pt"):
        lazy.numpy()
