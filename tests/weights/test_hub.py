"""Models by name with no path: a Hugging Face cache built here (random weights saved by
transformers, ``models--facebook--opt-125m/snapshots/<rev>/`` plus ``refs/main``), read
offline (``HF_HUB_OFFLINE=1``) in a fresh process, since huggingface_hub reads its cache
location and offline flag when imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optkit.config import OPTConfig
from tests.conftest import hf_model

REVISION = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[2]
#: opt-125m's name, a tiny shape: config.json in the snapshot wins over the preset.
SMALL = OPTConfig(vocab_size=50272, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  ffn_dim=64, max_position_embeddings=64, name="opt-125m")

LOAD_ALL = """
import numpy as np
from optkit import get_model
from optkit.weights.hub import cache_root

ids = np.array([[2, 100, 2000, 30000, 7]])
ref = get_model("facebook/opt-125m")
assert ref.config.hidden_size == 32, ref.config
want = ref(ids).logits
for name in ("jax/opt-125m", "alpa/opt-125m"):
    m = get_model(name, progress=False)
    np.testing.assert_allclose(m(ids).logits, want, atol=1e-4)
    assert m.config.name == "opt-125m"
print("folders:", sorted(str(p.relative_to(cache_root())) for p in cache_root().rglob("*-np")))
"""


@pytest.fixture
def hf_env(tmp_path):
    """An HF_HOME with ``facebook/opt-125m`` at ``main`` and an empty optkit cache."""
    snapshot = tmp_path / "hf" / "hub" / "models--facebook--opt-125m" / "snapshots" / REVISION
    hf_model(SMALL).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(REVISION)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPTKIT_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               OPTKIT_CACHE=str(tmp_path / "optkit"), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def run(args, env, cwd):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_names_load_from_the_hf_cache_offline(hf_env, tmp_path):
    p = run(["-c", LOAD_ALL], hf_env, tmp_path)
    assert p.returncode == 0, p.stderr
    # converted once, for jax/ and alpa/ alike, into the optkit cache by revision
    assert f"folders: ['facebook--opt-125m/{REVISION}/opt-125m-np']" in p.stdout
    folder = tmp_path / "optkit" / "facebook--opt-125m" / REVISION / "opt-125m-np"
    manifest = json.loads((folder / "optkit-manifest.json").read_text())
    assert manifest["source"] == f"hf:facebook/opt-125m@{REVISION}"
    assert not list(folder.parent.glob("*.partial"))


def test_cli_loads_by_name_and_speaks_cli_words_when_missing(hf_env, tmp_path):
    cli = ["-m", "optkit.cli", "generate", "--model", "jax/opt-125m", "--max-new-tokens", "3",
           "--prompt", "Hello"]
    ok = run(cli, hf_env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Hello")

    empty = dict(hf_env, HF_HOME=str(tmp_path / "empty"))
    p = run(cli, empty, tmp_path)
    assert p.returncode == 1
    assert "optkit generate: error: no weights for opt-125m" in p.stderr
    assert "HF_HUB_OFFLINE" in p.stderr and str(tmp_path / "empty") in p.stderr
    assert "--path DIR" in p.stderr and "--dummy" in p.stderr
    assert "path=" not in p.stderr and "dummy=True" not in p.stderr


def test_python_error_names_python_arguments(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from optkit import get_model
    from optkit.weights.hub import MissingWeights

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeights, match=r"pass path=\.\.\. .* or dummy=True"):
        get_model("jax/opt-125m")


def test_download_when_not_cached(monkeypatch, tmp_path):
    """Online and not cached: safetensors are asked for first, then PyTorch's .bin, never
    TF or Flax files; a failed download says why, in the same words as a missing cache."""
    import huggingface_hub
    from huggingface_hub import constants

    from optkit.weights.hub import MissingWeights, hub_weights
    from tests.conftest import save_torch_bin

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("OPTKIT_CACHE", str(tmp_path / "optkit"))
    snapshot = tmp_path / "snapshot" / REVISION
    asked = []

    def download(repo, allow_patterns):  # a repository with only pytorch_model.bin
        asked.append((repo, allow_patterns))
        if "pytorch_model.bin" in allow_patterns:
            save_torch_bin(hf_model(SMALL), snapshot)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert hub_weights("opt-125m") == snapshot
    assert [r for r, _ in asked] == ["facebook/opt-125m"] * 2
    assert "model.safetensors" in asked[0][1] and "pytorch_model.bin" in asked[1][1]
    assert not any(p.endswith((".h5", ".msgpack")) for _, pats in asked for p in pats)
    folder = hub_weights("opt-125m", alpa_layout=True, progress=False)
    assert folder == tmp_path / "optkit" / "facebook--opt-125m" / REVISION / "opt-125m-np"
    assert (folder / "decoder.embed_tokens.weight").is_file()

    def unreachable(repo, allow_patterns):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(MissingWeights, match="downloading it failed: OSError: Name or service"):
        hub_weights("opt-350m")
