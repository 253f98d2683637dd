"""Lazy tensor sources: HF checkpoint directories and torch files, seen as folder keys.

Every source is a read-only ``Mapping[key, array]`` that opens tensors only when asked.
:class:`KeyMappedStore` puts the declarative key map in front of a source so that loaders
see Alpa folder keys whatever the checkpoint's own naming is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from optkit.config import OPTConfig
from optkit.weights.folder import FolderStore, WeightError, is_weight_folder
from optkit.weights.keymap import map_source_keys, take_part


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy (bf16 widened to fp32, which numpy cannot hold natively)."""
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def torch_load(path: Path, weights_only: bool = True) -> dict:
    """``torch.load`` memory-mapped where the file format allows, with errors naming it."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except FileNotFoundError:
        raise WeightError(f"missing checkpoint file {path}") from None
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise WeightError(f"corrupt or truncated checkpoint file {path}: {e}") from None
        try:  # legacy (non-zip) torch files cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as e2:
            raise WeightError(f"corrupt or truncated checkpoint file {path}: {e2}") from None
    except Exception as e:
        raise WeightError(f"corrupt or truncated checkpoint file {path}: {e}") from None


class TensorFileStore(Mapping):
    """Keys of one or more safetensors / torch files, each file opened on first use."""

    def __init__(self, key_to_file: Mapping[str, Path]):
        self.key_to_file = dict(key_to_file)
        self._open: dict[Path, object] = {}

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    self._open[path] = safe_open(str(path), framework="pt")
                except FileNotFoundError:
                    raise WeightError(f"missing checkpoint file {path}") from None
                except Exception as e:
                    raise WeightError(f"corrupt or truncated checkpoint file {path}: {e}") from None
            else:
                sd = torch_load(path)
                if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
                    sd = sd["model"]
                self._open[path] = sd
        return self._open[path]

    def __getitem__(self, key: str) -> np.ndarray:
        path = self.key_to_file[key]
        h = self._handle(path)
        try:
            t = h.get_tensor(key) if path.suffix == ".safetensors" else h[key]
        except KeyError:
            raise WeightError(f"checkpoint file {path} lacks tensor {key!r}") from None
        except Exception as e:
            raise WeightError(f"cannot read tensor {key!r} from {path}: {e}") from None
        return to_numpy(t)

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_to_file)

    def __len__(self) -> int:
        return len(self.key_to_file)


def _keys_of(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:
            raise WeightError(f"corrupt or truncated checkpoint file {path}: {e}") from None
    sd = torch_load(path)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return [k for k, v in sd.items() if hasattr(v, "shape")]


def hf_checkpoint_files(path: Path) -> TensorFileStore:
    """Index an HF model directory: safetensors or ``pytorch_model.bin``, single or sharded."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightError(f"corrupt checkpoint index {index}: {e}") from None
            files = {k: path / f for k, f in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise WeightError(f"missing checkpoint shard {f} (listed in {index})")
            return TensorFileStore(files)
    for single in ("model.safetensors", "pytorch_model.bin"):
        f = path / single
        if f.is_file():
            return TensorFileStore({k: f for k in _keys_of(f)})
    raise WeightError(f"{path} holds no HF checkpoint (model.safetensors[.index.json] or "
                      "pytorch_model.bin[.index.json])")


class KeyMappedStore(Mapping):
    """A source's tensors under Alpa folder keys, via the declarative key map."""

    def __init__(self, store: Mapping[str, np.ndarray], source: str):
        self.store = store
        self.source = source
        self.mapping = map_source_keys(source, list(store.keys()))

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            src_key, part = self.mapping[key]
        except KeyError:
            raise WeightError(f"{self.source} checkpoint has no tensor for {key!r}") from None
        return take_part(self.store[src_key], part)

    def __iter__(self) -> Iterator[str]:
        return iter(self.mapping)

    def __len__(self) -> int:
        return len(self.mapping)


def open_hf_dir(path: str | os.PathLike) -> tuple[OPTConfig, KeyMappedStore]:
    """(config, folder-keyed store) of an HF OPT checkpoint directory."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise WeightError(f"{path} has no config.json; not an HF model directory")
    cfg = OPTConfig.from_json(cfg_path, name=path.name)
    return cfg, KeyMappedStore(hf_checkpoint_files(path), "hf")


def open_weights(path: str | os.PathLike) -> tuple[OPTConfig | None, Mapping[str, np.ndarray]]:
    """Open an Alpa folder or an HF directory; returns (its own config or None, store)."""
    path = Path(path)
    if is_weight_folder(path):
        store = FolderStore(path)
        return store.config(), store
    if (path / "config.json").is_file():
        return open_hf_dir(path)
    if not path.exists():
        raise WeightError(f"weights not found: {path} does not exist")
    raise WeightError(f"{path} is neither an Alpa numpy weight folder (no "
                      "'decoder.embed_tokens.weight' file) nor an HF checkpoint directory")
