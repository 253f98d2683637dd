"""Open any Metaseq OPT checkpoint layout as per-part unflattened tensors, reading no data.

Layouts (recognised from file names and keys, spec §1-2):

* ``fsdp``: ``{prefix}-model_part-{p}-shard{r}.pt``, P model-parallel parts x W FSDP shards of
  flat parameters described by ``shard_metadata`` (OPT-175B's 992 files);
* ``v1_20220502``: ``reshard-model_part-{p}.pt`` (or 350m's ``reshard.pt``) holding unsharded,
  unpadded flat parameters without metadata: names and shapes are rebuilt from the config;
* ``v1_20230405``: ``reshard-model_part-{p}.pt`` holding unflattened tensors with the fused,
  part-local ``qkv_proj``;
* ``consolidated``: one file of unflattened tensors (fused or split q/k/v).

Opening parses each file's pickle (one part at a time) and keeps, per part and tensor, a
:class:`PartTensor`: the list of byte ranges in the shard files that hold its elements.  Every
structural problem (missing, truncated or foreign files, inconsistent metadata, shapes that do
not fit the config) is raised here as a :class:`WeightError` naming the file, before anything
is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from optkit.config import PRESETS, OPTConfig
from optkit.weights.folder import WeightError
from optkit.weights.metaseq import torchfile
from optkit.weights.metaseq.format import (
    FLAT_KEY,
    PART_FILE,
    SHARD_FILE,
    FlatInstance,
    flat_layout,
    join_key,
    split_dim,
)
from optkit.weights.metaseq.torchfile import LazyTensor

log = logging.getLogger(__name__)

LAYOUTS = {
    "fsdp": "FSDP-sharded flat parameters with shard_metadata (OPT-175B's 992-file release)",
    "v1_20220502": "unsharded flat parameters without metadata (reshard-model_part-*.pt / "
                   "reshard.pt of the first release)",
    "v1_20230405": "unflattened model-parallel parts with fused qkv_proj (current release)",
    "consolidated": "one unflattened checkpoint",
}


@dataclasses.dataclass(frozen=True)
class PartTensor:
    """One unflattened tensor of one model-parallel part.  Its flattened elements are the
    concatenation of ``segments``: (stored tensor, first element, count) — several FSDP
    shards for a sharded flat parameter, one whole tensor otherwise."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    segments: tuple[tuple[LazyTensor, int, int], ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(t.path for t, _, _ in self.segments))

    def read_into(self, out: np.ndarray, start: int = 0) -> np.ndarray:
        """Fill 1-D ``out`` with flattened elements ``[start, start + out.size)``."""
        stop, pos = start + out.size, 0
        for src, first, count in self.segments:
            lo, hi = max(start, pos), min(stop, pos + count)
            if lo < hi:
                src.read_into(out[lo - start:hi - start], first + lo - pos)
            pos += count
        return out

    def locate(self, index: int) -> Path:
        """The file holding flattened element ``index``."""
        pos = 0
        for src, _, count in self.segments:
            if index < pos + count:
                return src.path
            pos += count
        raise IndexError(index)


@dataclasses.dataclass
class MetaseqCheckpoint:
    """A Metaseq checkpoint opened lazily: ``parts[p][key]`` is part ``p``'s tensor ``key``."""

    src: Path
    layout: str
    files: list[list[Path]]  # [part][shard]
    parts: list[dict[str, PartTensor]]
    config: OPTConfig
    config_source: str
    metaseq_cfg: Any = None  # the checkpoint's own ``cfg["model"]`` (Namespace/dict), if any

    @property
    def num_parts(self) -> int:
        return len(self.files)

    @property
    def num_shards(self) -> int:
        return len(self.files[0])

    @property
    def all_files(self) -> list[Path]:
        return [f for part in self.files for f in part]

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.all_files)

    def describe(self) -> str:
        c = self.config
        return (f"{self.src}: layout {self.layout} ({LAYOUTS[self.layout]}); "
                f"{self.num_parts} model-parallel part(s) x {self.num_shards} shard(s), "
                f"{len(self.all_files)} file(s), {self.nbytes() / 1e9:.2f} GB\n"
                f"config {c.name}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_attention_heads} heads, ffn {c.ffn_dim}, vocab {c.vocab_size}, "
                f"embed {c.word_embed_proj_dim}, "
                f"{'pre' if c.do_layer_norm_before else 'post'}-LN, "
                f"{c.num_params() / 1e6:,.1f}M params — {self.config_source}")


# --------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------
def discover(src: str | os.PathLike) -> list[list[Path]]:
    """The checkpoint's files as [part][shard]; raises naming any missing file."""
    src = Path(src)
    if src.is_file():
        return [[src]]
    if not src.is_dir():
        raise WeightError(f"Metaseq checkpoint {src} does not exist")
    pts = sorted(p for p in src.iterdir() if p.suffix == ".pt" and p.is_file())
    for pattern, sharded in ((SHARD_FILE, True), (PART_FILE, False)):
        found: dict[str, dict[tuple[int, int], Path]] = {}
        for p in pts:
            m = pattern.match(p.name)
            if m:
                pos = (int(m["part"]), int(m["shard"]) if sharded else 0)
                found.setdefault(m["prefix"], {})[pos] = p
        if not found:
            continue
        if len(found) > 1:
            raise WeightError(f"{src} holds files of several checkpoints ({', '.join(found)}); "
                              "move all but one into another folder")
        prefix, grid = next(iter(found.items()))
        n_parts = 1 + max(p for p, _ in grid)
        n_shards = 1 + max(r for _, r in grid)
        missing = [(p, r) for p in range(n_parts) for r in range(n_shards) if (p, r) not in grid]
        if missing:
            names = [src / (f"{prefix}-model_part-{p}-shard{r}.pt" if sharded
                            else f"{prefix}-model_part-{p}.pt") for p, r in missing]
            parts = sorted({p for p, _ in missing})
            whole = [p for p in parts if all((p, r) not in grid for r in range(n_shards))]
            what = (f"model-parallel part(s) {whole} missing entirely; " if whole else "")
            raise WeightError(f"missing checkpoint file {names[0]}"
                              + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                              + f" ({what}found {len(grid)} of {n_parts} x {n_shards} files)")
        return [[grid[(p, r)] for r in range(n_shards)] for p in range(n_parts)]
    if len(pts) == 1:
        return [[pts[0]]]
    if not pts:
        raise WeightError(f"{src} holds no Metaseq checkpoint (*.pt) files")
    shown = ", ".join(p.name for p in pts[:5])
    raise WeightError(f"{src} holds several unrelated .pt files ({shown}); pass the checkpoint "
                      "file itself")


# --------------------------------------------------------------------------------------------
# One part: unflatten
# --------------------------------------------------------------------------------------------
def _model_dict(obj: Any, path: Path) -> dict[str, Any]:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise WeightError(f"{path} is not a Metaseq checkpoint (no 'model' state dict)")
    return {k: v for k, v in obj.items() if isinstance(v, LazyTensor)}


def _is_flat(model: Mapping[str, Any]) -> bool:
    return any(FLAT_KEY.match(k) for k in model)


def _field(entry: Any, name: str, position: int):
    """A field of a metadata dict (consolidators also unpack ``.values()`` positionally)."""
    if isinstance(entry, Mapping):
        if name in entry:
            return entry[name]
        return list(entry.values())[position]
    return getattr(entry, name)


def _instances(meta: Any, path: Path) -> list[tuple[str, str, tuple, tuple, tuple, int, bool]]:
    """(fsdp_path, flat name, names, shapes, numels, padding, no_broadcast) per flat param."""
    try:
        out = []
        for entry in meta["param_metadata"]:
            fsdp_path = entry["fsdp_path"]
            no_bcast = bool(entry.get("no_broadcast_optim_state", False))
            for flat_name, p in entry["params"].items():
                names = tuple(_field(p, "names", 0))
                shapes = tuple(tuple(int(s) for s in shape) for shape in _field(p, "shapes", 1))
                numels = tuple(int(n) for n in _field(p, "numels", 2))
                padding = int(_field(p, "padding", 3))
                if not len(names) == len(shapes) == len(numels):
                    raise ValueError("names, shapes and numels differ in length")
                for shape, n in zip(shapes, numels, strict=True):
                    if math.prod(shape) != n:
                        raise ValueError(f"shape {shape} does not hold {n} elements")
                out.append((fsdp_path, flat_name, names, shapes, numels, padding, no_bcast))
        return out
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise WeightError(f"corrupt shard_metadata in {path}: {type(e).__name__}: {e}") from None


def _segments(pieces: list[tuple[LazyTensor, int]], lo: int, hi: int):
    """Segments covering elements [lo, hi) of the concatenation of (tensor, real length)."""
    out, pos = [], 0
    for t, real in pieces:
        a, b = max(lo, pos), min(hi, pos + real)
        if a < b:
            out.append((t, a - pos, b - a))
        pos += real
    return tuple(out)


def _unflatten_sharded(files: list[Path], objs: list[Any]) -> dict[str, PartTensor]:
    """§1.6: each flat parameter is the concatenation of the shards minus each one's padding."""
    metas = []
    for path, obj in zip(files, objs, strict=True):
        meta = obj.get("shard_metadata") if isinstance(obj, Mapping) else None
        if meta is None:
            raise WeightError(f"{path} holds FSDP flat parameters but no shard_metadata, while "
                              f"other shards of its part do")
        metas.append(_instances(meta, path))
    first = metas[0]
    for path, inst in zip(files[1:], metas[1:], strict=True):
        if [i[:5] for i in inst] != [i[:5] for i in first]:
            raise WeightError(f"shard_metadata of {path} differs from {files[0]}'s: files from "
                              "different checkpoints?")
    models = [_model_dict(obj, path) for path, obj in zip(files, objs, strict=True)]
    out: dict[str, PartTensor] = {}
    for k, (fsdp_path, flat_name, names, shapes, numels, _, no_bcast) in enumerate(first):
        key = join_key(fsdp_path, flat_name)
        pieces = []
        for path, model, inst in zip(files, models, metas, strict=True):
            if key not in model:
                raise WeightError(f"checkpoint file {path} lacks flat parameter {key!r}")
            t, padding = model[key], inst[k][5]
            if len(t.shape) != 1 or not 0 <= padding <= t.numel:
                raise WeightError(f"corrupt checkpoint file {path}: {key} has shape {t.shape} "
                                  f"and padding {padding}")
            if pieces and (t.dtype, t.numel) != (pieces[0][0].dtype, pieces[0][0].numel):
                raise WeightError(f"{path} stores {key} as {t.numel} x {t.dtype}, {files[0]} "
                                  f"as {pieces[0][0].numel} x {pieces[0][0].dtype}: shards of "
                                  "different checkpoints mixed?")
            pieces.append((t, t.numel - padding))
        need = sum(numels)
        if no_bcast:  # §1.6: not sharded, shard 0 holds the whole parameter
            pieces = [(pieces[0][0], min(need, pieces[0][0].numel))]
        total = sum(n for _, n in pieces)
        if total != need:
            hint = (f"a shard file after {files[-1].name} is missing?" if total < need else
                    "shards of different checkpoints mixed?")
            raise WeightError(f"the {len(files)} shard files of {files[0].name}'s part hold "
                              f"{total} elements of {key!r}; shard_metadata says {need} "
                              f"({hint})")
        offset = 0
        for name, shape, n in zip(names, shapes, numels, strict=True):
            full = join_key(fsdp_path, name)
            out[full] = PartTensor(full, shape, pieces[0][0].dtype,
                                   _segments(pieces, offset, offset + n))
            offset += n
    return out


def _unflatten_from_layout(path: Path, model: dict[str, LazyTensor], layout: list[FlatInstance],
                           cfg: OPTConfig, parts: int) -> dict[str, PartTensor]:
    """v1_20220502: unsharded, unpadded flat params; names/shapes come from the config."""
    expected = {inst.flat_key: inst for inst in layout}
    flat_keys = {k for k in model if FLAT_KEY.match(k)}
    extra, missing = sorted(flat_keys - set(expected)), sorted(set(expected) - flat_keys)
    if extra or missing:
        raise WeightError(f"{path} does not fit {cfg.name} split into {parts} part(s): "
                          + (f"unexpected flat params {extra[:3]} " if extra else "")
                          + (f"missing flat params {missing[:3]}" if missing else ""))
    out = {}
    for key, inst in expected.items():
        t = model[key]
        if t.numel != inst.numel or len(t.shape) != 1:
            raise WeightError(f"shape mismatch in {path}: {key} holds {t.numel} elements, "
                              f"{cfg.name} split into {parts} part(s) needs {inst.numel} "
                              f"({', '.join(inst.names[:4])}...)")
        offset = 0
        for name, shape, n in zip(inst.names, inst.shapes, inst.numels, strict=True):
            full = inst.key(name)
            out[full] = PartTensor(full, shape, t.dtype, ((t, offset, n),))
            offset += n
    return out


def _unflattened(path: Path, model: dict[str, LazyTensor]) -> dict[str, PartTensor]:
    return {k: PartTensor(k, t.shape, t.dtype, ((t, 0, t.numel),)) for k, t in model.items()}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def model_namespace(obj: Any) -> Any:
    """The checkpoint's ``cfg["model"]`` (or legacy ``args``) as a Namespace-like object."""
    if not isinstance(obj, Mapping):
        return None
    cfg = torchfile.plain(obj.get("cfg"))
    ns = None
    if isinstance(cfg, Mapping):
        ns = torchfile.plain(cfg.get("model"))
    if ns is None:
        ns = torchfile.plain(obj.get("args"))
    return ns


def ns_get(ns: Any, name: str, default=None):
    if ns is None:
        return default
    if isinstance(ns, Mapping):
        return ns.get(name, default)
    return getattr(ns, name, default)


def resolve_model(model: str | OPTConfig) -> OPTConfig:
    """``--model``: an OPTConfig, a preset name or an HF ``config.json`` path."""
    if isinstance(model, OPTConfig):
        return model
    if str(model).endswith(".json"):
        return OPTConfig.from_json(model)
    return OPTConfig.from_name(str(model))


def _preset_named(cfg: OPTConfig) -> OPTConfig:
    for name, preset in PRESETS.items():
        if preset.replace(name=cfg.name) == cfg:
            return cfg.replace(name=name)
    return cfg


def _global_shapes(part: dict[str, PartTensor], parts: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, t in part.items():
        d = split_dim(key)
        shape = list(t.shape)
        if d is not None and parts > 1 and len(shape) > d:
            shape[d] *= parts
        out[key] = tuple(shape)
    return out


def _infer_from_shapes(shapes: dict[str, tuple[int, ...]], ns: Any) -> tuple[OPTConfig, str]:
    def need(key):
        if key not in shapes:
            raise WeightError(f"cannot infer the model shape: the checkpoint has no {key!r}; "
                              "pass --model")
        return shapes[key]

    v, e = need("decoder.embed_tokens.weight")
    n_pos, h = need("decoder.embed_positions.weight")
    layers = {int(m[1]) for k in shapes if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    f = need("decoder.layers.0.fc1.weight")[0]
    used = ["tensor shapes"]
    pre_ln = ns_get(ns, "decoder_normalize_before")
    if pre_ln is None:
        pre_ln = "decoder.layer_norm.weight" in shapes
    else:
        used.append("decoder_normalize_before")
    cfg = OPTConfig(vocab_size=v, hidden_size=h, num_hidden_layers=len(layers),
                    num_attention_heads=1, ffn_dim=f, max_position_embeddings=n_pos - 2,
                    word_embed_proj_dim=e, do_layer_norm_before=bool(pre_ln),
                    remove_final_layer_norm=bool(pre_ln) and
                    "decoder.layer_norm.weight" not in shapes, name="opt-custom")
    heads = ns_get(ns, "decoder_attention_heads")
    if heads is not None:
        used.append(f"decoder_attention_heads={heads} from the checkpoint cfg")
    else:
        same = [p for p in PRESETS.values() if p.replace(num_attention_heads=1, name="x")
                == cfg.replace(name="x")]
        if not same:
            raise WeightError("cannot infer the number of attention heads (the checkpoint has no "
                              "cfg and its shapes match no preset); pass --model")
        heads = same[0].num_attention_heads
        used.append(f"{heads} heads from preset {same[0].name}")
    cfg = _preset_named(cfg.replace(num_attention_heads=int(heads)))
    for field, value in (("decoder_embed_dim", h), ("decoder_ffn_embed_dim", f),
                         ("decoder_layers", len(layers))):
        got = ns_get(ns, field)
        if got is not None and int(got) != value:
            log.warning("checkpoint cfg says %s=%s but the tensors say %s; using the tensors",
                        field, got, value)
    return cfg, "inferred from " + ", ".join(used)


def _config_from_namespace(ns: Any, flat_root: int, parts: int) -> OPTConfig | None:
    """v1_20220502 without --model: the cfg's model flags, vocab size from the root's size."""
    fields = ("decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim",
              "decoder_attention_heads")
    if any(ns_get(ns, f) is None for f in fields):
        return None
    h = int(ns_get(ns, "decoder_embed_dim"))
    e = int(ns_get(ns, "decoder_input_dim", h) or h)
    base = OPTConfig(vocab_size=parts, hidden_size=h,
                     num_hidden_layers=int(ns_get(ns, "decoder_layers")),
                     num_attention_heads=int(ns_get(ns, "decoder_attention_heads")),
                     ffn_dim=int(ns_get(ns, "decoder_ffn_embed_dim")),
                     max_position_embeddings=int(ns_get(ns, "max_target_positions", 2048)),
                     word_embed_proj_dim=e,
                     do_layer_norm_before=bool(ns_get(ns, "decoder_normalize_before", True)),
                     name="opt-custom")
    try:
        rest = flat_layout(base, parts)[0].numel - e  # root minus its (1 x e) embedding rows
    except ValueError:
        return None
    if flat_root <= rest or (flat_root - rest) % e:
        return None
    return _preset_named(base.replace(vocab_size=(flat_root - rest) // e * parts))


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------
def open_metaseq(src: str | os.PathLike, model: str | OPTConfig | None = None
                 ) -> MetaseqCheckpoint:
    """Open a Metaseq checkpoint (file or folder) of any layout; reads metadata only.

    ``model`` (preset name, ``config.json`` path or OPTConfig) fixes the config; without it
    the config is inferred from the tensor shapes and the checkpoint's own ``cfg``.
    """
    src = Path(src)
    files = discover(src)
    n_parts = len(files)
    given = resolve_model(model) if model is not None else None
    parts: list[dict[str, PartTensor]] = []
    ns = None
    kinds = set()
    cfg = given
    source = ""
    if given is not None:
        source = f"given: {model.name if isinstance(model, OPTConfig) else model}"
    for p, part_files in enumerate(files):
        objs = [torchfile.load(f) for f in part_files]
        models = [_model_dict(o, f) for o, f in zip(objs, part_files, strict=True)]
        if p == 0:
            ns = model_namespace(objs[0])
        flat = [_is_flat(m) for m in models]
        if any(flat) != all(flat):
            bad = part_files[flat.index(not flat[0])]
            raise WeightError(f"{bad} does not match {part_files[0]} (flat vs unflattened "
                              "parameters)")
        has_meta = [isinstance(o, Mapping) and o.get("shard_metadata") is not None for o in objs]
        if flat[0] and any(has_meta):
            kinds.add("fsdp")
            parts.append(_unflatten_sharded(part_files, objs))
        elif flat[0]:
            kinds.add("v1_20220502")
            if len(part_files) > 1:
                raise WeightError(f"{part_files[1]}: sharded flat parameters without "
                                  "shard_metadata cannot be unflattened")
            if cfg is None:
                cfg, source = _flat_config(ns, models[0], n_parts)
                if cfg is None:
                    _raise_if_missing_parts(ns, n_parts, files, models[0])
                    raise WeightError(f"{part_files[0]}: flat parameters without shard_metadata "
                                      "fit neither the checkpoint's cfg nor a preset; pass "
                                      "--model")
            try:
                layout = flat_layout(cfg, n_parts)
            except ValueError as e:
                raise WeightError(f"{part_files[0]}: {e}") from None
            try:
                parts.append(_unflatten_from_layout(part_files[0], models[0], layout, cfg,
                                                    n_parts))
            except WeightError:
                _raise_if_missing_parts(ns, n_parts, files, models[0], cfg)
                raise
        else:
            if len(part_files) > 1:
                raise WeightError(f"{part_files[1]}: several shard files of unflattened "
                                  "tensors; expected one file per part")
            kinds.add("consolidated" if n_parts == 1 and not PART_FILE.match(part_files[0].name)
                      else "v1_20230405")
            parts.append(_unflattened(part_files[0], models[0]))
        del objs, models
    if len(kinds) != 1:
        raise WeightError(f"{src}: parts of different layouts {sorted(kinds)}")
    layout_name = kinds.pop()
    _check_parts_agree(parts, files)
    shapes = _global_shapes(parts[0], n_parts)
    _check_part_count(parts[0], files)
    if cfg is None:
        cfg, source = _infer_from_shapes(shapes, ns)
    log.info("config %s: %s", cfg.name, source)
    return MetaseqCheckpoint(src, layout_name, files, parts, cfg, source, ns)


def _flat_sizes_fit(cfg: OPTConfig, model: dict[str, LazyTensor], parts: int) -> bool:
    try:
        layout = flat_layout(cfg, parts)
    except ValueError:
        return False
    sizes = {k: t.numel for k, t in model.items() if FLAT_KEY.match(k)}
    return {i.flat_key: i.numel for i in layout} == sizes


def _flat_config(ns: Any, model: dict[str, LazyTensor], parts: int
                 ) -> tuple[OPTConfig | None, str]:
    """v1_20220502 without --model: the checkpoint's cfg, else a preset, that fits every flat
    parameter's size."""
    root = model.get("flat_param_0")
    cfg = _config_from_namespace(ns, root.numel if root is not None else -1, parts)
    if cfg is not None and _flat_sizes_fit(cfg, model, parts):
        return cfg, ("checkpoint cfg (decoder_* flags), vocab size from the root flat "
                     "parameter's size")
    for preset in PRESETS.values():
        if _flat_sizes_fit(preset, model, parts):
            return preset, f"preset {preset.name} matched by the flat parameter sizes"
    return None, ""


def _raise_if_missing_parts(ns, n_parts, files, model, cfg=None) -> None:
    """Flat files carry no shapes: if they fit ``model_parallel_size`` parts (from the cfg),
    not the number of part files found, parts are missing."""
    mp = ns_get(ns, "model_parallel_size")
    if mp is None or int(mp) <= n_parts:
        return
    fits = (_flat_sizes_fit(cfg, model, int(mp)) if cfg is not None
            else _flat_config(ns, model, int(mp))[0] is not None)
    if fits:
        first = files[0][0].name
        names = [re.sub(r"model_part-\d+", f"model_part-{p}", first)
                 for p in range(n_parts, int(mp))]
        raise WeightError(f"missing model-parallel part(s): found {n_parts}, the checkpoint is "
                          f"split into {mp}; missing {', '.join(names)}")


def _check_parts_agree(parts: list[dict[str, PartTensor]], files: list[list[Path]]) -> None:
    keys0 = {k: (t.shape, t.dtype) for k, t in parts[0].items()}
    for p in range(1, len(parts)):
        keys = {k: (t.shape, t.dtype) for k, t in parts[p].items()}
        if keys != keys0:
            diff = sorted(set(keys) ^ set(keys0)) or sorted(k for k in keys if keys[k] != keys0[k])
            raise WeightError(f"part {p} ({files[p][0]}) does not match part 0 "
                              f"({files[0][0]}): {diff[:3]} differ")


def _check_part_count(part0: dict[str, PartTensor], files: list[list[Path]]) -> None:
    """A missing last part leaves no hole in the file names: the fused qkv's rows tell."""
    n_parts = len(files)
    qkv = part0.get("decoder.layers.0.self_attn.qkv_proj.weight")
    if qkv is None:
        q = part0.get("decoder.layers.0.self_attn.q_proj.weight")
        rows = q.shape[0] * 3 if q is not None else None
    else:
        rows = qkv.shape[0]
    pos = part0.get("decoder.embed_positions.weight")
    if rows is None or pos is None or len(pos.shape) != 2:
        return
    h = pos.shape[1]
    if rows * n_parts == 3 * h or (3 * h) % rows:
        return
    total = 3 * h // rows
    if total > n_parts:
        first = files[0][0].name
        names = [re.sub(r"model_part-\d+", f"model_part-{p}", first)
                 for p in range(n_parts, total)]
        raise WeightError(f"missing model-parallel part(s): found {n_parts} but the tensors are "
                          f"split {total} ways; missing {', '.join(names)}")
    raise WeightError(f"{files[0][0]}: qkv_proj has {rows} rows per part, which does not fit "
                      f"hidden size {h} split into {n_parts} part(s)")

