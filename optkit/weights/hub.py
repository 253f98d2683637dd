"""Weights by model name: OPT checkpoints from the Hugging Face cache or Hub.

``get_model("facebook/opt-1.3b")`` with no ``path`` reads the Hub repository
``facebook/opt-1.3b`` from the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``,
``models--facebook--opt-1.3b/snapshots/<revision>/``) and downloads it through
``huggingface_hub`` when it is missing and the Hub can be reached (not with
``HF_HUB_OFFLINE=1``). The JAX backends read Alpa's folder layout: the snapshot is converted
once into ``{cache_root()}/facebook--opt-1.3b/<revision>/opt-1.3b-np/`` (written to a
``.partial`` folder and renamed into place, as every converter does).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from optkit.weights.convert import write_folder
from optkit.weights.folder import WeightError, is_weight_folder
from optkit.weights.sources import open_hf_dir

log = logging.getLogger(__name__)

#: The Hub organisation that publishes OPT (and OPT-IML) checkpoints.
HUB_ORG = "facebook"
#: Files fetched from a repository: configuration and tokenizer, then one checkpoint format
#: (safetensors where the repository has them, else PyTorch's .bin), never TF or Flax files.
META_FILES = ["config.json", "generation_config.json", "vocab.json", "merges.txt",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
CHECKPOINTS = (["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"],
               ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"])


class MissingWeights(WeightError):
    """No weights for a model name: no path given, and none in the cache or from the Hub."""

    def __init__(self, short: str, reason: str):
        self.short = short
        self.reason = reason
        super().__init__(self.explain())

    def explain(self, path: str = "path=...", dummy: str = "dummy=True") -> str:
        """The message, naming the options as the caller spells them (``--path`` in the CLI)."""
        return (f"no weights for {self.short}: {self.reason}; pass {path} (a folder holding "
                f"{self.short}-np/, the folder itself, or an HF directory) or {dummy} for "
                "random weights")


def cache_root() -> Path:
    """Where converted folders go: ``$OPTKIT_CACHE``, else ``$XDG_CACHE_HOME/optkit``, else
    ``~/.cache/optkit``."""
    root = os.environ.get("OPTKIT_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "optkit")
    return Path(os.path.expanduser(root))


def hub_repo(short: str) -> str:
    """``opt-1.3b`` -> ``facebook/opt-1.3b`` (OPT-IML names keep their own repositories)."""
    return f"{HUB_ORG}/{short}"


def has_checkpoint(folder: Path) -> bool:
    return any((folder / name).is_file() for group in CHECKPOINTS for name in group
               if "*" not in name)


def cached_snapshot(short: str) -> Path | None:
    """The cached snapshot folder of ``facebook/{short}`` at ``main``, if it holds a
    checkpoint."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(hub_repo(short), "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return folder if has_checkpoint(folder) else None


def hf_snapshot(short: str) -> Path:
    """The local folder of ``facebook/{short}``: from the cache, else downloaded (with
    huggingface_hub's progress bars)."""
    from huggingface_hub import constants, snapshot_download

    folder = cached_snapshot(short)
    if folder is not None:
        return folder
    repo = hub_repo(short)
    where = f"{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise MissingWeights(short, f"{where} and HF_HUB_OFFLINE forbids downloading it")
    for files in CHECKPOINTS:
        log.info("downloading %s (%s) into %s", repo, files[0], constants.HF_HUB_CACHE)
        try:
            folder = Path(snapshot_download(repo, allow_patterns=META_FILES + files))
        except Exception as e:  # offline, no such repository, gated, Hub down: all say why
            raise MissingWeights(short, f"{where} and downloading it failed: "
                                        f"{type(e).__name__}: {e}") from e
        if has_checkpoint(folder):
            return folder
    raise MissingWeights(short, f"{repo} has neither a safetensors nor a pytorch_model.bin "
                                "checkpoint")


def hub_weights(short: str, alpa_layout: bool = False, progress: bool = True) -> Path:
    """``facebook/{short}``'s HF directory, or (``alpa_layout``) its Alpa numpy folder,
    converted from that directory on first use."""
    snapshot = hf_snapshot(short)
    if not alpa_layout:
        return snapshot
    dst = cache_root() / hub_repo(short).replace("/", "--") / snapshot.name / f"{short}-np"
    if not is_weight_folder(dst):
        log.info("converting %s into %s (once)", snapshot, dst)
        cfg, store = open_hf_dir(snapshot)
        write_folder(store, dataclasses.replace(cfg, name=short), dst,
                     source=f"hf:{hub_repo(short)}@{snapshot.name}", progress=progress)
    return dst
