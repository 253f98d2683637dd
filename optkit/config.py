"""OPT model configuration: one frozen dataclass, a preset table and name resolution."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """Shape and architecture of an OPT decoder (field names follow HF's ``OPTConfig``)."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    name: str = "custom"

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "ffn_dim", "max_position_embeddings", "word_embed_proj_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        """True for opt-350m-style models whose embeddings are narrower than the layers."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table (max positions + offset 2)."""
        return self.max_position_embeddings + 2

    def num_params(self) -> int:
        """Parameter count with the LM head tied to the token embedding (as published)."""
        h, f, e = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim
        n_layers = self.num_hidden_layers
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        total = self.vocab_size * e + self.num_positions * h + n_layers * per_layer
        if self.has_projections:
            total += 2 * h * e
        if self.has_final_layer_norm:
            total += 2 * h
        return total

    def kv_cache_bytes(self, batch: int, seq_len: int, itemsize: int = 2) -> int:
        """Bytes of the K and V cache for ``batch`` sequences of ``seq_len`` positions."""
        return 2 * self.num_hidden_layers * batch * seq_len * self.hidden_size * itemsize

    def replace(self, **kw) -> OPTConfig:
        return dataclasses.replace(self, **kw)

    # Serialization -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A dict that ``transformers.OPTConfig(**d)`` accepts (also what optkit writes)."""
        return {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "ffn_dim": self.ffn_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "do_layer_norm_before": self.do_layer_norm_before,
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "layer_norm_elementwise_affine": True,
            "enable_bias": True,
            "activation_function": "relu",
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "layerdrop": 0.0,
            "tie_word_embeddings": True,
            "optkit_name": self.name,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str | None = None) -> OPTConfig:
        """Build from an HF ``config.json`` dict; refuses settings optkit does not implement."""
        if d.get("model_type", "opt") != "opt":
            raise ValueError(f"not an OPT config: model_type={d.get('model_type')!r}")
        act = d.get("activation_function", "relu")
        if act != "relu":
            raise ValueError(f"only activation_function='relu' is supported, got {act!r}")
        if not d.get("enable_bias", True) or not d.get("layer_norm_elementwise_affine", True):
            raise ValueError("OPT variants without biases or LayerNorm affine are not supported")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "ffn_dim")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"OPT config is missing {missing}")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            ffn_dim=int(d["ffn_dim"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            word_embed_proj_dim=d.get("word_embed_proj_dim") or int(d["hidden_size"]),
            do_layer_norm_before=bool(d.get("do_layer_norm_before", True)),
            remove_final_layer_norm=bool(d.get("_remove_final_layer_norm", False)),
            pad_token_id=int(d.get("pad_token_id", 1)),
            bos_token_id=int(d.get("bos_token_id", 2)),
            eos_token_id=int(d.get("eos_token_id", 2)),
            name=name or d.get("optkit_name") or d.get("_name_or_path") or "custom",
        )

    @classmethod
    def from_json(cls, path: str | Path, name: str | None = None) -> OPTConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read OPT config {path}: {e}") from e
        return cls.from_hf_dict(d, name=name)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str) -> OPTConfig:
        """Preset by name: ``opt-1.3b``, ``facebook/opt-1.3b``, ``alpa/opt-iml-max-30b``, ..."""
        key = canonical_name(name)
        if key not in PRESETS:
            raise ValueError(f"unknown OPT model {name!r}; known sizes: {', '.join(PRESETS)}")
        return PRESETS[key]


def canonical_name(name: str) -> str:
    """Strip an org prefix and OPT-IML tags: ``alpa/opt-iml-max-30b`` -> ``opt-30b``."""
    base = name.strip().split("/")[-1].lower()
    base = re.sub(r"-np$", "", base)
    base = re.sub(r"^opt-iml-(max-)?", "opt-", base)
    return base


def _preset(name, layers, hidden, heads, ffn, proj=None, pre_ln=True) -> OPTConfig:
    return OPTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        word_embed_proj_dim=proj or hidden,
        do_layer_norm_before=pre_ln,
        name=name,
    )


PRESETS: dict[str, OPTConfig] = {
    "opt-125m": _preset("opt-125m", 12, 768, 12, 3072),
    "opt-350m": _preset("opt-350m", 24, 1024, 16, 4096, proj=512, pre_ln=False),
    "opt-1.3b": _preset("opt-1.3b", 24, 2048, 32, 8192),
    "opt-2.7b": _preset("opt-2.7b", 32, 2560, 32, 10240),
    "opt-6.7b": _preset("opt-6.7b", 32, 4096, 32, 16384),
    "opt-13b": _preset("opt-13b", 40, 5120, 40, 20480),
    "opt-30b": _preset("opt-30b", 48, 7168, 56, 28672),
    "opt-66b": _preset("opt-66b", 64, 9216, 72, 36864),
    "opt-175b": _preset("opt-175b", 96, 12288, 96, 49152),
}

#: A tiny pre-LN config used by the demo and most tests.
TINY = OPTConfig(
    vocab_size=50272, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
    max_position_embeddings=256, name="opt-tiny",
)
PRESETS["opt-tiny"] = TINY
