"""``generate`` keyword arguments: HF transformers' names, defaults and meanings, validated.

:func:`resolve` turns the keyword arguments of one call into a frozen :class:`GenerationConfig`
(lengths made absolute, defaults filled in, EOS ids as a tuple).  Unknown names and
contradictory or out-of-range values raise ``TypeError`` / ``ValueError`` with the reason;
settings HF only warns about (sampling knobs without ``do_sample``, beam knobs without beams,
``output_scores`` without ``return_dict_in_generate``) warn here too.

Defaults follow transformers 5: 20 new tokens (capped at the model's positions), greedy,
and when sampling ``temperature=1``, ``top_k=50``, ``top_p=1``.
"""

from __future__ import annotations

import dataclasses
import operator
import secrets
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from optkit.config import OPTConfig

#: Every keyword ``generate`` accepts (HF names first, then optkit's own).
HF_ARGS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature",
    "top_k", "top_p", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
    "repetition_penalty", "no_repeat_ngram_size", "eos_token_id", "pad_token_id",
    "bad_words_ids", "return_dict_in_generate", "output_scores", "stop_strings", "tokenizer",
    "use_cache",
)
OPTKIT_ARGS = ("seed", "stop", "on_token", "output_logprobs", "top_logprobs",
               "steps_per_dispatch")
SUPPORTED = frozenset(HF_ARGS + OPTKIT_ARGS)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """One call's resolved settings (lengths are absolute: prompt columns included)."""

    prompt_length: int
    max_new_tokens: int
    min_length: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int = 1
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logprobs: bool = False
    top_logprobs: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    tokenizer: Any = None
    on_token: Callable | None = None
    steps_per_dispatch: int | None = None  # None: as many as the executor allows

    @property
    def max_length(self) -> int:
        return self.prompt_length + self.max_new_tokens


def _int(name: str, value, low: int | None = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def _token_ids(name: str, value, vocab: int) -> tuple[int, ...]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    ids = tuple(value) if isinstance(value, list | tuple) else (value,)
    out = tuple(_int(name, i) for i in ids)
    bad = [i for i in out if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{name} {bad} outside the vocabulary [0, {vocab})")
    return out


def resolve(model_cfg: OPTConfig, prompt_length: int, **kw) -> GenerationConfig:
    """Validate ``generate`` keyword arguments for a prompt of ``prompt_length`` columns."""
    unknown = set(kw) - SUPPORTED
    if unknown:
        raise TypeError(f"generate() got unsupported arguments {sorted(unknown)}; supported: "
                        f"{', '.join(HF_ARGS + OPTKIT_ARGS)}")
    kw = {k: v for k, v in kw.items() if v is not None}
    t, vocab, positions = prompt_length, model_cfg.vocab_size, model_cfg.max_position_embeddings
    out: dict[str, Any] = {"prompt_length": t}

    # Lengths ---------------------------------------------------------------------------
    if "max_length" in kw and "max_new_tokens" in kw:
        raise ValueError("pass max_length (prompt included) or max_new_tokens, not both")
    if "max_new_tokens" in kw:
        new = _int("max_new_tokens", kw["max_new_tokens"], 1)
    elif "max_length" in kw:
        max_length = _int("max_length", kw["max_length"])
        if max_length <= t:
            raise ValueError(f"max_length ({max_length}) counts the prompt and must exceed its "
                             f"length ({t}); use max_new_tokens to set the continuation length")
        new = max_length - t
    else:
        new = min(20, positions - t)
        if new <= 0:
            raise ValueError(f"the prompt ({t} tokens) fills the model's {positions} positions")
    if t + new > positions:
        raise ValueError(f"prompt ({t} tokens) + {new} new tokens exceed the model's "
                         f"{positions} positions")
    out["max_new_tokens"] = new
    if "min_length" in kw and "min_new_tokens" in kw:
        raise ValueError("pass min_length (prompt included) or min_new_tokens, not both")
    if "min_new_tokens" in kw:
        out["min_length"] = t + _int("min_new_tokens", kw["min_new_tokens"], 0)
    elif "min_length" in kw:
        out["min_length"] = _int("min_length", kw["min_length"], 0)
    if out.get("min_length", 0) > t + new:
        warnings.warn(f"min length {out['min_length']} exceeds the maximum length {t + new}; "
                      "generation stops at the maximum", UserWarning, stacklevel=3)

    # Decoding mode ---------------------------------------------------------------------
    do_sample = bool(kw.get("do_sample", False))
    out["do_sample"] = do_sample
    if do_sample:
        temperature = _float("temperature", kw.get("temperature", 1.0))
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True (got {temperature}); "
                             "for greedy decoding pass do_sample=False")
        top_k = _int("top_k", kw.get("top_k", 50), 0)
        top_p = _float("top_p", kw.get("top_p", 1.0))
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        out.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        ignored = [k for k, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 50))
                   if k in kw and kw[k] != default]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} only apply to sampling and are ignored: set "
                          "do_sample=True to sample", UserWarning, stacklevel=3)
    beams = _int("num_beams", kw.get("num_beams", 1), 1)
    out["num_beams"] = beams
    n_ret = _int("num_return_sequences", kw.get("num_return_sequences", 1), 1)
    if n_ret > 1 and beams == 1 and not do_sample:
        raise ValueError("greedy decoding gives one sequence per prompt: num_return_sequences "
                         f"= {n_ret} needs do_sample=True or num_beams >= {n_ret}")
    if beams > 1 and n_ret > beams:
        raise ValueError(f"num_return_sequences ({n_ret}) must be <= num_beams ({beams})")
    out["num_return_sequences"] = n_ret
    out["length_penalty"] = _float("length_penalty", kw.get("length_penalty", 1.0))
    early = kw.get("early_stopping", False)
    if early not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early!r}")
    out["early_stopping"] = early
    if beams == 1 and (out["length_penalty"] != 1.0 or early is not False):
        warnings.warn("length_penalty and early_stopping only apply to beam search "
                      "(num_beams > 1) and are ignored", UserWarning, stacklevel=3)

    # Logits processors -----------------------------------------------------------------
    penalty = _float("repetition_penalty", kw.get("repetition_penalty", 1.0))
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    out["repetition_penalty"] = penalty
    out["no_repeat_ngram_size"] = _int("no_repeat_ngram_size",
                                       kw.get("no_repeat_ngram_size", 0), 0)
    eos = _token_ids("eos_token_id", kw.get("eos_token_id", model_cfg.eos_token_id), vocab)
    out["eos_token_id"] = eos
    out["pad_token_id"] = _token_ids("pad_token_id",
                                     kw.get("pad_token_id", model_cfg.pad_token_id), vocab)[0]
    if "bad_words_ids" in kw:
        words = kw["bad_words_ids"]
        if not isinstance(words, list | tuple) or not words or \
                not all(isinstance(w, list | tuple) and len(w) for w in words):
            raise ValueError(f"bad_words_ids must be a non-empty list of non-empty token-id "
                             f"lists, got {words!r}")
        seqs = tuple(_token_ids("bad_words_ids", w, vocab) for w in words)
        out["bad_words_ids"] = tuple(s for s in seqs if not (len(s) == 1 and s[0] in eos))

    # Outputs and streaming -------------------------------------------------------------
    out["return_dict_in_generate"] = bool(kw.get("return_dict_in_generate", False))
    out["output_scores"] = bool(kw.get("output_scores", False))
    top = _int("top_logprobs", kw.get("top_logprobs", 0), 0)
    out["top_logprobs"] = top
    out["output_logprobs"] = bool(kw.get("output_logprobs", False)) or top > 0
    if (out["output_scores"] or out["output_logprobs"]) and not out["return_dict_in_generate"]:
        warnings.warn("output_scores / output_logprobs need return_dict_in_generate=True "
                      "and are ignored", UserWarning, stacklevel=3)
    if "stop" in kw and "stop_strings" in kw:
        raise ValueError("pass stop or stop_strings (the same thing), not both")
    stop = kw.get("stop", kw.get("stop_strings", ()))
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    out["stop"] = stop
    out["tokenizer"] = kw.get("tokenizer")
    on_token = kw.get("on_token")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be callable, got {on_token!r}")
    out["on_token"] = on_token
    if beams > 1 and top:
        raise ValueError("top_logprobs needs num_beams=1; beam search reports each chosen "
                         "token's log-probability (output_logprobs=True)")
    if beams > 1 and (stop or on_token is not None):
        raise ValueError("beam search picks its sequences only at the end: stop strings and "
                         "on_token streaming need num_beams=1 (greedy or sampling)")
    if kw.get("use_cache", True) is not True:
        raise ValueError("optkit always decodes with a KV cache; use_cache=False is not "
                         "supported")
    seed = kw.get("seed")
    out["seed"] = secrets.randbits(31) if seed is None else _int("seed", seed, 0)
    spd = kw.get("steps_per_dispatch")
    out["steps_per_dispatch"] = None if spd is None else _int("steps_per_dispatch", spd, 1)
    return GenerationConfig(**out)
