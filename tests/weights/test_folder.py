"""Alpa's numpy folder layout: exact naming, round trips and clear errors on bad files."""

import os

import numpy as np
import pytest
import torch

from optkit.weights.folder import FolderStore, FolderWriter, WeightError, read_header
from optkit.weights.layout import folder_shapes
from optkit.weights.load import load_params
from optkit.weights.random import random_state_dict, write_random_folder
from tests.conftest import CONFIGS


def alpa_step3_like(state: dict, folder: str) -> None:
    """What Alpa's ``step_3_convert_to_numpy_weights.py`` does with a glued metaseq state:
    every tensor of ``state["model"]`` -> ``np.save`` through an open handle, key as the name,
    no extension, fp16 (the ``decoder.version`` buffer included)."""
    os.makedirs(folder, exist_ok=True)
    for name, param in state["model"].items():
        with open(os.path.join(folder, name), "wb") as f:
            np.save(f, param.cpu().detach().numpy())


@pytest.fixture
def alpa_folder(tmp_path):
    cfg = CONFIGS["pre_ln"]
    model = {k: torch.from_numpy(v).half() for k, v in random_state_dict(cfg, 5)}
    model["decoder.version"] = torch.tensor([3.0])
    alpa_step3_like({"model": model, "cfg": {}}, str(tmp_path / "opt-custom-np"))
    return cfg, tmp_path / "opt-custom-np"


def test_folder_written_by_alpa_script_loads_unchanged(alpa_folder):
    cfg, path = alpa_folder
    assert not any(p.suffix == ".npy" for p in path.iterdir())
    store = FolderStore(path)
    assert "decoder.version" in store.keys_on_disk()
    params = load_params(store, cfg, progress=False)
    ref = dict(random_state_dict(cfg, 5))
    w = np.asarray(params["layers"][1]["fc1"]["kernel"])
    np.testing.assert_array_equal(w, ref["decoder.layers.1.fc1.weight"].astype(np.float16).T)
    q = np.asarray(params["layers"][0]["qkv"]["kernel"])[:, 0].reshape(cfg.hidden_size, -1)
    np.testing.assert_array_equal(
        q, ref["decoder.layers.0.self_attn.q_proj.weight"].astype(np.float16).T)


def test_optkit_writer_matches_alpa_naming(tmp_path):
    cfg = CONFIGS["post_ln_proj"]
    path = write_random_folder(tmp_path / "x-np", cfg, progress=False)
    names = {p.name for p in path.iterdir()}
    assert set(folder_shapes(cfg)) <= names
    assert "decoder.project_in_dim.weight" in names and "decoder.layer_norm.weight" not in names
    shape, dtype, _ = read_header(path / "decoder.layers.0.fc1.weight")
    assert shape == (cfg.ffn_dim, cfg.hidden_size) and dtype == np.float16  # torch layout, fp16
    assert (path / "config.json").is_file() and (path / "optkit-manifest.json").is_file()
    FolderStore(path).check(folder_shapes(cfg), checksums=True)


def test_loading_memory_maps(alpa_folder):
    _, path = alpa_folder
    arr = FolderStore(path)["decoder.embed_tokens.weight"]
    assert isinstance(arr, np.memmap)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage_header", "wrong_shape",
                                    "trailing", "integer"])
def test_bad_files_give_errors_naming_them(alpa_folder, damage):
    cfg, path = alpa_folder
    victim = path / "decoder.layers.1.fc2.weight"
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        victim.write_bytes(b"\x00garbage" * 100)
    elif damage == "wrong_shape":
        with open(victim, "wb") as f:
            np.save(f, np.zeros((3, 3), np.float16))
    elif damage == "trailing":
        with open(victim, "ab") as f:
            f.write(b"\x00" * 10)
    elif damage == "integer":
        with open(victim, "wb") as f:
            np.save(f, np.zeros((cfg.hidden_size, cfg.ffn_dim), np.int32))
    with pytest.raises(WeightError, match="decoder.layers.1.fc2.weight"):
        load_params(FolderStore(path), cfg, progress=False)


def test_checksums_catch_flipped_bytes(tmp_path):
    cfg = CONFIGS["pre_ln"]
    path = write_random_folder(tmp_path / "m-np", cfg, progress=False)
    victim = path / "decoder.layers.0.fc1.weight"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    load_params(FolderStore(path), cfg, progress=False)  # sizes are fine, so this loads...
    with pytest.raises(WeightError, match="fc1.weight.*sha256"):
        load_params(FolderStore(path), cfg, checksums=True, progress=False)


def test_writer_is_atomic_and_resumes(tmp_path):
    cfg = CONFIGS["pre_ln"]
    dst = tmp_path / "out-np"
    shapes = folder_shapes(cfg)
    tensors = dict(random_state_dict(cfg))
    w = FolderWriter(dst, cfg)
    for i, key in enumerate(shapes):
        if i == 5:
            break  # "crash" mid-way
        w.write(key, tensors[key])
    assert not dst.exists() and (tmp_path / "out-np.partial").is_dir()
    # a half-written file from the crash is not mistaken for a finished one
    (tmp_path / "out-np.partial" / list(shapes)[5]).write_bytes(b"partial")
    w2 = FolderWriter(dst, cfg)
    done = [k for k in shapes if w2.done(k, shapes[k])]
    assert done == list(shapes)[:5]
    with pytest.raises(WeightError, match="incomplete"):
        w2.commit(shapes)
    for key in shapes:
        if not w2.done(key, shapes[key]):
            w2.write(key, tensors[key])
    w2.commit(shapes)
    assert dst.is_dir() and not (tmp_path / "out-np.partial").exists()
    with pytest.raises(FileExistsError):
        FolderWriter(dst, cfg)


def test_positions_table_longer_than_needed_is_truncated(tmp_path):
    """Alpa accepts (and truncates) position tables with more than max_positions + 2 rows."""
    cfg = CONFIGS["pre_ln"]
    path = write_random_folder(tmp_path / "m-np", cfg, dtype=np.float32, progress=False)
    pos = np.load(path / "decoder.embed_positions.weight")
    with open(path / "decoder.embed_positions.weight", "wb") as f:
        np.save(f, np.concatenate([pos, np.ones((6, pos.shape[1]), np.float32)]))
    params = load_params(FolderStore(path), cfg, progress=False)
    np.testing.assert_array_equal(np.asarray(params["embed_positions"]), pos)
