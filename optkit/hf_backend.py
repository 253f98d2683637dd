"""The ``facebook/opt-*`` backend: HF transformers' ``OPTForCausalLM`` in torch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from optkit.config import OPTConfig
from optkit.lm import CausalLMOutput, array_kind, as_kind, to_numpy, weights_location
from optkit.options import dtype_name
from optkit.weights.folder import is_weight_folder


class HFOPT:
    """Thin wrapper giving the HF model the same numpy/JAX/torch in-out behaviour."""

    backend = "facebook"

    def __init__(self, model, config: OPTConfig, name: str):
        self.model = model
        self.config = config
        self.name = name

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def _ids(self, x):
        import torch

        if x is None:
            return None, None
        kind = array_kind(x)
        t = torch.from_numpy(np.ascontiguousarray(to_numpy(x))).long()
        return t.to(self.device), kind

    def __call__(self, input_ids, attention_mask=None):
        import torch

        ids, kind = self._ids(input_ids)
        mask, _ = self._ids(attention_mask)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        if kind == "torch":
            return CausalLMOutput(logits)
        return CausalLMOutput(as_kind(logits.float().cpu().numpy(), kind))

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        import torch

        ids, kind = self._ids(input_ids)
        mask, _ = self._ids(attention_mask)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        if hasattr(out, "sequences"):
            return out
        return out if kind == "torch" else as_kind(out.cpu().numpy(), kind)

    def __repr__(self) -> str:
        return f"HFOPT({self.name}, dtype={self.dtype}, device={self.device})"


def hf_model_from_store(cfg: OPTConfig, store, torch_dtype):
    """Build ``OPTForCausalLM`` from a folder-keyed store (an Alpa folder)."""
    import torch
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    from optkit.weights.keymap import to_hf_key
    from optkit.weights.layout import folder_shapes

    model = OPTForCausalLM(HFConfig(**cfg.to_hf_dict()))
    sd = {to_hf_key(k): torch.from_numpy(np.array(store[k][: s[0]], np.float32))
          for k, s in folder_shapes(cfg).items()}
    sd["lm_head.weight"] = sd[to_hf_key("decoder.embed_tokens.weight")]
    model.load_state_dict(sd, strict=True)
    return model.to(torch_dtype)


def get_hf_model(short: str, path=None, dtype="auto", dummy=False, device=None, seed=0,
                 config: OPTConfig | None = None) -> HFOPT:
    import torch
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    from optkit.weights.folder import FolderStore

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = dtype_name(dtype)
    if name == "auto":
        name = "float16" if str(device).startswith("cuda") else "float32"
    torch_dtype = getattr(torch, name)
    if dummy:
        cfg = config or OPTConfig.from_name(short)
        torch.manual_seed(seed)
        with torch.device(device):
            model = OPTForCausalLM(HFConfig(**cfg.to_hf_dict())).to(torch_dtype)
    else:
        loc = Path(weights_location(short, path))
        if is_weight_folder(loc):
            store = FolderStore(loc)
            cfg = config or store.config() or OPTConfig.from_name(short)
            model = hf_model_from_store(cfg, store, torch_dtype)
        else:
            cfg = config or OPTConfig.from_json(loc / "config.json", name=short)
            model = OPTForCausalLM.from_pretrained(os.fspath(loc), dtype=torch_dtype)
    model = model.to(device).eval()
    return HFOPT(model, cfg, name=f"facebook/{short}")
