"""The block manager alone: reference counts, prefix sharing, LRU eviction, no leaks."""

import random

import pytest

from optkit.serve.blocks import NULL_BLOCK, BlockManager, block_keys


def test_allocate_grow_free_and_the_reserved_block():
    m = BlockManager(num_blocks=5, block_size=4)
    assert (m.usable, m.num_free) == (4, 4)
    assert m.allocate(0, list(range(6))) == 0  # nothing cached yet
    assert len(m.tables[0]) == 2 and NULL_BLOCK not in m.tables[0]
    assert m.grow(0, 12) and len(m.tables[0]) == 3
    assert not m.grow(0, 24)  # 6 blocks: more than there are; nothing taken
    assert len(m.tables[0]) == 3 and m.num_free == 1
    assert not m.can_allocate(list(range(100, 109)))
    with pytest.raises(MemoryError):
        m.allocate(1, list(range(100, 109)))
    m.free(0)
    assert m.num_free == 4 and not m.tables
    m.check()
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(1, 4)


def test_prefix_blocks_are_shared_and_reference_counted():
    m = BlockManager(num_blocks=9, block_size=4)
    prompt = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # two full blocks, then 2 tokens
    m.allocate(0, prompt)
    m.commit(0, prompt, written=len(prompt))
    assert m.allocate(1, prompt + [11]) == 8  # both full blocks come from the cache
    assert m.tables[1][:2] == m.tables[0][:2] and m.tables[1][2] != m.tables[0][2]
    assert [m.refs[b] for b in m.tables[0][:2]] == [2, 2]
    # a prompt that is exactly its cached blocks still computes its last token
    assert m.allocate(2, prompt[:8]) == 4
    # a different second block shares only the first
    assert m.allocate(3, prompt[:4] + [0, 0, 0, 0, 1]) == 4
    assert (m.queries, m.hits) == (10 + 11 + 8 + 9, 8 + 4 + 4)
    for s in (0, 1, 2, 3):
        m.free(s)
    m.check()
    assert m.num_free == 8  # cached blocks count as free ...
    assert m.allocate(4, prompt) == 8  # ... and are still found after their holders left
    m.free(4)
    off = BlockManager(num_blocks=9, block_size=4, prefix_caching=False)
    off.allocate(0, prompt)
    off.commit(0, prompt, len(prompt))
    off.free(0)
    assert off.allocate(1, prompt) == 0 and off.queries == 0


def test_least_recently_used_cached_blocks_are_evicted_first():
    m = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    a, b = [1, 2, 3], [5, 6, 7]
    for seq, p in enumerate((a, b)):
        m.allocate(seq, p)
        m.commit(seq, p, len(p))
        m.free(seq)
    m.allocate(2, a)  # touches a's block: b's becomes the least recently used
    m.free(2)
    assert m.cached_prefix(a) and m.cached_prefix(b)
    m.allocate(3, [9] * 5)  # 3 blocks: the two free ones, then b's (least recently used)
    assert m.cached_prefix(a) and m.cached_prefix(b) == []
    m.allocate(4, [8] * 2)  # 1 more: a's goes too
    assert m.cached_prefix(a) == []
    m.check()


def test_pending_prefix_waits_for_the_sequence_computing_it():
    m = BlockManager(num_blocks=9, block_size=4)
    prompt = list(range(1, 11))
    m.allocate(0, prompt)
    assert m.pending(prompt) and not m.pending([5] * 10)
    m.commit(0, prompt, 8)
    assert not m.pending(prompt) and len(m.cached_prefix(prompt)) == 2


def test_keys_name_the_whole_prefix():
    assert block_keys([1, 2, 3, 4, 5], 2)[1] != block_keys([9, 9, 3, 4], 2)[1]
    assert block_keys([1, 2, 3, 4], 2) == block_keys([1, 2, 3, 4, 5], 2)


def test_thousands_of_random_operations_leak_nothing():
    rng = random.Random(0)
    m = BlockManager(num_blocks=40, block_size=4)
    vocab = [1, 2, 3]  # few tokens: prompts share prefixes often
    live: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(5000):
        op = rng.random()
        if op < 0.4 and len(live) < 12:
            prompt = [rng.choice(vocab) for _ in range(rng.randint(1, 20))]
            if m.can_allocate(prompt):
                done = m.allocate(next_id, prompt)
                assert done % 4 == 0 and done < len(prompt)
                live[next_id] = prompt
                next_id += 1
        elif op < 0.8 and live:  # a sequence writes and grows by a token or a chunk
            seq = rng.choice(list(live))
            tokens = live[seq]
            if m.grow(seq, len(tokens) + 1):
                m.commit(seq, tokens, len(tokens))
                tokens.append(rng.choice(vocab))
        elif live:  # finishes, is cancelled or preempted
            seq = rng.choice(list(live))
            m.free(seq)
            del live[seq]
        if rng.random() < 0.05:
            m.check()
    for seq in list(live):
        m.free(seq)
    m.check()
    assert m.num_free == m.usable and all(r == 0 for r in m.refs)
    assert m.hits > 0
