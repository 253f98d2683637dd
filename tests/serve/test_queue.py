"""Weighted fair queue of waiting requests."""

import pytest

from optkit.serve.queue import FairQueue


def test_fifo_without_keys():
    q = FairQueue()
    for i in range(5):
        q.push(i)
    assert q.peek() == 0 and len(q) == 5
    assert [q.pop() for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(IndexError):
        q.pop()


def test_weights_share_admissions():
    q = FairQueue({"a": 3, "b": 1})
    for i in range(12):
        q.push(("a", i), "a")
        q.push(("b", i), "b")
    first = [q.pop() for _ in range(8)]
    assert sum(k == "a" for k, _ in first) == 6
    # each key stays FIFO
    assert [i for k, i in first if k == "a"] == list(range(6))


def test_idle_key_cannot_bank_credit_and_remove():
    q = FairQueue({"a": 1, "b": 1})
    for i in range(6):
        q.push(("a", i), "a")
    for _ in range(4):
        q.pop()
    q.push(("b", 0), "b")
    q.push(("b", 1), "b")
    order = [q.pop()[0] for _ in range(4)]
    assert order.count("b") == 2 and order[:2].count("b") == 1  # alternates, no burst of b
    q.push("x", "a")
    assert q.remove("x") and not q.remove("x") and len(q) == 0


def test_rejects_bad_weights():
    with pytest.raises(ValueError):
        FairQueue({"a": 0})
