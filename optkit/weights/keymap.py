"""The one declarative key map between weight sources and the Alpa-layout folder.

Each row names one folder tensor and where it comes from in an HF checkpoint and in a
consolidated Metaseq checkpoint.  ``{i}`` is a layer index.  Metaseq fuses Q, K and V into
one ``qkv_proj`` tensor stored in the order K, V, Q along dim 0: ``part`` says which third.
Every importer (HF directories, Metaseq checkpoints, Alpa folders) goes through
:func:`map_source_keys`; the reverse direction (folder -> HF) uses :func:`to_hf_key`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class KeyRule:
    folder: str
    hf: str | None
    metaseq: str | None
    part: int | None = None  # index of this tensor in a fused [K; V; Q] metaseq tensor


_L = "decoder.layers.{i}."
KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule("decoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.embed_tokens.weight"),
    KeyRule("decoder.embed_positions.weight", "decoder.embed_positions.weight",
            "decoder.embed_positions.weight"),
    KeyRule("decoder.layer_norm.weight", "decoder.final_layer_norm.weight",
            "decoder.layer_norm.weight"),
    KeyRule("decoder.layer_norm.bias", "decoder.final_layer_norm.bias", "decoder.layer_norm.bias"),
    KeyRule("decoder.project_in_dim.weight", "decoder.project_in.weight",
            "decoder.project_in_dim.weight"),
    KeyRule("decoder.project_out_dim.weight", "decoder.project_out.weight",
            "decoder.project_out_dim.weight"),
    *(KeyRule(_L + f"self_attn.{x}_proj.{wb}", _L + f"self_attn.{x}_proj.{wb}",
              _L + f"self_attn.qkv_proj.{wb}", part)
      for x, part in (("k", 0), ("v", 1), ("q", 2)) for wb in ("weight", "bias")),
    *(KeyRule(_L + name, _L + name, _L + name)
      for name in ("self_attn.out_proj.weight", "self_attn.out_proj.bias",
                   "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
                   "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                   "final_layer_norm.weight", "final_layer_norm.bias")),
)

#: Source keys that carry no information of their own (tied heads, version buffers).
IGNORED = {
    "hf": (r"lm_head\.weight",),
    "metaseq": (r"decoder\.version", r"decoder\.output_projection\.weight"),
    "alpa": (r"decoder\.version",),
}

SOURCES = ("hf", "metaseq", "alpa")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_COMPILED = {
    src: [(_pattern(getattr(r, src if src != "alpa" else "folder")), r) for r in KEY_MAP
          if getattr(r, src if src != "alpa" else "folder") is not None]
    for src in SOURCES
}


@dataclasses.dataclass(frozen=True)
class Target:
    folder_key: str
    part: int | None  # third of a fused [K; V; Q] tensor, or None for the whole tensor


def normalize_hf_key(key: str) -> str:
    """HF checkpoints may or may not prefix keys with ``model.`` (opt-350m does not)."""
    return key[len("model."):] if key.startswith("model.") else key


def map_key(source: str, key: str) -> list[Target] | None:
    """Folder targets of one source key; ``[]`` for ignored keys, ``None`` for unknown keys."""
    if source not in SOURCES:
        raise ValueError(f"unknown weight source {source!r}; expected one of {SOURCES}")
    if source == "hf":
        key = normalize_hf_key(key)
    if any(re.fullmatch(p, key) for p in IGNORED[source]):
        return []
    targets = []
    for pat, rule in _COMPILED[source]:
        m = pat.match(key)
        if m:
            i = m.groupdict().get("i")
            folder = rule.folder.format(i=i) if i is not None else rule.folder
            targets.append(Target(folder, rule.part if source == "metaseq" else None))
    if not targets and source == "metaseq":
        # Consolidators that already split the fused qkv (Alpa's step 2) keep metaseq's
        # other names, and metaseq's unfused names are the folder names.
        targets = [Target(t.folder_key, None) for t in map_key("alpa", key) or []]
    return targets or None


def map_source_keys(source: str, keys: Iterable[str]) -> dict[str, tuple[str, int | None]]:
    """Folder key -> (source key, part) for every key; raises on keys the map does not know."""
    out: dict[str, tuple[str, int | None]] = {}
    unknown = []
    for key in keys:
        targets = map_key(source, key)
        if targets is None:
            unknown.append(key)
            continue
        for t in targets:
            if t.folder_key in out:
                raise ValueError(f"{source} keys {out[t.folder_key][0]!r} and {key!r} both map "
                                 f"to {t.folder_key!r}")
            out[t.folder_key] = (key, t.part)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        raise ValueError(f"{len(unknown)} {source} tensor(s) are not part of an OPT model: {shown}")
    return out


def take_part(array, part: int | None):
    """The ``part``-th third (K=0, V=1, Q=2) of a fused qkv tensor along dim 0."""
    if part is None:
        return array
    n = array.shape[0]
    if n % 3:
        raise ValueError(f"fused qkv tensor has {n} rows, not a multiple of 3")
    third = n // 3
    return array[part * third:(part + 1) * third]


def to_hf_key(folder_key: str, prefix: str = "model.") -> str:
    """HF ``OPTForCausalLM`` state-dict key of a folder key."""
    for pat, rule in _COMPILED["alpa"]:
        m = pat.match(folder_key)
        if m:
            i = m.groupdict().get("i")
            return prefix + (rule.hf.format(i=i) if i is not None else rule.hf)
    raise KeyError(f"{folder_key!r} is not an OPT folder key")
