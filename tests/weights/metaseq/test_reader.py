"""Layout detection and config resolution (what was used is reported)."""

import shutil

import pytest
import torch

from optkit.config import OPTConfig
from optkit.weights.folder import WeightError
from optkit.weights.metaseq import open_metaseq, write_synthetic_metaseq
from optkit.weights.metaseq.consolidate import plan
from tests.weights.metaseq.conftest import ALL


def strip_cfg(path):
    state = torch.load(path, weights_only=False)
    state.pop("cfg")
    torch.save(state, path)


def test_config_sources(synthetic):
    src = synthetic("pre_ln", "v1_20220502", 2)
    ckpt = open_metaseq(src)
    assert ckpt.config == ALL["pre_ln"].replace(name="opt-custom")
    assert "checkpoint cfg" in ckpt.config_source and "vocab size" in ckpt.config_source
    given = open_metaseq(src, ALL["pre_ln"])
    assert given.config is ALL["pre_ln"] and given.config_source.startswith("given")
    assert "2 model-parallel part(s) x 1 shard(s)" in given.describe()


def test_presets_fill_in_when_the_checkpoint_has_no_cfg(tmp_path):
    tiny = OPTConfig.from_name("opt-tiny")
    src = write_synthetic_metaseq(tmp_path / "flat", tiny, "v1_20220502", parts=2,
                                  progress=False)
    for f in src.glob("*.pt"):
        strip_cfg(f)
    ckpt = open_metaseq(src)
    assert ckpt.config == tiny and "preset opt-tiny" in ckpt.config_source
    src = write_synthetic_metaseq(tmp_path / "one", tiny, "consolidated", progress=False)
    strip_cfg(src / "restored.pt")
    ckpt = open_metaseq(src / "restored.pt")
    assert ckpt.config == tiny and "heads from preset opt-tiny" in ckpt.config_source
    plan(ckpt)


def test_no_cfg_and_no_preset_asks_for_model(synthetic):
    src = synthetic("pre_ln", "consolidated")
    strip_cfg(src / "restored.pt")
    with pytest.raises(WeightError, match="pass --model"):
        open_metaseq(src)
    assert open_metaseq(src, ALL["pre_ln"]).config is ALL["pre_ln"]


def test_discovery_errors(synthetic, tmp_path):
    a = synthetic("pre_ln", "fsdp", 1, 2)
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(a / "checkpoint_last-model_part-0-shard0.pt",
                mixed / "checkpoint_10-model_part-0-shard0.pt")
    with pytest.raises(WeightError, match="several checkpoints"):
        open_metaseq(mixed)
    loose = tmp_path / "loose"
    loose.mkdir()
    for n in ("x.pt", "y.pt"):
        shutil.copy(a / "checkpoint_last-model_part-0-shard0.pt", loose / n)
    with pytest.raises(WeightError, match="several unrelated .pt files"):
        open_metaseq(loose)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightError, match="no Metaseq checkpoint"):
        open_metaseq(tmp_path / "empty")
