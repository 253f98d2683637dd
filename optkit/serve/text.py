"""Token ids <-> text for the server: codecs, incremental decoding and stop strings.

A *codec* is the little the server needs from a tokenizer (:class:`HFCodec` wraps any HF
tokenizer; the fake engine's :class:`CharCodec` maps one ASCII character to one id).
:class:`TextStream` turns generated ids into text as it becomes final: an incomplete UTF-8
character (byte-level BPE splits them over tokens) and a suffix that may begin a stop string
are held back; a stop string ends the text before it.  Every token gets a text offset: where
its text starts in the decoded string (the tokens of a split character share one offset).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete UTF-8 sequence


class Codec(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_str(self, token: int) -> str: ...
    def is_special(self, token: int) -> bool: ...


class HFCodec:
    """An HF tokenizer as a codec (OPT's prepends ``</s>`` to every prompt)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self._special = frozenset(tokenizer.all_special_ids)
        self.token_str = functools.lru_cache(maxsize=1 << 16)(self._token_str)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _token_str(self, token: int) -> str:
        return self.tokenizer.decode([int(token)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def is_special(self, token: int) -> bool:
        return int(token) in self._special


class CharCodec:
    """One ASCII character per id (id = ``ord``); id 0 is the special end-of-text token.
    Characters outside ASCII encode as ``?``.  Used with the fake engine."""

    vocab_size = 128
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) if 0 < ord(c) < 128 else ord("?") for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(int(i)) for i in ids if int(i) != 0)

    def token_str(self, token: int) -> str:
        return "<eot>" if int(token) == 0 else chr(int(token))

    def is_special(self, token: int) -> bool:
        return int(token) == 0


@dataclass
class TokenEntry:
    """One token of a choice's ``logprobs``: its text, log-probability (None for the first
    prompt token), top alternatives (text -> log-prob) and where its text starts."""

    token: str
    logprob: float | None
    top: dict[str, float] | None
    offset: int


class TextStream:
    """Ids -> text, released as it becomes final; ``stop`` strings end it.

    ``add(token)`` appends a token; ``release(final)`` returns the new text that is safe to
    show (everything at ``final``) and ``pop_entries`` the token entries whose text started
    inside what has been released.  ``stopped`` tells whether a stop string was found.
    """

    def __init__(self, codec: Codec, stop: Sequence[str] = (), start: int = 0):
        self.codec = codec
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""            # decoded text so far (complete characters only)
        self.start = start        # offset of this text inside the response (echo)
        self.sent = 0             # characters released
        self.stopped = False
        self._window = 0          # ids[_window:_read] decode to the tail already in text
        self._read = 0
        self._entries: list[TokenEntry] = []

    def add(self, token: int, entry: TokenEntry | None = None) -> None:
        if self.stopped:
            return
        if entry is not None:
            entry.offset = self.start + len(self.text)
            self._entries.append(entry)
        self.ids.append(int(token))
        if self.codec.is_special(token):
            return
        before = self.codec.decode(self.ids[self._window:self._read])
        after = self.codec.decode(self.ids[self._window:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            checked = len(self.text)
            self.text += after[len(before):]
            self._window, self._read = self._read, len(self.ids)
            self._find_stop(checked)

    def _find_stop(self, checked: int) -> None:
        cut = None
        for s in self.stop:
            i = self.text.find(s, max(0, checked - len(s) + 1))
            if i >= 0 and (cut is None or i < cut):
                cut = i
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            self._entries = [e for e in self._entries if e.offset - self.start < cut]

    def finish(self) -> None:
        """Decode everything (a dangling incomplete character shows as U+FFFD)."""
        if not self.stopped:
            checked = len(self.text)
            self.text = self.codec.decode(self.ids)
            self._find_stop(checked)

    def _held(self) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def release(self, final: bool = False) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def pop_entries(self, final: bool = False) -> list[TokenEntry]:
        if final:
            out, self._entries = self._entries, []
            return out
        n = 0
        while n < len(self._entries) and self._entries[n].offset - self.start < self.sent:
            n += 1
        out, self._entries = self._entries[:n], self._entries[n:]
        return out


def prompt_entries(codec: Codec, ids: Sequence[int], logprobs: Sequence[float] | None,
                   tops: Sequence[dict[str, float]] | None) -> tuple[str, list[TokenEntry]]:
    """Echo text of a prompt and its token entries (the first token has no log-prob)."""
    stream = TextStream(codec)
    for i, t in enumerate(ids):
        lp = None if i == 0 or logprobs is None else float(logprobs[i - 1])
        top = None if i == 0 or tops is None else tops[i - 1]
        stream.add(t, TokenEntry(codec.token_str(t), lp, top, 0))
    stream.finish()
    return stream.text, stream.pop_entries(final=True)
