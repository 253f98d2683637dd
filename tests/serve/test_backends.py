"""The engine drives a sharded SPMD mesh (dp x tp) and the Pallas paged kernel under tp."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from optkit.options import ModelOptions
from optkit.parallel import TENSOR_RULES, Placement
from optkit.parallel.executor import MeshExecutor
from optkit.weights.load import load_params
from optkit.weights.sources import open_weights
from tests.serve.conftest import scheduler_outputs

#: one xdist worker compiles the tiny model for all these modules (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("serve-model")

PROMPTS = [(2, 100, 200, 300), (2, 7), (2, 5000, 6000, 7000, 8000, 9000, 11, 12, 13)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    return scheduler_outputs(tiny_model.executor)


def test_tensor_and_data_parallel_mesh(tiny_model, tiny_weights, reference):
    cfg = tiny_model.config
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    store = open_weights(tiny_weights / "opt-tiny-np")[1]
    params = load_params(store, cfg, dtype=np.float32,
                         sharding_for=Placement(cfg, mesh, TENSOR_RULES).param, progress=False)
    sharded = MeshExecutor(cfg, params, mesh, TENSOR_RULES)
    assert len(params["embed_tokens"].sharding.device_set) == 4
    ids, lps = scheduler_outputs(sharded)
    assert ids == reference[0]
    np.testing.assert_allclose(lps, reference[1], atol=1e-3)


def test_tensor_parallel_paged_kernel_matches_one_device(tiny_model, tiny_weights):
    """Pools split by heads over tp=2, prompt-chunk and decode attention through the
    Pallas kernels per shard (interpreted here): one device's tokens and log-probs."""
    pytest.importorskip("optkit.kernels.paged_attention")
    from optkit.serve.engine import EngineRequest, PagedEngine, Work
    from tests.serve.conftest import ENGINE

    cfg = tiny_model.config
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "tensor"))
    store = open_weights(tiny_weights / "opt-tiny-np")[1]
    params = load_params(store, cfg, dtype=np.float32,
                         sharding_for=Placement(cfg, mesh, TENSOR_RULES).param, progress=False)
    outs = []
    for ex in (tiny_model.executor, MeshExecutor(cfg, params, mesh, TENSOR_RULES,
                                                 options=ModelOptions(kernels="attention"))):
        engine = PagedEngine(ex, **ENGINE)
        req = EngineRequest((2, 5, 6, 7, 8), 8, num_top=2)
        first = engine.step([Work(0, req.prompt, 0, [3, 1, 4], req)]).tokens.ids[0, 0]
        out = engine.step([Work(0, (int(first),), 5, [3, 1, 4], req, count=1)], 3)
        outs.append((out.tokens.ids, out.tokens.logprobs))
    assert engine.pools["k"][0].sharding.spec[0] == "tensor"
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-4)
