"""PipelineExecutor implements the whole executor interface: select, insert, decode_loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from optkit.parallel import Plan, build_executor
from optkit.parallel.executor import cache_len
from optkit.weights.folder import FolderStore
from optkit.weights.random import write_random_folder
from tests.conftest import CONFIGS, left_padded_batch

CFG = CONFIGS["pre_ln"]


@pytest.fixture(scope="module")
def executors(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "opt-p-np"
    write_random_folder(path, CFG, seed=4, dtype=np.float32, progress=False)
    store = FolderStore(path)
    ref = build_executor(CFG, Plan(), store, progress=False)
    pipe = build_executor(CFG, Plan(tp=2, pp=2, micro_batches=2), store, progress=False)
    return ref, pipe


def _count_step(logits, state):
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tok, state + 1, (tok, jnp.max(logits, axis=-1))


def run_session(ex):
    """Prefill 4 rows, keep 3 (beam-style reorder), insert a new request into a slot, and
    decode with a stateful step function: everything generation and serving call."""
    ids, mask = left_padded_batch(CFG, [5, 3, 4, 2], seed=8)
    cache = ex.init_cache(4, 14)
    logits, cache = ex.prefill(ids, mask, cache)
    rows = [2, 0, 0]
    cache = ex.select(cache, rows)
    assert cache_len(cache) == 14
    tok = np.asarray(jnp.argmax(logits, -1))[rows].astype(np.int32)
    l1, cache = ex.decode(tok, cache)
    new_ids, new_mask = left_padded_batch(CFG, [3], seed=9)
    prefix = ex.init_cache(1, 6)
    lp, prefix = ex.prefill(new_ids, new_mask, prefix)
    cache = ex.insert(cache, prefix, 1)
    tok = np.asarray(jnp.argmax(l1, -1)).astype(np.int32)
    tok[1] = int(jnp.argmax(lp[0]))
    tok, cache, state, (toks, top) = ex.decode_loop(_count_step, tok, cache, jnp.int32(0), 4,
                                                    live=12)
    return [np.asarray(x) for x in (logits, l1, lp, tok, state, toks, top)]


def test_pipeline_session_matches_single_device(executors):
    ref, pipe = executors
    assert pipe.rows(3) == [(0, 2), (2, 3)]  # uneven micro-batches after select
    for a, b in zip(run_session(ref), run_session(pipe), strict=True):
        assert a.shape == b.shape
        if np.issubdtype(a.dtype, np.floating):
            assert np.abs(a - b).max() <= 1e-4
        else:
            np.testing.assert_array_equal(a, b)


def test_pipeline_cache_errors(executors):
    _, pipe = executors
    cache = pipe.init_cache(2, 8)
    assert [len(s) for s in cache["stages"]] == [2, 2]
    ids, mask = left_padded_batch(CFG, [3, 2, 2])
    with pytest.raises(ValueError, match="prefill of 3 rows into a cache made for 2"):
        pipe.prefill(ids, mask, cache)
    with pytest.raises(ValueError, match="slot 5 outside a cache of 2 rows"):
        pipe.insert(cache, pipe.init_cache(1, 4), 5)
