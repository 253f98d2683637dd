"""What ``generate(..., return_dict_in_generate=True)`` returns (HF's field names)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class GenerateOutput:
    """Sequences plus per-step details; attribute and ``out["name"]`` access both work.

    ``sequences`` (N, T + n): prompts followed by the generated tokens, padded after a row
    ends.  N is the batch times ``num_return_sequences`` (row ``i * r + j`` continues prompt
    ``i``).  ``scores``: one (N, V) array per step of the processed scores used to pick the
    token (HF's ``output_scores``; beam search: processed log-probs of the (N*beams) running
    beams).  ``sequences_scores`` / ``beam_indices``: beam search's final scores and the
    beam each token came from.  ``logprobs`` (N, n): log-probability of each generated token
    under the model's own distribution (softmax of the raw logits), 0 after the row ends;
    ``top_logprobs``: (ids, log-probs), each (N, n, k), of the k most likely tokens.
    ``lengths`` (N,): generated tokens per row, its EOS / stop-string token included.
    ``finish_reasons``: ``"stop"`` (EOS or a stop string) or ``"length"`` per row.
    ``timings``: seconds to the first token, decode seconds and device decode steps.
    """

    sequences: np.ndarray
    scores: tuple[np.ndarray, ...] | None = None
    sequences_scores: np.ndarray | None = None
    beam_indices: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    top_logprobs: tuple[np.ndarray, np.ndarray] | None = None
    lengths: np.ndarray | None = None
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    timings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str):
        return getattr(self, name)

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
