"""Every OPT weight described once: folder file, model shape, logical axes and how to read it.

A :class:`ParamSpec` says where a model parameter lives in the params pytree, its shape in
optkit's (in, out) layout, its logical axis names (which sharding rules map to mesh axes),
how it is initialised for random models, and how to read any slice of it from the
Alpa-layout tensors (torch (out, in) layout, one tensor per file).  Initialisation, sharding
and loading are all derived from this table.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from optkit.config import OPTConfig

Index = tuple[slice, ...]
#: Reads ``index`` of the parameter (in optkit layout) from a mapping of folder key -> array.
Reader = Callable[[Mapping[str, Any], Index], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: tuple  # path in the params pytree, e.g. ("layers", 3, "qkv", "kernel")
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str  # "normal" | "zeros" | "ones" | "positions"
    sources: tuple[str, ...]  # folder keys this parameter is read from
    read: Reader

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


# --------------------------------------------------------------------------------------------
# Folder keys (Alpa / metaseq names) and their torch-layout shapes
# --------------------------------------------------------------------------------------------
def layer_key(i: int, name: str) -> str:
    return f"decoder.layers.{i}.{name}"


def folder_shapes(cfg: OPTConfig) -> dict[str, tuple[int, ...]]:
    """Folder key -> torch-layout shape of every tensor a model of ``cfg`` needs."""
    h, f, e, v = cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim, cfg.vocab_size
    out = {
        "decoder.embed_tokens.weight": (v, e),
        "decoder.embed_positions.weight": (cfg.num_positions, h),
    }
    if cfg.has_final_layer_norm:
        out["decoder.layer_norm.weight"] = (h,)
        out["decoder.layer_norm.bias"] = (h,)
    if cfg.has_projections:
        out["decoder.project_in_dim.weight"] = (h, e)
        out["decoder.project_out_dim.weight"] = (e, h)
    per_layer = {
        "self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,),
        "self_attn.k_proj.weight": (h, h), "self_attn.k_proj.bias": (h,),
        "self_attn.v_proj.weight": (h, h), "self_attn.v_proj.bias": (h,),
        "self_attn.out_proj.weight": (h, h), "self_attn.out_proj.bias": (h,),
        "self_attn_layer_norm.weight": (h,), "self_attn_layer_norm.bias": (h,),
        "fc1.weight": (f, h), "fc1.bias": (f,), "fc2.weight": (h, f), "fc2.bias": (h,),
        "final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,),
    }
    for i in range(cfg.num_hidden_layers):
        for name, shape in per_layer.items():
            out[layer_key(i, name)] = shape
    return out


# --------------------------------------------------------------------------------------------
# Readers: slice of the optkit-layout parameter from torch-layout tensors
# --------------------------------------------------------------------------------------------
def _direct(key: str) -> Reader:
    def read(store, idx):
        return np.asarray(store[key][idx])
    return read


def _positions(key: str, rows: int) -> Reader:
    # Alpa truncates position tables longer than max_positions + 2.
    def read(store, idx):
        return np.asarray(store[key][:rows][idx])
    return read


def _transposed(key: str) -> Reader:
    def read(store, idx):
        i_in, i_out = idx
        return np.asarray(store[key][i_out, i_in]).T
    return read


def _qkv_kernel(keys: tuple[str, str, str], heads: int, head_dim: int) -> Reader:
    # (H_in, 3, A, D) from three (A*D, H_in) tensors
    def read(store, idx):
        i_in, i_k, i_a, i_d = idx
        parts = []
        for key in np.asarray(keys)[i_k]:
            w = np.asarray(store[str(key)]).reshape(heads, head_dim, -1)
            parts.append(np.transpose(w[i_a, i_d, i_in], (2, 0, 1)))
        return np.stack(parts, axis=1)
    return read


def _qkv_bias(keys: tuple[str, str, str], heads: int, head_dim: int) -> Reader:
    def read(store, idx):
        i_k, i_a, i_d = idx
        return np.stack([np.asarray(store[str(k)]).reshape(heads, head_dim)[i_a, i_d]
                         for k in np.asarray(keys)[i_k]])
    return read


def _out_kernel(key: str, heads: int, head_dim: int) -> Reader:
    # (A, D, H_out) from a (H_out, A*D) tensor
    def read(store, idx):
        i_a, i_d, i_out = idx
        w = np.asarray(store[key]).reshape(-1, heads, head_dim)
        return np.transpose(w[i_out, i_a, i_d], (1, 2, 0))
    return read


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
def _one(path, shape, axes, init, key: str, how=_direct) -> ParamSpec:
    """A parameter read from a single folder tensor."""
    return ParamSpec(path, shape, axes, init, (key,), how(key))


def _layer_specs(cfg: OPTConfig, i: int) -> dict[str, ParamSpec]:
    h, f, a, d = cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads, cfg.head_dim
    k = lambda name: layer_key(i, name)  # noqa: E731
    qkv_w = tuple(k(f"self_attn.{x}_proj.weight") for x in "qkv")
    qkv_b = tuple(k(f"self_attn.{x}_proj.bias") for x in "qkv")
    p = ("layers", i)
    out_kernel = functools.partial(_out_kernel, heads=a, head_dim=d)
    return {
        "attn_ln.scale": _one(p + ("attn_ln", "scale"), (h,), ("norm",), "ones",
                              k("self_attn_layer_norm.weight")),
        "attn_ln.bias": _one(p + ("attn_ln", "bias"), (h,), ("norm",), "zeros",
                             k("self_attn_layer_norm.bias")),
        "qkv.kernel": ParamSpec(p + ("qkv", "kernel"), (h, 3, a, d),
                                ("embed", None, "heads", "head_dim"), "normal", qkv_w,
                                _qkv_kernel(qkv_w, a, d)),
        "qkv.bias": ParamSpec(p + ("qkv", "bias"), (3, a, d), (None, "heads", "head_dim"),
                              "normal", qkv_b, _qkv_bias(qkv_b, a, d)),
        "out.kernel": _one(p + ("out", "kernel"), (a, d, h), ("heads", "head_dim", "embed"),
                           "normal", k("self_attn.out_proj.weight"), out_kernel),
        "out.bias": _one(p + ("out", "bias"), (h,), ("norm",), "normal",
                         k("self_attn.out_proj.bias")),
        "mlp_ln.scale": _one(p + ("mlp_ln", "scale"), (h,), ("norm",), "ones",
                             k("final_layer_norm.weight")),
        "mlp_ln.bias": _one(p + ("mlp_ln", "bias"), (h,), ("norm",), "zeros",
                            k("final_layer_norm.bias")),
        "fc1.kernel": _one(p + ("fc1", "kernel"), (h, f), ("embed", "mlp"), "normal",
                           k("fc1.weight"), _transposed),
        "fc1.bias": _one(p + ("fc1", "bias"), (f,), ("mlp",), "normal", k("fc1.bias")),
        "fc2.kernel": _one(p + ("fc2", "kernel"), (f, h), ("mlp", "embed"), "normal",
                           k("fc2.weight"), _transposed),
        "fc2.bias": _one(p + ("fc2", "bias"), (h,), ("norm",), "normal", k("fc2.bias")),
    }


def embed_tokens_spec(cfg: OPTConfig) -> ParamSpec:
    """The token embedding (tied to the LM head)."""
    return _one(("embed_tokens",), (cfg.vocab_size, cfg.word_embed_proj_dim),
                ("vocab", "embed"), "normal", "decoder.embed_tokens.weight")


def param_specs(cfg: OPTConfig) -> list[ParamSpec]:
    """All parameters of ``cfg`` (each layer's its own)."""
    h, e = cfg.hidden_size, cfg.word_embed_proj_dim
    positions = functools.partial(_positions, rows=cfg.num_positions)
    specs = [
        embed_tokens_spec(cfg),
        _one(("embed_positions",), (cfg.num_positions, h), (None, "embed"), "positions",
             "decoder.embed_positions.weight", positions),
    ]
    if cfg.has_projections:
        specs.append(_one(("project_in",), (e, h), (None, "embed"), "normal",
                          "decoder.project_in_dim.weight", _transposed))
        specs.append(_one(("project_out",), (h, e), ("embed", None), "normal",
                          "decoder.project_out_dim.weight", _transposed))
    if cfg.has_final_layer_norm:
        specs.append(_one(("final_ln", "scale"), (h,), ("norm",), "ones",
                          "decoder.layer_norm.weight"))
        specs.append(_one(("final_ln", "bias"), (h,), ("norm",), "zeros",
                          "decoder.layer_norm.bias"))
    for i in range(cfg.num_hidden_layers):
        specs.extend(_layer_specs(cfg, i).values())
    return specs


def tree_from_specs(specs: list[ParamSpec], leaf: Callable[[ParamSpec], Any]) -> dict:
    """Build the params pytree (dicts, and a list for unrolled layers) from ``leaf(spec)``."""
    tree: dict = {}
    for spec in specs:
        node: Any = tree
        path = spec.path
        for j, part in enumerate(path[:-1]):
            nxt = path[j + 1]
            if isinstance(part, int):
                while len(node) <= part:
                    node.append({})
                node = node[part]
            else:
                if part not in node:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        node[path[-1]] = leaf(spec)
    return tree
