"""Bad inputs: each error names the file and leaves nothing that looks like a folder."""

import logging
import re

import numpy as np
import pytest
import torch

from optkit.cli import main
from optkit.weights.folder import FolderStore, WeightError
from optkit.weights.metaseq import convert_metaseq
from tests.conftest import CONFIGS


def fails(src, dst, match, **kw):
    with pytest.raises(WeightError, match=match) as info:
        convert_metaseq(src, dst, progress=False, **kw)
    assert not dst.exists()
    assert not dst.with_name(dst.name + ".partial").exists()  # refused before writing
    return str(info.value)


def test_truncated_shard(synthetic, tmp_path):
    src = synthetic("pre_ln", "fsdp", 2, 5)
    f = src / "checkpoint_last-model_part-1-shard3.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msg = fails(src, tmp_path / "o-np", re.escape(str(f)))
    assert "truncated" in msg


def test_wrong_md5(synthetic, tmp_path):
    src = synthetic("pre_ln", "fsdp", 2, 5)
    f = src / "checkpoint_last-model_part-0-shard2.pt"
    data = bytearray(f.read_bytes())
    data[-2000] ^= 0xFF  # a flipped bit in tensor data: only the md5 can tell
    f.write_bytes(bytes(data))
    msg = fails(src, tmp_path / "o-np", "md5 mismatch", md5=src / "md5sum_shards.csv")
    assert str(f) in msg


def test_md5_list_names_a_missing_file(synthetic, tmp_path):
    src = synthetic("pre_ln", "fsdp", 2, 5)
    (src / "checkpoint_last-model_part-1-shard4.pt").unlink()  # last shard: no hole in names
    fails(src, tmp_path / "o-np", "missing checkpoint file .*part-1-shard4.pt",
          md5=src / "md5sum_shards.csv")


def test_missing_shard(synthetic, tmp_path):
    src = synthetic("pre_ln", "fsdp", 2, 5)
    (src / "checkpoint_last-model_part-0-shard2.pt").unlink()
    fails(src, tmp_path / "o-np", "missing checkpoint file .*model_part-0-shard2.pt")


def test_missing_last_shard_of_every_part(synthetic, tmp_path):
    src = synthetic("pre_ln", "fsdp", 2, 5)
    for p in range(2):
        (src / f"checkpoint_last-model_part-{p}-shard4.pt").unlink()
    msg = fails(src, tmp_path / "o-np", "shard file after .*shard3.pt is missing")
    assert "model_part-0" in msg


def test_missing_middle_part(synthetic, tmp_path):
    src = synthetic("pre_ln", "fsdp", 4, 3)
    for r in range(3):
        (src / f"checkpoint_last-model_part-2-shard{r}.pt").unlink()
    fails(src, tmp_path / "o-np", r"model_part-2-shard0.pt.*part\(s\) \[2\] missing entirely")


@pytest.mark.parametrize("layout,shards", [("fsdp", 3), ("v1_20230405", 1),
                                           ("v1_20220502", 1)])
def test_missing_last_part(synthetic, tmp_path, layout, shards):
    src = synthetic("pre_ln", layout, 4, shards)
    for f in src.glob("*model_part-3*.pt"):
        f.unlink()
    fails(src, tmp_path / "o-np", r"missing model-parallel part.*found 3.*model_part-3")


def test_shape_mismatch_with_given_model(synthetic, tmp_path):
    src = synthetic("pre_ln", "fsdp", 2, 5)
    wrong = CONFIGS["pre_ln"].replace(ffn_dim=128)
    msg = fails(src, tmp_path / "o-np", "shape mismatch: decoder.layers.0.fc1.weight", model=wrong)
    assert "model_part-0-shard" in msg and "(128, 64)" in msg


def test_shape_mismatch_flat_without_metadata(synthetic, tmp_path):
    src = synthetic("pre_ln", "v1_20220502", 2)
    wrong = CONFIGS["pre_ln"].replace(num_hidden_layers=3)
    fails(src, tmp_path / "o-np", "reshard-model_part-0.pt does not fit", model=wrong)
    wrong = CONFIGS["pre_ln"].replace(ffn_dim=128)
    fails(src, tmp_path / "o-np", "shape mismatch in .*reshard-model_part-0.pt", model=wrong)


def test_shard_of_another_checkpoint(synthetic, tmp_path):
    src = synthetic("pre_ln", "fsdp", 2, 5)
    name = "checkpoint_last-model_part-1-shard3.pt"
    other = synthetic("pre_ln", "fsdp", 2, 4)  # same model, other W: other padding and size
    (src / name).write_bytes((other / name).read_bytes())
    fails(src, tmp_path / "o-np", f"{name} stores flat_param_0 as .*different checkpoints")
    other = synthetic("odd_heads", "fsdp", 1, 5)  # another model: other names and shapes
    (src / name).write_bytes((other / "checkpoint_last-model_part-0-shard3.pt").read_bytes())
    fails(src, tmp_path / "o-np", f"shard_metadata of .*{name} differs")


def test_not_a_torch_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "restored.pt").write_bytes(b"not a checkpoint at all" * 10)
    fails(src, tmp_path / "o-np", "corrupt or truncated checkpoint file .*restored.pt")
    fails(tmp_path / "nope", tmp_path / "o-np", "does not exist")


def test_extreme_values_are_flagged_and_clamped(synthetic, tmp_path, caplog):
    """metaseq #122: values ~5e4 in one shard's layer-15 fc1; here layer 1, part 1, shard 2."""
    src = synthetic("pre_ln", "fsdp", 2, 5, dtype="float16")
    name = "checkpoint_last-model_part-1-shard2.pt"
    state = torch.load(src / name, weights_only=False)
    flat = state["model"]["decoder.layers.1.flat_param_0"]
    flat[100:118] = 5e4
    torch.save(state, src / name)
    with caplog.at_level(logging.WARNING):
        out = convert_metaseq(src, tmp_path / "warn-np", progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "decoder.layers.1.fc1.weight: 18 value(s)" in warned[0]
    assert name in warned[0] and "--clamp" in warned[0]
    assert np.abs(FolderStore(out)["decoder.layers.1.fc1.weight"]).max() == 5e4
    out = convert_metaseq(src, tmp_path / "clamp-np", clamp_extremes=True, threshold=1e3,
                          progress=False)
    fc1 = np.asarray(FolderStore(out)["decoder.layers.1.fc1.weight"])
    assert np.abs(fc1).max() == 1e3 and (fc1 == 1e3).sum() == 18
    assert "clamped" in (out / "optkit-manifest.json").read_text()


def test_nonzero_padding_row_and_disagreeing_parts_are_reported(synthetic, tmp_path, caplog):
    """A wrong flat-parameter order would put other weights into metaseq's all-zero padding
    rows; replicated tensors that differ between parts are reported too."""
    src = synthetic("pre_ln", "v1_20230405", 2)
    for p, value in ((0, 0.5), (1, 0.25)):
        f = src / f"reshard-model_part-{p}.pt"
        state = torch.load(f, weights_only=False)
        state["model"]["decoder.embed_positions.weight"][1] = value
        torch.save(state, f)
    with caplog.at_level(logging.WARNING):
        convert_metaseq(src, tmp_path / "o-np", progress=False)
    text = caplog.text
    assert "decoder.embed_positions.weight: padding row 1 is not zero" in text
    assert "decoder.embed_positions.weight: model-parallel part(s) [1] differ" in text


def test_existing_destination_is_kept(synthetic, tmp_path):
    src = synthetic("pre_ln", "consolidated")
    (tmp_path / "o-np").mkdir()
    with pytest.raises(FileExistsError):
        convert_metaseq(src, tmp_path / "o-np", progress=False)
    convert_metaseq(src, tmp_path / "o-np", overwrite=True, progress=False)
    assert (tmp_path / "o-np" / "optkit-manifest.json").is_file()


def test_cli_convert_dry_run_and_errors(synthetic, tmp_path, capsys):
    src = synthetic("post_ln_proj", "fsdp", 2, 3)
    assert main(["convert", "metaseq", str(src), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layout fsdp" in out and "2 model-parallel part(s) x 3 shard(s)" in out
    assert "post-LN" in out and "nothing written" in out
    dst = tmp_path / "o-np"
    assert main(["convert", "metaseq", str(src), str(dst), "--md5",
                 str(src / "md5sum_shards.csv"), "--no-progress"]) == 0
    assert "md5 sums match" in capsys.readouterr().out
    assert FolderStore(dst).config().word_embed_proj_dim == 32
    (src / "checkpoint_last-model_part-1-shard0.pt").unlink()
    assert main(["convert", "metaseq", str(src), str(tmp_path / "x-np"), "--no-progress"]) == 1
    assert "model_part-1-shard0.pt" in capsys.readouterr().err
    assert main(["convert", "metaseq", str(src), str(dst)]) == 1  # exists
    assert "already exists" in capsys.readouterr().err


def test_cli_make_synthetic(tmp_path, capsys):
    dst = tmp_path / "syn"
    assert main(["convert", "make-synthetic-metaseq", str(dst), "--model", "opt-tiny",
                 "--layout", "fsdp", "--parts", "2", "--shards", "3", "--no-progress"]) == 0
    assert len(list(dst.glob("checkpoint_last-model_part-*-shard*.pt"))) == 6
    assert main(["convert", "metaseq", str(dst), str(tmp_path / "o-np"), "--model", "opt-tiny",
                 "--md5", str(dst / "md5sum_shards.csv"), "--no-progress"]) == 0
    assert "given: opt-tiny" in capsys.readouterr().out
    store = FolderStore(tmp_path / "o-np")
    assert store["decoder.embed_tokens.weight"].dtype == np.float16
    assert store.config().name == "opt-tiny"
