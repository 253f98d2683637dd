"""Token ids -> text as it becomes final: the one incremental detokenizer.

A *codec* is the little a text stream needs from a tokenizer (:class:`HFCodec` wraps any HF
tokenizer).  :class:`TextStream` turns generated ids into text: an incomplete UTF-8 character
(byte-level BPE splits them over tokens) and an end that may begin a stop string are held
back; a stop string ends the text before it.  Each token may carry a record (the server's
log-prob entries) whose ``offset`` is set to where the token's text starts (the tokens of a
split character share one offset).  ``generate``'s host loop (:class:`StopStrings`),
:func:`~optkit.generation.text.generate_text` and the server all use it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

from optkit.generation.stop import StopMatcher

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete UTF-8 sequence


class Codec(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_str(self, token: int) -> str: ...
    def is_special(self, token: int) -> bool: ...


class HFCodec:
    """An HF tokenizer as a codec (OPT's prepends ``</s>`` to every prompt unless
    ``add_special_tokens=False``); decoding skips special tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self._special = frozenset(tokenizer.all_special_ids)
        self.token_str = functools.lru_cache(maxsize=1 << 16)(self._token_str)
        # a fast tokenizer's Rust decoder, called directly: what its ``decode`` does without
        # cleaning up spaces, minus the Python around it (a text stream decodes twice a token)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _token_str(self, token: int) -> str:
        return self.tokenizer.decode([int(token)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def is_special(self, token: int) -> bool:
        return int(token) in self._special


class TextStream:
    """Ids -> text, released as it becomes final; ``stop`` strings end it.

    ``add(token, entry)`` appends a token (``entry``: any record with an ``offset``
    attribute, or None); ``release(final)`` returns the new text that is safe to show
    (everything when ``final``) and ``pop_entries`` the entries whose text started inside
    what has been released.  ``stopped`` tells whether a stop string was found; ``finish()``
    decodes what is left once no token will follow.
    """

    def __init__(self, codec: Codec, stop: Sequence[str] = (), start: int = 0):
        self.codec = codec
        self.matcher = StopMatcher(stop)
        self.ids: list[int] = []
        self.text = ""            # decoded text so far (complete characters only)
        self.start = start        # offset of this text inside the response (echo)
        self.sent = 0             # characters released
        self.stopped = False
        self._window = 0          # ids[_window:_read] decode to the tail already in text
        self._read = 0
        self._entries: list[Any] = []

    def add(self, token: int, entry: Any = None) -> None:
        if self.stopped:
            return
        if entry is not None:
            entry.offset = self.start + len(self.text)
            self._entries.append(entry)
        self.ids.append(int(token))
        if not self.codec.is_special(token):
            self._decode_new()

    def extend(self, tokens: Sequence[int]) -> None:
        """:meth:`add` of several tokens without records: one decode for all of them, the
        same text (one at a time where they end inside a character, so the complete ones
        before it are not held back); a stop string found still cuts the text, but which
        token completed it is not told."""
        if self.stopped or not len(tokens):
            return
        n = len(self.ids)
        self.ids.extend(int(t) for t in tokens)
        if not self._decode_new():
            new = self.ids[n:]
            del self.ids[n:]
            for t in new:
                self.add(t)

    def _decode_new(self) -> bool:
        """Move the text on over the ids added since the last complete character (False:
        they end inside one, or add nothing)."""
        before = self.codec.decode(self.ids[self._window:self._read])
        after = self.codec.decode(self.ids[self._window:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return False
        checked = len(self.text)
        self.text += after[len(before):]
        self._window, self._read = self._read, len(self.ids)
        self._find_stop(checked)
        return True

    def _find_stop(self, checked: int) -> None:
        cut = self.matcher.find(self.text, checked) if self.matcher else None
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

    def release(self, final: bool = False) -> str:
        end = len(self.text)
        if not (final or self.stopped):
            end -= self.matcher.held(self.text)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def pop_entries(self, final: bool = False) -> list[Any]:
        if final:
            out, self._entries = self._entries, []
            return out
        n = 0
        while n < len(self._entries) and self._entries[n].offset - self.start < self.sent:
            n += 1
        out, self._entries = self._entries[:n], self._entries[n:]
        return out


class StopStrings:
    """Stop strings over ``rows`` continuations for ``generate``'s host loop: one
    :class:`TextStream` per row."""

    def __init__(self, tokenizer, stops: Sequence[str], rows: int):
        codec = HFCodec(tokenizer)
        self.streams = [TextStream(codec, stops) for _ in range(rows)]

    def push(self, row: int, token: int) -> bool:
        """Add ``token`` to ``row``; True when a stop string now occurs in its text."""
        s = self.streams[row]
        s.add(token)
        return s.stopped
