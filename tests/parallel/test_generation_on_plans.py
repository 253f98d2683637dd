"""Generation and serving run unchanged on a pipeline x tensor plan."""

import numpy as np
import pytest

from optkit import get_model
from optkit.parallel import PipelineExecutor, Plan
from optkit.serve import ModelEngine, SamplingParams
from optkit.serve.engine import EngineRequest
from optkit.weights.random import write_random_folder
from tests.conftest import CONFIGS, left_padded_batch

CFG = CONFIGS["pre_ln"]
PLAN = Plan(tp=2, pp=2, micro_batches=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    write_random_folder(root / "opt-g-np", CFG, seed=6, dtype=np.float32, progress=False)
    ref = get_model("jax/opt-g", path=root, progress=False)
    pipe = get_model("alpa/opt-g", path=root, plan=PLAN, progress=False)
    assert isinstance(pipe.executor, PipelineExecutor)
    return ref, pipe


def test_sampling_beams_and_return_sequences(models):
    ref, pipe = models
    ids, mask = left_padded_batch(CFG, [6, 3, 5], seed=2)
    for kw in ({"do_sample": True, "seed": 3, "temperature": 0.8, "top_k": 20,
                "num_return_sequences": 2},
               {"num_beams": 3, "num_return_sequences": 2}):
        a = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, **kw)
        b = pipe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, **kw)
        np.testing.assert_array_equal(a, b)


def test_serving_engine_slots(models):
    """The server's prefill / insert / generate contract on both executors."""
    out = []
    for m in models:
        engine = ModelEngine(m.executor, max_slots=3, max_len=32)
        for slot, (prompt, temp) in enumerate([((2, 10, 11, 12), 0.0), ((2, 40), 0.9)]):
            req = EngineRequest(prompt, max_tokens=8,
                                sampling=SamplingParams(temperature=temp, seed=5))
            engine.insert(engine.prefill(req), 2 * slot)  # slots 0 and 2: both micro-batches
        out.append(np.concatenate([engine.generate(3).ids, engine.generate(2).ids]))
    np.testing.assert_array_equal(out[0][:, [0, 2]], out[1][:, [0, 2]])
