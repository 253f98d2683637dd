"""KV-cache blocks on the host: allocation, reference counts and the prefix cache (no JAX).

The device holds one pool of ``num_blocks`` blocks of ``block_size`` token positions per
layer; a sequence's *block table* lists the blocks holding its tokens in order.  Block 0 is
never handed out: padding rows and tokens of a step write there and nobody reads it.

Prefix caching: a *full* block written by a sequence is registered under the key
``hash((parent key, its token ids))``, so a key names the whole prefix up to the block's
end.  A sequence starting with the same tokens takes those blocks instead of computing them
(reference counts say how many sequences hold a block).  A registered block whose last
holder finished stays cached, in least-recently-used order, until its memory is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

#: The block nobody owns (padding writes land there).
NULL_BLOCK = 0


def block_keys(tokens: Sequence[int], block_size: int) -> list[int]:
    """Prefix-cache keys of the full blocks of ``tokens``."""
    keys, parent = [], None
    for i in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[i:i + block_size])))
        keys.append(parent)
    return keys


class BlockManager:
    """Blocks of the pool, per-sequence block tables and the prefix cache.

    ``allocate(seq, tokens)`` gives a sequence blocks for its known tokens (reusing cached
    prefix blocks: returns how many leading tokens are already computed), ``grow`` adds
    blocks as it gets longer, ``commit`` registers its full blocks once written, ``free``
    drops it.  Allocation evicts least-recently-used cached blocks when no block is free.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need at least 2 blocks (one is reserved) of at least 1 "
                             f"token; got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self.prefix_caching = prefix_caching
        self.refs = [0] * self.num_blocks
        self._free = list(range(self.num_blocks - 1, 0, -1))  # pop() gives low ids first
        self._cached: OrderedDict[int, int] = OrderedDict()   # key -> block, ref 0, LRU first
        self._by_key: dict[int, int] = {}                     # key -> block (any ref count)
        self._key_of: dict[int, int] = {}                     # block -> key
        self.tables: dict[int, list[int]] = {}
        self._keys: dict[int, list[int]] = {}                 # seq -> keys of its full blocks
        self._planned: dict[int, list[int]] = {}              # seq -> keys it will write
        self.notes: dict[int, Any] = {}                       # cached block -> caller's note
        self.queries = 0   # prompt tokens looked up in the prefix cache
        self.hits = 0      # ... found there

    # Capacity ----------------------------------------------------------------------------
    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks available to allocate (free or cached but unreferenced)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.usable - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-int(tokens) // self.block_size)

    # Prefix cache --------------------------------------------------------------------------
    def cached_prefix(self, tokens: Sequence[int], need: Callable | None = None) -> list[int]:
        """Blocks of the longest cached prefix of ``tokens`` (full blocks only; at least one
        token is always left to compute, whose logits the next token needs).  ``need(i,
        note)``: a block is taken only if its note (see :meth:`annotate`) passes."""
        if not self.prefix_caching:
            return []
        out = []
        for i, key in enumerate(block_keys(tokens[:len(tokens) - 1], self.block_size)):
            b = self._by_key.get(key)
            if b is None or need is not None and not need(i, self.notes.get(b)):
                break
            out.append(b)
        return out

    def annotate(self, seq: int, index: int, note: Any) -> None:
        """Keep ``note`` (e.g. the log-probs of the block's tokens) with ``seq``'s
        ``index``-th block while it stays cached (a registered block only; the first note
        stays)."""
        b = self.tables[seq][index]
        if b in self._key_of:
            self.notes.setdefault(b, note)

    def pending(self, tokens: Sequence[int]) -> bool:
        """Whether a running sequence holds (and is computing) the block after the cached
        prefix of ``tokens``: waiting a step then shares it (``n`` > 1, one prompt)."""
        if not self.prefix_caching:
            return False
        keys = block_keys(tokens[:len(tokens) - 1], self.block_size)
        i = len(self.cached_prefix(tokens))
        return i < len(keys) and any(
            len(ks) > i and ks[i] == keys[i] for ks in self._planned.values())

    # Sequences -----------------------------------------------------------------------------
    def can_allocate(self, tokens: Sequence[int], cache: bool = True, reserve: int = 0,
                     need: Callable | None = None) -> bool:
        """Whether :meth:`allocate` would succeed now and leave ``reserve`` blocks free."""
        hit = self.cached_prefix(tokens, need) if cache else []
        reusable = sum(1 for b in hit if self.refs[b] == 0)  # counted in num_free already
        need = self.blocks_for(len(tokens)) - len(hit)
        return need + reserve <= self.num_free - reusable

    def allocate(self, seq: int, tokens: Sequence[int], cache: bool = True,
                 need: Callable | None = None) -> int:
        """Block table for a new sequence holding ``tokens``; returns the number of leading
        tokens already computed (cached blocks, as far as ``need`` accepts their notes;
        ``cache=False``: none are taken).  Raises MemoryError when blocks run out (check
        :meth:`can_allocate` first)."""
        if seq in self.tables:
            raise ValueError(f"sequence {seq} already holds blocks")
        if not self.can_allocate(tokens, cache, need=need):
            raise MemoryError("not enough free KV-cache blocks")
        hit = self.cached_prefix(tokens, need) if cache else []
        if self.prefix_caching and cache:
            self.queries += len(tokens)
            self.hits += len(hit) * self.block_size
        for b in hit:
            self._ref(b)
        self.tables[seq] = list(hit)
        self._keys[seq] = block_keys(tokens[:len(hit) * self.block_size], self.block_size)
        self._planned[seq] = block_keys(tokens, self.block_size)
        self.grow(seq, len(tokens))
        return len(hit) * self.block_size

    def grow(self, seq: int, tokens: int) -> bool:
        """Make ``seq`` hold blocks for ``tokens`` positions; False (and nothing taken) if
        there are not enough."""
        table = self.tables[seq]
        need = self.blocks_for(tokens) - len(table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            table.append(self._take())
        return True

    def commit(self, seq: int, tokens: Sequence[int], written: int) -> None:
        """``tokens[:written]`` of ``seq`` are in its blocks: register its new full blocks."""
        if not self.prefix_caching:
            return
        keys, table = self._keys[seq], self.tables[seq]
        full = min(written // self.block_size, len(table))
        if full <= len(keys):
            return
        parent = keys[-1] if keys else None
        bs = self.block_size
        for i in range(len(keys), full):
            parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            keys.append(parent)
            b = table[i]
            if parent not in self._by_key and b not in self._key_of:
                self._by_key[parent] = b
                self._key_of[b] = parent

    def free(self, seq: int) -> None:
        """Drop ``seq``'s blocks (cached ones stay cached while unreferenced)."""
        table = self.tables.pop(seq, None)
        self._keys.pop(seq, None)
        self._planned.pop(seq, None)
        for b in reversed(table or ()):  # a prefix's tail is evicted before its head
            self.refs[b] -= 1
            if self.refs[b]:
                continue
            key = self._key_of.get(b)
            if key is None:
                self._free.append(b)
            else:
                self._cached[key] = b

    # Blocks --------------------------------------------------------------------------------
    def _ref(self, b: int) -> None:
        if self.refs[b] == 0:
            self._cached.pop(self._key_of[b], None)
        self.refs[b] += 1

    def _take(self) -> int:
        if self._free:
            b = self._free.pop()
        else:  # evict the least recently used cached block
            key, b = self._cached.popitem(last=False)
            del self._by_key[key], self._key_of[b]
            self.notes.pop(b, None)
        self.refs[b] = 1
        return b

    def check(self) -> None:
        """Assert the bookkeeping is consistent (tests)."""
        held: dict[int, int] = {}
        for table in self.tables.values():
            for b in table:
                held[b] = held.get(b, 0) + 1
        for b in range(1, self.num_blocks):
            assert self.refs[b] == held.get(b, 0), (b, self.refs[b], held.get(b, 0))
        free, cached = set(self._free), set(self._cached.values())
        assert not free & cached and NULL_BLOCK not in free | cached
        assert free | cached == {b for b in range(1, self.num_blocks) if not self.refs[b]}
        assert len(free) == len(self._free)
        for key, b in self._by_key.items():
            assert self._key_of[b] == key
        assert set(self.notes) <= set(self._key_of)
        assert all(self._by_key[k] == b for k, b in self._cached.items())


__all__ = ["NULL_BLOCK", "BlockManager", "block_keys"]
