"""HF-style generation on any executor: greedy, sampling, beam search, stop strings, streaming.

``generate(executor, input_ids, attention_mask, **kwargs)`` takes transformers' keyword
names with their meanings (see :mod:`optkit.generation.config`) and returns the sequences,
or a :class:`GenerateOutput` with ``return_dict_in_generate=True``.  The executor is any
object with ``cfg``, ``init_cache``, ``prefill``, ``decode_loop`` and ``select`` (the cache
stays opaque), so the same code drives one device, a mesh, or a pipeline.
:func:`generate_text` works on strings: prompts in, completions (stop strings cut off) and
finish reasons out, with optional streaming of text.

Modules: ``api`` (``generate``), ``config`` (arguments), ``processors`` (logits processors),
``sampling`` (per-row temperature / top-k / top-p), ``search`` (greedy and sampling loop),
``beam`` (beam search), ``stop`` (the stop-string matcher), ``stream`` (incremental
detokenization), ``text`` (strings in and out), ``output`` (the result type).
"""

from __future__ import annotations

from optkit.generation.api import check_inputs, generate
from optkit.generation.config import SUPPORTED, GenerationConfig
from optkit.generation.output import GenerateOutput
from optkit.generation.text import Completion, generate_text

__all__ = ["SUPPORTED", "Completion", "GenerateOutput", "GenerationConfig", "check_inputs",
           "generate", "generate_text"]
