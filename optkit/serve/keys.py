"""API keys: the key file and the constant-time check of ``Authorization: Bearer KEY``.

Key file format, one key a line::

    # comment: only on a line whose first non-blank character is '#'
    sk-team-a 3        KEY WEIGHT (the weight is the key's share of admissions while
    sk-hash#secretpart requests wait; 1 when left out, any positive number)

A key is the whole first field, up to the first whitespace: ``#`` inside it is part of the
key.  Errors name the file, the line number and what is wrong, never the key's text.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping
from pathlib import Path


def read_api_keys(path) -> dict[str, float]:
    """``{key: weight}`` from a key file (format: see the module docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    keys: dict[str, float] = {}
    first_line: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise ValueError(f"{path}:{n}: expected 'KEY [WEIGHT]', found {len(fields)} fields "
                             f"(a key has no whitespace; comments go on their own line)")
        weight = 1.0
        if len(fields) == 2:
            try:
                weight = float(fields[1])
            except ValueError:
                raise ValueError(f"{path}:{n}: the weight is not a number") from None
            if not (weight > 0 and math.isfinite(weight)):
                raise ValueError(f"{path}:{n}: the weight must be a positive finite number")
        key = fields[0]
        if key in keys:
            raise ValueError(f"{path}:{n}: the key repeats the key of line {first_line[key]}")
        keys[key], first_line[key] = weight, n
    if not keys:
        raise ValueError(f"{path}: no API keys")
    return keys


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyChecker:
    """Finds the key a request presents among ``keys`` in time that does not depend on which
    key (if any) matches or on how much of it does: every key's SHA-256 digest is compared
    with :func:`hmac.compare_digest`, with no early exit."""

    def __init__(self, keys: Mapping[str, float]):
        if not keys:
            raise ValueError("no API keys")
        self._digests = [(_digest(k.encode()), k) for k in keys]

    def match(self, presented: bytes) -> str | None:
        """The key equal to ``presented`` (None: no key matches)."""
        d = _digest(presented)
        found = None
        for digest, key in self._digests:
            if hmac.compare_digest(digest, d):
                found = key
        return found

    def check_header(self, authorization: bytes | None) -> str | None:
        """The key of an ``Authorization: Bearer KEY`` header value (None: absent or wrong)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        return self.match(token.strip())
