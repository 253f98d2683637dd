"""Response bodies from what the sequences produced: completions and chat, whole (JSON) or
as stream chunks.

A *format* (:class:`CompletionFormat`, :class:`ChatFormat`) knows one API's shapes: the
whole response from the chosen :class:`Result` s, the chunks for one sequence's
:class:`~optkit.serve.scheduler.Output`, and the final usage chunk.  The collector and the
SSE stream (:mod:`optkit.serve.streaming`) are the same for both APIs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from optkit.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Choice,
    Completion,
    Delta,
    Logprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
    completion_id,
    now,
)
from optkit.serve.requests import Plan
from optkit.serve.scheduler import Output
from optkit.serve.text import TokenEntry


@dataclass
class Result:
    """Everything one sequence produced: its text, token entries and last output."""

    text: str = ""
    entries: list[TokenEntry] = field(default_factory=list)
    final: Output | None = None

    def add(self, out: Output) -> None:
        if out.prompt_text is not None:
            self.text += out.prompt_text
            self.entries.extend(out.prompt_entries or [])
        self.text += out.text
        self.entries.extend(out.entries)
        if out.finish_reason is not None:
            self.final = out


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def completion_logprobs(entries: list[TokenEntry]) -> Logprobs:
    return Logprobs(tokens=[e.token for e in entries],
                    token_logprobs=[e.logprob for e in entries],
                    top_logprobs=[e.top for e in entries],
                    text_offset=[e.offset for e in entries])


def chat_logprobs(entries: list[TokenEntry], k: int) -> ChatLogprobs:
    """Chat log-probs: each token with its ``k`` most likely alternatives."""
    def top(e: TokenEntry) -> list[TopLogprob]:
        best = sorted((e.top or {}).items(), key=lambda kv: -kv[1])[:k]
        return [TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in best]

    return ChatLogprobs(content=[
        TokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
                     top_logprobs=top(e)) for e in entries])


class CompletionFormat:
    """``/v1/completions``: ``text_completion`` objects."""

    def __init__(self, model: str, plan: Plan):
        self.model, self.plan = model, plan
        self.id, self.created = completion_id("cmpl"), now()

    def _logprobs(self, entries: list[TokenEntry]) -> Logprobs | None:
        return completion_logprobs(entries) if self.plan.logprobs is not None else None

    def response(self, results: list[Result]) -> Completion:
        choices = [Choice(index=i, text=r.text, logprobs=self._logprobs(r.entries),
                          finish_reason=r.final.finish_reason)
                   for i, r in enumerate(results)]
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices,
                          usage=usage(self.plan.prompt_tokens,
                                      sum(r.final.num_generated for r in results)))

    def chunks(self, index: int, out: Output) -> list[BaseModel]:
        entries = (out.prompt_entries or []) + out.entries
        return [Completion(id=self.id, created=self.created, model=self.model, choices=[
            Choice(index=index, text=(out.prompt_text or "") + out.text,
                   logprobs=self._logprobs(entries), finish_reason=out.finish_reason)])]

    def usage_chunk(self, completion_tokens: int) -> BaseModel:
        return Completion(id=self.id, created=self.created, model=self.model, choices=[],
                          usage=usage(self.plan.prompt_tokens, completion_tokens))


class ChatFormat:
    """``/v1/chat/completions``: ``chat.completion`` objects and their chunks.  The reply's
    leading whitespace (what follows ``Assistant:`` in the template) is dropped."""

    def __init__(self, model: str, plan: Plan):
        self.model, self.plan = model, plan
        self.id, self.created = completion_id("chatcmpl"), now()
        self._started: set[int] = set()   # choices whose role chunk was sent
        self._text: set[int] = set()      # choices whose first visible text was sent

    def _logprobs(self, entries: list[TokenEntry]) -> ChatLogprobs | None:
        if self.plan.logprobs is None:
            return None
        return chat_logprobs(entries, self.plan.logprobs)

    def response(self, results: list[Result]) -> ChatCompletion:
        choices = [ChatChoice(index=i, message=AssistantMessage(content=r.text.lstrip()),
                              logprobs=self._logprobs(r.entries),
                              finish_reason=r.final.finish_reason)
                   for i, r in enumerate(results)]
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              choices=choices,
                              usage=usage(self.plan.prompt_tokens,
                                          sum(r.final.num_generated for r in results)))

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[choice])

    def chunks(self, index: int, out: Output) -> list[BaseModel]:
        chunks = []
        if index not in self._started:
            self._started.add(index)
            chunks.append(self._chunk(ChatChunkChoice(
                index=index, delta=Delta(role="assistant", content=""))))
        text = out.text
        if index not in self._text:
            text = text.lstrip()
            if text:
                self._text.add(index)
        if text or out.entries or out.finish_reason is not None:
            chunks.append(self._chunk(ChatChunkChoice(
                index=index, delta=Delta(content=text) if text else Delta(),
                logprobs=self._logprobs(out.entries) if out.entries else None,
                finish_reason=out.finish_reason)))
        return chunks

    def usage_chunk(self, completion_tokens: int) -> BaseModel:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[],
                                   usage=usage(self.plan.prompt_tokens, completion_tokens))
