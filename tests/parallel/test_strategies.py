"""Every strategy on 8 fake CPU devices gives the single-device logits and greedy tokens."""

import jax
import numpy as np
import pytest

from optkit import get_model
from optkit.config import OPTConfig
from optkit.options import ModelOptions
from optkit.parallel import MeshExecutor, PipelineExecutor, Plan, PlanError, build_executor
from optkit.parallel.executor import (
    GPU_DECODE_OPTIONS,
    GPU_LARGE_BATCH_OPTIONS,
    GPU_MULTI_DECODE_OPTIONS,
    LARGE_BATCH_ROWS,
    decode_graph_options,
)
from optkit.weights.random import write_random_folder
from tests.conftest import CONFIGS, left_padded_batch

F32 = ModelOptions(dtype="float32")

#: 8 heads (tp up to 8), 5 layers (no even split over 2 or 4 stages).
WIDE = OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=5, num_attention_heads=8,
                 ffn_dim=128, max_position_embeddings=64, name="t-wide")
#: 5 heads, 3 layers: tensor parallelism must refuse (pipelines would split 2 + 1).
ODD = CONFIGS["odd_heads"]
#: Post-LN with embedding projections (opt-350m style) and a vocabulary of 1001 rows that
#: tp=2 cannot split (the embedding / LM head stay replicated).
PROJ = CONFIGS["post_ln_proj"].replace(vocab_size=1001, name="t-proj-odd-vocab")
ALL = (WIDE, PROJ)

STRATEGIES = [
    Plan(dp=4), Plan(tp=2), Plan(tp=4), Plan(tp=8), Plan(pp=2, micro_batches=2),
    Plan(pp=4, micro_batches=4), Plan(dp=2, tp=4), Plan(tp=4, pp=2, micro_batches=2),
    Plan(dp=2, tp=2, pp=2, micro_batches=2, stages=(4, 1)),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    for cfg in ALL + (ODD,):
        write_random_folder(root / f"opt-{cfg.name}-np", cfg, seed=3, dtype=np.float32,
                            progress=False)
    return root


@pytest.fixture(scope="module")
def reference(folders):
    """Single-device logits and greedy tokens per config."""
    out = {}
    for cfg in ALL:
        m = get_model(f"jax/opt-{cfg.name}", path=folders, progress=False)
        ids, mask = left_padded_batch(cfg, [7, 3, 5, 6], seed=1)
        out[cfg.name] = (ids, mask, np.asarray(m(ids, attention_mask=mask).logits),
                         m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9))
    return out


def check_plan(cfg, plan, folders, reference):
    ids, mask, logits, tokens = reference[cfg.name]
    m = get_model(f"alpa/opt-{cfg.name}", path=folders, plan=plan, progress=False)
    assert m.plan == plan
    kind = PipelineExecutor if plan.pp > 1 else MeshExecutor
    assert isinstance(m.executor, kind)
    assert m.executor.mesh.devices.size == plan.num_devices
    got = np.asarray(m(ids, attention_mask=mask).logits)
    assert got.shape == logits.shape
    assert np.abs(got - logits)[mask == 1].max() <= 1e-4
    np.testing.assert_array_equal(
        m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9), tokens)
    return m


@pytest.mark.parametrize("plan", STRATEGIES, ids=lambda p: p.name)
def test_strategy_matches_single_device(plan, folders, reference):
    m = check_plan(WIDE, plan, folders, reference)
    ex = m.executor
    if plan.tp > 1:  # the weights really are split: each device holds 1/tp of the MLP
        fc1 = (ex.params if plan.pp == 1 else ex.params[0])["layers"][0]["fc1"]["kernel"]
        assert fc1.addressable_shards[0].data.shape == (WIDE.hidden_size, WIDE.ffn_dim // plan.tp)
    if plan.pp > 1:
        sizes = plan.stages or {2: (3, 2), 4: (1, 2, 1, 1)}[plan.pp]
        assert [len(p["layers"]) for p in ex.params] == list(sizes)
        # each stage's weights live on its own sub-mesh only; the last holds the tied LM head
        ids = [{d.id for d in mesh.devices.flat} for mesh in ex.meshes]
        assert sum(map(len, ids)) == len(set().union(*ids)) == plan.num_devices
        assert {d.id for d in ex.params[-1]["layers"][0]["fc1"]["kernel"].devices()} == ids[-1]
        assert {d.id for d in ex.params[-1]["embed_tokens"].devices()} == ids[-1]
        assert "embed_positions" not in ex.params[-1] and "final_ln" not in ex.params[0]


def test_projections_post_ln_and_unsplittable_vocab(folders, reference):
    plan = Plan(tp=2, pp=2, micro_batches=2)
    assert any("vocab 1001 is not a multiple of tp=2" in n for n in plan.notes(PROJ))
    m = check_plan(PROJ, plan, folders, reference)
    params = m.executor.params
    assert params[0]["embed_tokens"].sharding.is_fully_replicated
    assert "project_in" in params[0] and "project_out" in params[1]
    assert not params[0]["layers"][0]["fc1"]["kernel"].sharding.is_fully_replicated


def test_refusals_are_clear(folders):
    with pytest.raises(PlanError, match=r"tp=2 does not divide the 5 attention heads of t-odd: "
                                        r"tensor parallelism splits whole heads; "
                                        r"use tp in \[1, 5\]"):
        get_model(f"alpa/opt-{ODD.name}", path=folders, plan=Plan(tp=2), progress=False)
    with pytest.raises(PlanError, match=r"pp=4 stages need at least one layer each, but t-odd "
                                        r"has 3 layers"):
        get_model(f"alpa/opt-{ODD.name}", path=folders, plan=Plan(pp=4), progress=False)
    with pytest.raises(PlanError, match="needs 16 devices; only 8 given"):
        get_model(f"alpa/opt-{WIDE.name}", path=folders, plan=Plan(tp=8, pp=2),
                  progress=False)
    with pytest.raises(PlanError, match="micro_batches > 1 only applies to pipeline"):
        Plan(tp=2, micro_batches=2)
    with pytest.raises(PlanError, match="stages=.* hold 4 layers; t-wide has 5"):
        Plan(pp=2, stages=(2, 2)).validate(WIDE)
    with pytest.raises(PlanError, match="pp=2 needs the rule layers -> stage"):
        Plan(pp=2, rules={"heads": "tensor"})
    with pytest.raises(PlanError, match="unknown logical axis 'head'"):
        Plan(tp=2, rules={"head": "tensor"})


def test_plan_is_a_readable_table():
    plan = Plan(dp=2, tp=2, pp=2, micro_batches=2, dtype="bf16")
    assert Plan.parse("dp=2,tp=2,pp=2,mb=2").replace(dtype="bfloat16") == plan
    assert plan.name == "dp2-tp2-pp2-mb2" and plan.num_devices == 8
    text = plan.describe(WIDE, jax.devices(), batch=4, seq_len=32)
    lines = text.splitlines()
    assert lines[0] == lines[-1] and set(lines[0]) == {"-"}
    assert "rules          batch->data  heads,mlp,vocab->tensor  layers->stage" in text
    assert "stage 0        layers 0-2 (3 + embed), devices 0-3" in text
    assert "stage 1        layers 3-4 (2 + lm-head), devices 4-7" in text
    assert "dtype          bfloat16" in str(plan)


def test_devices_are_taken_in_order_from_a_list():
    devs = jax.devices()[::-1]
    plan = Plan(tp=2, pp=2)
    grid = plan.device_grid(devs)
    assert grid.shape == (2, 1, 2)
    assert [d.id for d in grid.reshape(-1)] == [d.id for d in devs[:4]]


def test_decode_graph_options_follow_the_collectives():
    """One device (or data parallelism alone): CUDA graphs around the decode loop's WHILE
    too; weights split over devices: collectives in the graphs through NCCL and no
    WHILE/CONDITIONAL graphs.  XLA accepts both sets (the CPU backend compiles with them)
    and the two-device decode gives the one-device tokens."""
    cfg = OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    ffn_dim=64, max_position_embeddings=64, name="t-graphs")
    tokens = {}
    for tp, want in ((1, GPU_DECODE_OPTIONS), (2, GPU_MULTI_DECODE_OPTIONS)):
        ex = build_executor(cfg, Plan(tp=tp), None, options=F32, progress=False)
        assert ex.decode_options == {}  # off GPUs
        ex = MeshExecutor(cfg, ex.params, ex.mesh, ex.rules, command_buffers=True)
        assert ex.decode_options == want
        ids = np.array([[5, 6, 7, 8]], np.int32)
        cache = ex.init_cache(1, 16)
        logits, cache = ex.prefill(ids, np.ones_like(ids), cache)
        tok = jax.numpy.argmax(logits, -1).astype(np.int32)

        def step(logits, state):
            nxt = jax.numpy.argmax(logits, -1).astype(np.int32)
            return nxt, state, nxt

        *_, outs = ex.decode_loop(step, tok, cache, (), 4)
        tokens[tp] = np.asarray(outs)[:4]
    dp = build_executor(cfg, Plan(dp=2), None, options=F32, progress=False)
    assert not dp.splits_weights and ex.splits_weights
    dp = MeshExecutor(cfg, dp.params, dp.mesh, dp.rules, command_buffers=True)
    assert dp.decode_options == GPU_DECODE_OPTIONS
    assert "COLLECTIVES" in GPU_MULTI_DECODE_OPTIONS["xla_gpu_enable_command_buffer"]
    assert "WHILE" not in GPU_MULTI_DECODE_OPTIONS["xla_gpu_enable_command_buffer"]
    np.testing.assert_array_equal(tokens[1], tokens[2])


def test_large_batch_options_follow_rows_per_device():
    """cuBLASLt products from LARGE_BATCH_ROWS rows a device on, for fp16/bf16 models on
    GPUs only; XLA accepts the options (the CPU backend compiles a decode with them)."""
    cfg = OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    ffn_dim=64, max_position_embeddings=64, name="t-large-batch")
    dp = build_executor(cfg, Plan(dp=2), None, options=F32, progress=False)
    assert dp.decode_options_for(4 * LARGE_BATCH_ROWS) == {}  # off GPUs
    dp.gpu = True
    assert dp.rows_per_device(2 * LARGE_BATCH_ROWS) == LARGE_BATCH_ROWS
    assert dp.decode_options_for(2 * LARGE_BATCH_ROWS) == GPU_LARGE_BATCH_OPTIONS
    assert dp.decode_options_for(LARGE_BATCH_ROWS) == {}  # half a large batch a device
    tp = build_executor(cfg, Plan(tp=2), None, options=F32, progress=False)
    tp.gpu = True
    assert tp.rows_per_device(LARGE_BATCH_ROWS) == LARGE_BATCH_ROWS
    assert GPU_LARGE_BATCH_OPTIONS.items() <= tp.decode_options_for(LARGE_BATCH_ROWS).items()
    q = build_executor(cfg, Plan(), None, options=ModelOptions(dtype="float32", quantize="int8"),
                       progress=False)
    q.gpu = True
    assert q.decode_options_for(4 * LARGE_BATCH_ROWS) == q.decode_options
    ids = np.full((LARGE_BATCH_ROWS, 3), 7, np.int32)
    cache = tp.init_cache(LARGE_BATCH_ROWS, 8)
    _, cache = tp.prefill(ids, np.ones_like(ids), cache)
    logits, _ = tp.decode(ids[:, 0], cache)
    assert logits.shape == (LARGE_BATCH_ROWS, 256)


def test_graph_options_by_collectives():
    assert decode_graph_options(True) == GPU_MULTI_DECODE_OPTIONS
    assert decode_graph_options(False) == GPU_DECODE_OPTIONS
