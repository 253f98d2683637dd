"""Metaseq's checkpoint format as code: file names, FSDP flat-parameter layout, MP split rules.

Everything here is derived from an :class:`~optkit.config.OPTConfig` and is shared by the
reader (which unflattens and glues) and the synthetic writer (which splits and flattens), so
the two directions cannot drift apart.  See ``shared/specs/metaseq_format.md`` §1.4-1.7.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

from optkit.config import OPTConfig

#: ``checkpoint_last-model_part-{p}-shard{r}.pt`` (OPT-175B) and 66b's old ``reshard-...-shard0``.
SHARD_FILE = re.compile(r"^(?P<prefix>.+)-model_part-(?P<part>\d+)-shard(?P<shard>\d+)\.pt$")
#: ``reshard-model_part-{p}.pt`` (the v1_20220502 and v1_20230405 releases).
PART_FILE = re.compile(r"^(?P<prefix>.+)-model_part-(?P<part>\d+)\.pt$")
#: An FSDP flat parameter key, e.g. ``decoder.layers.3.flat_param_0``.
FLAT_KEY = re.compile(r"^(?:(?P<path>.+)\.)?(?P<flat>flat_param_\d+)$")

#: Parameters of one decoder layer in FSDP flattening order (spec §1.4).
LAYER_PARAMS = (
    "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias",
    "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
    "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    "final_layer_norm.weight", "final_layer_norm.bias",
)
VERSION_KEY = "decoder.version"
#: The tied output head, declared shared (never stored) in the root FSDP instance.
SHARED_PARAMS = [("decoder.embed_tokens.weight", "decoder.output_projection.weight")]

#: Model-parallel (Megatron) rules, first match wins (spec §1.7): the dim along which the
#: parts of a tensor are concatenated, or None for tensors every part holds whole.
#: A fused ``qkv_proj`` is glued per third (K, V, Q) along dim 0; the key map picks the third.
MP_RULES: tuple[tuple[str, int | None], ...] = (
    (r"qkv", 0),
    (r"layer_norm", None),
    (r"(^|\.)fc1\.|\.[kqv]_proj\.", 0),
    (r"(fc2|out_proj)\.weight$", 1),
    (r"(fc2|out_proj)\.bias$", None),
    (r"embed_tokens", 0),
    (r"embed_positions", None),
    (r"version", None),
)


def split_dim(key: str) -> int | None:
    """Dim along which model-parallel parts of metaseq tensor ``key`` are concatenated."""
    for pattern, dim in MP_RULES:
        if re.search(pattern, key):
            return dim
    return None


def local_shape(key: str, shape: tuple[int, ...], parts: int) -> tuple[int, ...]:
    """Shape of one model-parallel part of a tensor of global ``shape``."""
    d = split_dim(key)
    if d is None or parts == 1:
        return tuple(shape)
    if shape[d] % parts:
        raise ValueError(f"{key}: dim {d} of {tuple(shape)} is not divisible into {parts} parts")
    return tuple(s // parts if i == d else s for i, s in enumerate(shape))


def metaseq_shapes(cfg: OPTConfig) -> dict[str, tuple[tuple[int, ...], ...]]:
    """FSDP instance path -> ((metaseq key relative to the instance, global shape), ...),
    root first then the layers, each in flattening order.

    The root order follows the decoder's module order (embed_tokens, project_in_dim,
    embed_positions, layer_norm, project_out_dim); for 175B this is the §1.4 printout, for
    350m-style models (projections, no final LN) it is inferred, not confirmed.
    """
    h, f, e, v = cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim, cfg.vocab_size
    root: list[tuple[str, tuple[int, ...]]] = [("decoder.embed_tokens.weight", (v, e))]
    if cfg.has_projections:
        root.append(("decoder.project_in_dim.weight", (h, e)))
    root.append(("decoder.embed_positions.weight", (cfg.num_positions, h)))
    if cfg.has_final_layer_norm:
        root += [("decoder.layer_norm.weight", (h,)), ("decoder.layer_norm.bias", (h,))]
    if cfg.has_projections:
        root.append(("decoder.project_out_dim.weight", (e, h)))
    layer_shapes = {
        "self_attn.qkv_proj.weight": (3 * h, h), "self_attn.qkv_proj.bias": (3 * h,),
        "self_attn.out_proj.weight": (h, h), "self_attn.out_proj.bias": (h,),
        "self_attn_layer_norm.weight": (h,), "self_attn_layer_norm.bias": (h,),
        "fc1.weight": (f, h), "fc1.bias": (f,), "fc2.weight": (h, f), "fc2.bias": (h,),
        "final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,),
    }
    out = {"": tuple(root)}
    for i in range(cfg.num_hidden_layers):
        out[f"decoder.layers.{i}"] = tuple((n, layer_shapes[n]) for n in LAYER_PARAMS)
    return out


@dataclasses.dataclass(frozen=True)
class FlatInstance:
    """One FSDP instance's ``flat_param_0`` of one model-parallel part (spec §1.4)."""

    fsdp_path: str  # "" for the root, "decoder.layers.{i}" for a layer
    names: tuple[str, ...]  # relative to fsdp_path
    shapes: tuple[tuple[int, ...], ...]  # part-local shapes

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def flat_key(self) -> str:
        return join_key(self.fsdp_path, "flat_param_0")

    def key(self, name: str) -> str:
        return join_key(self.fsdp_path, name)


def join_key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def flat_layout(cfg: OPTConfig, parts: int) -> list[FlatInstance]:
    """The FSDP instances of one of ``parts`` model-parallel parts of ``cfg``."""
    out = []
    for path, params in metaseq_shapes(cfg).items():
        names = tuple(n for n, _ in params)
        shapes = tuple(local_shape(join_key(path, n), s, parts) for n, s in params)
        out.append(FlatInstance(path, names, shapes))
    return out


def shard_sizes(numel: int, world: int) -> tuple[int, list[int]]:
    """(chunk size c, real elements per rank) of fairscale's ``_get_shard`` (spec §1.5): rank
    r holds [r*c, min((r+1)*c, n)), zero-padded to c; trailing ranks may be all padding."""
    c = -(-numel // world) if numel else 0
    real = [max(0, min(c, numel - r * c)) for r in range(world)]
    return c, real


def check_parallel(cfg: OPTConfig, parts: int) -> None:
    """Raise ValueError unless ``cfg`` splits into ``parts`` Megatron parts."""
    for what, n in (("num_attention_heads", cfg.num_attention_heads),
                    ("vocab_size", cfg.vocab_size), ("ffn_dim", cfg.ffn_dim)):
        if n % parts:
            ok = [k for k in range(1, cfg.num_attention_heads + 1)
                  if not (cfg.num_attention_heads % k or cfg.vocab_size % k or cfg.ffn_dim % k)]
            raise ValueError(f"{cfg.name}: {what}={n} is not divisible by {parts} "
                             f"model-parallel parts; {cfg.name} splits into "
                             f"{', '.join(map(str, ok))} parts")


def cfg_namespace(cfg: OPTConfig, parts: int, name: str = "transformer_lm_megatron"
                  ) -> argparse.Namespace:
    """``cfg["model"]`` as metaseq stores it: an ``argparse.Namespace`` of model flags (the
    fields the tools read; the full 175B field set is not public)."""
    return argparse.Namespace(
        _name=name, arch=name,
        decoder_layers=cfg.num_hidden_layers, decoder_embed_dim=cfg.hidden_size,
        decoder_ffn_embed_dim=cfg.ffn_dim, decoder_attention_heads=cfg.num_attention_heads,
        decoder_input_dim=cfg.word_embed_proj_dim, decoder_output_dim=cfg.word_embed_proj_dim,
        model_parallel_size=parts, decoder_learned_pos=True, no_scale_embedding=True,
        share_decoder_input_output_embed=True, activation_fn="relu",
        decoder_normalize_before=cfg.do_layer_norm_before,
        max_target_positions=cfg.max_position_embeddings,
    )
