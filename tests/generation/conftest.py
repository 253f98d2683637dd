"""Fixtures for generation tests: HF reference models with the same weights as an executor
(built once per config and process), and a hand-checkable scripted executor."""

import numpy as np
import torch

from optkit.parallel.executor import MeshExecutor
from optkit.weights.load import load_params
from optkit.weights.random import random_state_dict
from tests.conftest import CONFIGS, hf_model

_PAIRS: dict = {}


def model_pair(name: str):
    """(HF ``OPTForCausalLM``, optkit executor) holding the same random fp32 weights."""
    if name not in _PAIRS:
        cfg = CONFIGS[name]
        params = load_params(dict(random_state_dict(cfg, 0)), cfg, progress=False)
        _PAIRS[name] = (hf_model(cfg, 0), MeshExecutor(cfg, params))
    return _PAIRS[name]


def hf_generate(hf, ids, mask, **kw) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          do_sample=False, **kw)
    return out.numpy()
