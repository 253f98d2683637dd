"""Synchronous dispatch, for processes whose cross-process collectives can starve each other.

XLA:CPU runs a process's executions and its compilations on one pool of threads.  Under
``jax.distributed`` with gloo collectives, an execution waiting in a collective for another
process holds a thread; with several such executions in flight (JAX dispatches
asynchronously) a process can end up compiling its next function, waiting for a thread,
while the other process waits for that process's next collective: both hang for good (how
the stacks of a two-process pipeline test that hung on two busy CPU cores read; the hang was
not reproduced on demand).  In such processes :func:`settle` blocks
on every executor result, so at most one execution is in flight, in program order, which is
the same on every process.  GPUs (NCCL, stream-ordered) keep dispatching asynchronously.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

_synchronous = False


def set_synchronous(on: bool) -> None:
    """Block on every executor result from now on (``on``) or not; the distributed worker
    turns it on for multi-process CPU clusters."""
    global _synchronous
    _synchronous = bool(on)


def synchronous() -> bool:
    return _synchronous


def settle(x):
    """``x``, its arrays finished first where dispatch is synchronous."""
    return jax.block_until_ready(x) if _synchronous else x


def settled(fn: Callable) -> Callable:
    """``fn`` whose results are settled (itself where dispatch is asynchronous)."""
    if not _synchronous:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return settle(fn(*args, **kwargs))

    return call
