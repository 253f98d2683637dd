"""Plans spanning two JAX processes (two stand-in hosts) give one process's tokens; the
generation features and the serving stack run unchanged on the Ray backend."""

import gc

import httpx
import numpy as np
import pytest

from optkit import get_model
from optkit.distributed import CacheHandle, RemoteOPT
from optkit.parallel import Plan
from optkit.serve import (
    BackgroundServer,
    serve_app,
)
from tests.distributed.conftest import MASK, PROMPTS
from tests.serve.conftest import scheduler_outputs

pytestmark = pytest.mark.xdist_group("ray")

#: 2 processes x 2 CPU devices, in global order [p0, p0, p1, p1]
PLANS = {
    "tensor-over-processes": Plan(tp=4),                  # one tensor group over both hosts
    "stage-per-process": Plan(tp=2, pp=2, micro_batches=2),  # stage s on host s, tp inside
    "data-x-stages": Plan(dp=2, pp=2, micro_batches=2),
}


@pytest.fixture(scope="module")
def pipeline(cluster, weights):
    return get_model("alpa/opt-tiny", path=weights, plan=PLANS["stage-per-process"],
                     cluster=cluster)


@pytest.mark.parametrize("name", list(PLANS))
def test_plans_over_two_processes_match_one_device(cluster, weights, reference, name,
                                                   pipeline):
    plan = PLANS[name]
    model = pipeline if name == "stage-per-process" else \
        get_model("alpa/opt-tiny", path=weights, plan=plan, cluster=cluster)
    assert isinstance(model, RemoteOPT) and model.plan == plan
    assert [d["local_devices"] for d in cluster.devices] == [2, 2]
    assert plan.num_devices == cluster.num_devices == 4  # both processes hold part of it
    want = reference.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=10)
    got = model.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(model(PROMPTS, attention_mask=MASK).logits,
                               reference(PROMPTS, attention_mask=MASK).logits, atol=2e-4)
    if model is not pipeline:
        model.close()


def test_sampling_beams_and_cache_handles(pipeline, reference):
    """PRNG keys and beam reordering (``select``) cross the driver/worker boundary; dropped
    caches are freed on the workers and a donated cache cannot be reused."""
    for kw in ({"do_sample": True, "seed": 3, "temperature": 0.8, "top_k": 20,
                "num_return_sequences": 2, "steps_per_dispatch": 3},
               {"num_beams": 3, "num_return_sequences": 2}):
        a = reference.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=6, **kw)
        b = pipeline.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=6, **kw)
        np.testing.assert_array_equal(a, b)
    ex = pipeline.executor
    gc.collect()
    assert ex.live_caches() == 0
    cache = ex.init_cache(2, 16)
    assert isinstance(cache, CacheHandle) and cache.nbytes > 0
    _, new = ex.prefill(PROMPTS, MASK, cache)
    with pytest.raises(ValueError, match="donated"):
        ex.prefill(PROMPTS, MASK, cache)
    assert ex.live_caches() == 1
    del new
    assert ex.live_caches() == 0


def test_serving_runs_on_the_ray_backend(pipeline, reference):
    ids, lps = scheduler_outputs(pipeline.executor, slots=4, max_len=64, new_tokens=6)
    want_ids, want_lps = scheduler_outputs(reference.executor, slots=4, max_len=64,
                                           new_tokens=6)
    assert ids == want_ids
    np.testing.assert_allclose(lps, want_lps, atol=1e-3)
    # and the HTTP stack on top
    body = {"model": "alpa/opt-tiny", "prompt": "Paris is the capital city of",
            "max_tokens": 8, "temperature": 0}
    texts = []
    for m in (pipeline, reference):
        app = serve_app(m, name="alpa/opt-tiny", max_num_seqs=2, max_len=64, warmup=False)
        with BackgroundServer(app) as srv:
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[0]


def test_int8_over_two_processes(cluster, weights):
    """quantize="int8" quantizes each process's slices as they load."""
    model = get_model("alpa/opt-tiny", path=weights, plan=Plan(tp=4), cluster=cluster,
                      quantize="int8")
    local = get_model("jax/opt-tiny", path=weights, quantize="int8", progress=False)
    np.testing.assert_array_equal(
        model.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=8),
        local.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=8))
    model.close()
