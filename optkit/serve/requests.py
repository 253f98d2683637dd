"""Request validation and expansion: an OpenAI request body -> the sequences to run.

:class:`RequestPlanner` checks what the schema cannot (the model name, ``n`` / ``best_of``
limits, ``min_tokens`` against ``max_tokens``, context length through the scheduler's
``check``), tokenizes prompts (chat messages through the chat template) and expands each
prompt into ``best_of`` :class:`~optkit.serve.scheduler.SeqRequest` s, prompt-major.
Every refusal is an :class:`~optkit.serve.protocol.APIError`.  It also answers
``/tokenize`` and ``/detokenize``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from optkit.serve.chat import ChatTemplate, template_for
from optkit.serve.engine import SamplingParams
from optkit.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from optkit.serve.scheduler import RequestError, Scheduler, SeqRequest
from optkit.serve.text import Codec


@dataclass
class Plan:
    """A validated request: its tokenized prompts and the sequences to submit
    (``best_of`` per prompt; the best ``n`` of them are answered)."""

    prompts: list[list[int]]
    seqs: list[SeqRequest]
    n: int
    best_of: int
    logprobs: int | None = None       # top alternatives per token; None: no log-probs
    include_usage: bool = False       # streams end with a usage chunk

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class RequestPlanner:
    """Validates and expands requests for ``scheduler`` (whose ``check`` it applies)."""

    def __init__(self, scheduler: Scheduler, codec: Codec, model_name: str,
                 aliases: tuple[str, ...] = (), max_n: int = 16,
                 chat_template: ChatTemplate | None = None):
        self.scheduler, self.codec, self.model_name = scheduler, codec, model_name
        self.names = {model_name, *aliases}
        self.max_n = max_n
        self.template = chat_template or template_for(model_name)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    def completion(self, body: CompletionRequest) -> Plan:
        self.check_model(body.model)
        prompts = [self.codec.encode(p) if isinstance(p, str) else list(p)
                   for p in body.prompts()]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return self._expand(body, prompts, body.stops(), [max_tokens] * len(prompts),
                            best_of=body.best_of, logprobs=body.logprobs,
                            echo=bool(body.echo))

    def chat(self, body: ChatCompletionRequest) -> Plan:
        self.check_model(body.model)
        prompt = self.codec.encode(self.render(body.messages))
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "send max_completion_tokens or max_tokens, not both",
                           param="max_tokens")
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        if max_tokens is None:  # the rest of the context
            max_tokens = max(self.scheduler.engine.max_len - len(prompt), 0)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        most = self.scheduler.engine.max_logprobs
        if logprobs is not None and logprobs > most:
            raise APIError(400, f"top_logprobs may be at most {most} on this server",
                           param="top_logprobs")
        return self._expand(body, [prompt], self.template.stop + body.stops(), [max_tokens],
                            best_of=None, logprobs=logprobs, echo=False)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        return self.template.render([(m.role, m.text()) for m in messages],
                                    add_generation_prompt)

    def _expand(self, body: SamplingRequest, prompts: list[list[int]],
                stops: tuple[str, ...], max_tokens: list[int], *, best_of: int | None,
                logprobs: int | None, echo: bool) -> Plan:
        n = body.n or 1
        best_of = best_of or n
        if best_of < n:
            raise APIError(400, "best_of must be at least n", param="best_of")
        if best_of > self.max_n:
            raise APIError(400, f"n and best_of may be at most {self.max_n}",
                           param="best_of" if best_of > n else "n")
        if body.stream and best_of > n:
            raise APIError(400, "best_of > n cannot be streamed", param="best_of")
        min_tokens = body.min_tokens or 0
        if any(min_tokens > m for m in max_tokens):
            raise APIError(400, f"min_tokens ({min_tokens}) must not exceed max_tokens "
                                f"({min(max_tokens)})", param="min_tokens")
        total = len(prompts) * best_of
        max_queue = self.scheduler.limits.max_queue
        if total > max_queue:
            raise APIError(400, f"{total} sequences in one request; the server queues at most "
                                f"{max_queue}", param="prompt")
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        seqs = [SeqRequest(
            prompt=tuple(ids), max_tokens=m,
            sampling=SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=max(body.top_k or 0, 0), seed=seed, stream=j, min_tokens=min_tokens,
                repetition_penalty=(1.0 if body.repetition_penalty is None
                                    else body.repetition_penalty)),
            stop=stops, logprobs=logprobs, echo=echo, ignore_eos=bool(body.ignore_eos))
            for ids, m in zip(prompts, max_tokens, strict=True) for j in range(best_of)]
        try:
            for s in seqs:
                self.scheduler.check(s)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Plan(prompts, seqs, n, best_of, logprobs, include_usage)

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", param="prompt")
        text = (body.prompt if body.messages is None
                else self.render(body.messages, body.add_generation_prompt))
        ids = self.codec.encode(text, add_special_tokens=body.add_special_tokens)
        strs = [self.codec.token_str(t) for t in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.scheduler.engine.max_len,
                                tokens=ids, token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        vocab = self.codec.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                           param="tokens")
        return DetokenizeResponse(prompt=self.codec.decode(body.tokens))
