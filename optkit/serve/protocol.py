"""OpenAI request/response schemas (completions, chat completions) and vLLM's tokenizer
endpoints, validated strictly.

Unknown fields, wrong JSON types and out-of-range values are refused (HTTP 400), so a
client that misspells a parameter learns it instead of silently getting defaults.  Every
check a schema can state is in the models, so the OpenAPI document states it too: text
holds no lone UTF-16 surrogates (they can be neither tokenized nor encoded as UTF-8),
integers fit the device's dtypes (int32; the seed uint32), numbers are finite, prompts and
stop strings are not empty.  vLLM's sampling extensions that benchmark and eval tools send
are accepted: ``top_k`` (-1 or 0: off), ``min_tokens`` (no end-of-sequence before that many
tokens), ``repetition_penalty`` (> 0; 1 is off) and ``ignore_eos``.  OpenAI fields optkit
cannot honour (presence / frequency penalties, ``logit_bias``, ``suffix``) are accepted
only at their neutral values.

Completion log-probs follow the legacy OpenAI shape: ``tokens`` (each token's own text),
``token_logprobs`` (``None`` for the first prompt token under ``echo``), ``top_logprobs``
(the ``logprobs`` most likely tokens plus the chosen one, text -> log-prob, from the model's
unmodified distribution) and ``text_offset`` (where each token starts in the choice's
``text``; the byte tokens of one split character share its offset).  Chat log-probs follow
the chat shape: ``content``, a list of ``{token, logprob, bytes, top_logprobs}``.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    StrictStr,
    Tag,
    field_validator,
)

MAX_STOPS = 8
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
TOKEN_ID = "x-token-id"  # marks token ids in JSON schemas
SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(text: str) -> str:
    if m := SURROGATE.search(text):
        raise ValueError(f"the text holds a lone UTF-16 surrogate (U+{ord(m.group()):04X}) "
                         f"at index {m.start()}")
    return text


#: Text that can be tokenized and encoded as UTF-8.
Text = Annotated[StrictStr, AfterValidator(_no_surrogates)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1), AfterValidator(_no_surrogates)]


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def integer(lo: int, hi: int):
    """A JSON integer in [lo, hi]: ``3`` or ``3.0`` (both integers to JSON Schema), not
    ``3.5``, ``"3"`` or ``true``."""
    return Annotated[StrictInt, Field(ge=lo, le=hi), BeforeValidator(_integral)]


#: A count or id the device holds as int32.
Int32 = integer(0, INT32_MAX)
Positive32 = integer(1, INT32_MAX)
#: A token id (the served vocabulary's bound is set in the app's OpenAPI document).
TokenId = Annotated[Int32, Field(json_schema_extra={TOKEN_ID: True})]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def _prompt_kind(v) -> str | None:
    """The member of :data:`Prompt` a value is meant as (by its JSON type)."""
    if isinstance(v, str):
        return "text"
    if isinstance(v, list):
        first = v[0] if v else 0
        return "texts" if isinstance(first, str) else "batch" if isinstance(first, list) \
            else "ids"
    return None


#: A completion prompt: text, texts, token ids or lists of token ids, none of them empty.
Prompt = Annotated[
    Annotated[NonEmptyText, Tag("text")]
    | Annotated[list[NonEmptyText], Field(min_length=1), Tag("texts")]
    | Annotated[TokenIds, Tag("ids")]
    | Annotated[list[TokenIds], Field(min_length=1), Tag("batch")],
    Discriminator(_prompt_kind, custom_error_type="prompt_type",
                  custom_error_message="a string, a list of strings, a list of token ids "
                                       "or a list of token-id lists")]
#: What every request model shares: unknown fields and loose types refused, numbers finite.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class APIError(Exception):
    """An error answered as an OpenAI error object with HTTP ``status`` (and ``headers``,
    e.g. ``Retry-After``)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)
        self.headers = headers


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completion and chat requests."""

    model_config = STRICT

    model: Text
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    n: Positive32 | None = 1
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOPS)] | None \
        = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: integer(0, UINT32_MAX) | None = None
    user: Text | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    logit_bias: Annotated[dict[Text, float], Field(max_length=0)] | None = None
    # vLLM's extensions
    top_k: integer(-1, INT32_MAX) | None = None
    min_tokens: Int32 | None = 0
    repetition_penalty: Annotated[float, Field(gt=0)] | None = 1.0
    ignore_eos: bool | None = False

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: Annotated[Prompt, Field(examples=["Paris is the capital of"])]
    max_tokens: Int32 | None = 16
    best_of: Positive32 | None = None
    echo: bool | None = False
    logprobs: Int32 | None = None
    suffix: Literal[None] = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of (text or token-id) prompts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """A message of the conversation (text content only)."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, not {kind!r}")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(
        min_length=1, examples=[[{"role": "user", "content": "What is the capital of France?"}]])]
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = False
    top_logprobs: integer(0, 20) | None = None


def _no_default(schema: dict) -> None:
    schema.pop("default", None)  # None stands for "not sent"; null is refused


class TokenizeRequest(BaseModel):
    """``/tokenize``: a ``prompt``, or chat ``messages`` rendered by the chat template
    (exactly one of them, as the schema says and the planner checks; neither may be null)."""

    model_config = ConfigDict(**STRICT, json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})
    model: Text | None = None
    prompt: Text = Field(None, json_schema_extra=_no_default)  # type: ignore[assignment]
    messages: list[ChatMessage] = Field(  # type: ignore[assignment]
        None, json_schema_extra=_no_default)
    add_special_tokens: bool = True  # OPT's </s> in front, as the model is fed
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: Text | None = None
    tokens: list[TokenId]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def completion_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response (OpenAI's error object)."""

    error: ErrorDetail


def _printable(text: str | None) -> str | None:
    """``text`` with lone surrogates escaped (an error may quote what a client sent)."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": _printable(message), "type": type, "param": _printable(param),
                      "code": code}}
