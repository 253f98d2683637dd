"""OpenAI completions schema (the legacy ``/v1/completions``), validated strictly.

Unknown fields, wrong JSON types and out-of-range values are refused (HTTP 400), so a
client that misspells a parameter learns it instead of silently getting defaults.
``top_k`` is the one extension (as vLLM); OpenAI fields optkit cannot honour
(penalties, ``logit_bias``, ``suffix``) are accepted only at their neutral values.

Log-probs follow the legacy OpenAI shape: ``tokens`` (each token's own text),
``token_logprobs`` (``None`` for the first prompt token under ``echo``), ``top_logprobs``
(the ``logprobs`` most likely tokens plus the chosen one, text -> log-prob, from the model's
unmodified distribution) and ``text_offset`` (where each token starts in the choice's
``text``; the byte tokens of one split character share its offset).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    top_k: Annotated[int, Field(ge=-1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = 1
    best_of: Annotated[int, Field(ge=1)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    suffix: Literal[None] = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, str):
            if not v:
                raise ValueError("the prompt is empty")
        elif not v:
            raise ValueError("the prompt list is empty")
        elif any(isinstance(p, list | str) and not p for p in v):
            raise ValueError("the prompt list holds an empty prompt")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None:
            if len(stops) > 8:
                raise ValueError("at most 8 stop strings")
            if any(not s for s in stops):
                raise ValueError("stop strings must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of (text or token-id) prompts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class Logprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
