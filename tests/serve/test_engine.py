"""PagedEngine on a tiny random OPT: greedy parity with generate, seeded sampling, chunked
prefill against the full forward, preemption and prefix caching that change no token."""

import jax
import numpy as np
import pytest

from optkit.generation import generate
from optkit.options import ModelOptions
from optkit.serve import HFCodec, Limits, PagedEngine, SamplingParams, Scheduler, SeqRequest
from optkit.serve.engine import EngineRequest, Work, bucket_length
from tests.serve.conftest import ENGINE, wait_until

#: one xdist worker compiles the tiny model for all these modules (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("serve-model")


@pytest.fixture(scope="module")
def codec():
    from optkit import get_tokenizer

    return HFCodec(get_tokenizer())


@pytest.fixture
def scheduler(tiny_model, codec):
    s = Scheduler(PagedEngine(tiny_model.executor, **ENGINE), codec,
                  Limits(max_queue=64)).start()
    yield s
    s.stop()


def run(s, requests):
    hs = s.submit(requests)
    wait_until(lambda: all(h.done for h in hs))
    return [h.stream.ids for h in hs]


def test_bucket_length():
    assert [bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 100]
    assert bucket_length(40, 50) == 50 and bucket_length(60, 50) == 60


def test_batched_greedy_equals_generate_alone(tiny_model, codec, scheduler):
    prompts = ["Paris is the capital city of", "Hello", "def f(x):\n    return",
               "The best way to serve a language model is"]
    reqs = [SeqRequest(tuple(codec.encode(p)), max_tokens=6 + 3 * i, ignore_eos=True)
            for i, p in enumerate(prompts)]
    got = run(scheduler, reqs)
    # reference: optkit's plain greedy loop over the left-padded batch (one compile)
    t = max(len(r.prompt) for r in reqs)
    ids = np.full((len(reqs), t), 1, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(reqs):
        ids[i, t - len(r.prompt):], mask[i, t - len(r.prompt):] = r.prompt, 1
    want = generate(tiny_model.executor, ids, mask, eos_token_id=[],  # never stop on EOS
                    max_new_tokens=max(r.max_tokens for r in reqs))[:, t:]
    for i, (r, row) in enumerate(zip(reqs, got, strict=True)):
        assert row == want[i, :r.max_tokens].tolist()


def test_seeded_sampling_ignores_batch_companions_and_slot(codec, scheduler):
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    target = SeqRequest(tuple(codec.encode("Once upon a time")), 12, sp, ignore_eos=True)
    (alone,) = run(scheduler, [target])
    others = [SeqRequest(tuple(codec.encode(f"noise {i}")), 20,
                         SamplingParams(temperature=0.7, seed=i), ignore_eos=True)
              for i in range(3)]
    crowd = run(scheduler, others + [target] + others)
    assert crowd[3] == alone
    other_seed = run(scheduler, [SeqRequest(target.prompt, 12, SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=99), ignore_eos=True)])[0]
    assert other_seed != alone


def test_same_seed_same_tokens_as_generate(tiny_model, codec, scheduler):
    """A seeded sampled request draws generate()'s tokens for that seed (row = stream),
    whatever else the server batches beside it."""
    prompt = tuple(codec.encode("Once upon a time"))
    n, new = 2, 10
    want = generate(tiny_model.executor, np.array([prompt], np.int32), do_sample=True,
                    temperature=0.9, top_k=40, top_p=0.95, seed=77, num_return_sequences=n,
                    eos_token_id=[], max_new_tokens=new)[:, len(prompt):]
    noise = [SeqRequest(tuple(codec.encode(f"noise {i}")), 15,
                        SamplingParams(temperature=0.7, seed=i), ignore_eos=True)
             for i in range(3)]
    mine = [SeqRequest(prompt, new, SamplingParams(temperature=0.9, top_k=40, top_p=0.95,
                                                   seed=77, stream=j), ignore_eos=True)
            for j in range(n)]
    got = run(scheduler, noise[:2] + mine + noise[2:])[2:2 + n]
    assert got == want.tolist()


def test_top_k_one_is_greedy(codec, scheduler):
    prompt = tuple(codec.encode("Paris is the capital city of"))
    greedy_ids, top1 = run(scheduler, [
        SeqRequest(prompt, 10, ignore_eos=True),
        SeqRequest(prompt, 10, SamplingParams(temperature=1.5, top_k=1, seed=5),
                   ignore_eos=True)])
    assert greedy_ids == top1


def test_chunked_prefill_gives_the_full_forward_logits(tiny_model, codec):
    engine = PagedEngine(tiny_model.executor, **ENGINE)
    ids = codec.encode("The quick brown fox jumps over the lazy dog. " * 4)
    n = len(ids)
    logits = np.asarray(tiny_model(np.array([ids])).logits[0], np.float32)
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    req = EngineRequest(tuple(ids), 1, num_top=5, prompt_logprobs=True)
    blocks = [9, 3, 17, 4, 30]  # any blocks, in any order
    other, other_ids = EngineRequest((2, 7), 2), [2, 7]
    got, start = [], 0
    for step, chunk in enumerate((5, 16, n - 21)):  # beside another sequence's steps
        end = start + chunk
        works = [Work(0, ids[start:end], start, blocks, req, sample=end == n,
                      targets=ids[start + 1:min(end, n - 1) + 1])]
        if step < 2:  # its whole prompt, then one decode
            fed = other_ids if step == 0 else other_ids[-1:]
            works.append(Work(1, fed, len(other_ids) - len(fed), [40], other, count=step))
        out = engine.step(works)
        if step < 2:
            other_ids.append(int(out.tokens.ids[0, 1]))
        got.append(out.scores[0])
        start = end
    want_other = np.asarray(tiny_model(np.array([other_ids[:-1]])).logits[0]).argmax(-1)
    assert other_ids[2:] == want_other[1:].tolist()
    lps = np.concatenate([g[0] for g in got])
    np.testing.assert_allclose(lps, lp[np.arange(n - 1), ids[1:]], atol=1e-4)
    top = np.concatenate([g[1] for g in got])
    np.testing.assert_array_equal(top[:, 0], lp[:-1].argmax(-1))
    assert out.tokens.ids[0, 0] == lp[-1].argmax()
    np.testing.assert_allclose(out.tokens.logprobs[0, 0], lp[-1].max(), atol=1e-4)


def greedy_requests(codec, new=24):
    prompts = ["Paris is the capital city of", "Hello", "def f(x):\n    return",
               "The best way to serve a language model is " * 3]
    return [SeqRequest(tuple(codec.encode(p)), max_tokens=new, ignore_eos=True)
            for p in prompts]


def test_static_shapes_give_the_same_tokens_and_scores(tiny_model, codec):
    """Static shapes (the GPU default: rows padded to max_num_seqs, tables to max_len, chunks
    packed into rows of CHUNK_ROW tokens, a long one over several rows of a step) give the
    bucketed engine's tokens and prompt log-probs."""
    from optkit.serve.engine import CHUNK_ROW

    long = "The best way to serve a language model is to batch " * 8
    assert len(codec.encode(long)) > CHUNK_ROW  # one chunk over several rows
    reqs = greedy_requests(codec, new=10) + [
        SeqRequest(tuple(codec.encode(long)), 6, ignore_eos=True, logprobs=2, echo=True)]
    outs = []
    for static in (False, True):  # 256 tokens a step: a chunk spans several rows
        s = Scheduler(PagedEngine(tiny_model.executor, **{**ENGINE, "max_batched_tokens": 256},
                                  static_shapes=static), codec, Limits(max_queue=64)).start()
        try:
            outs.append(s.submit(reqs))
            wait_until(lambda: all(h.done for h in outs[-1]))
        finally:
            s.stop()
    want, got = outs
    assert [h.stream.ids for h in got] == [h.stream.ids for h in want]
    np.testing.assert_allclose([h.cum_logprob for h in got], [h.cum_logprob for h in want],
                               atol=1e-4)


def test_preemption_changes_no_token(tiny_model, codec, scheduler):
    reqs = greedy_requests(codec)
    want = run(scheduler, reqs)
    # 5 blocks of 16: the sequences (2, 2, 2 and 4 blocks) cannot all fit at once
    small = Scheduler(PagedEngine(tiny_model.executor, **{**ENGINE, "num_blocks": 6}), codec,
                      Limits(max_queue=64), prefix_caching=False).start()
    try:
        assert run(small, reqs) == want
        assert small.stats()["preemptions"] >= 1
        small.blocks.check()
    finally:
        small.stop()


def test_prefix_cache_hits_change_no_token(tiny_model, codec, scheduler):
    prefix = "Answer the question. Q: what is the capital city of France? A:" * 2
    reqs = [SeqRequest(tuple(codec.encode(prefix + end)), 8, ignore_eos=True)
            for end in (" Paris", " Lyon", " Nice")]
    plain = Scheduler(PagedEngine(tiny_model.executor, **ENGINE), codec,
                      Limits(max_queue=64), prefix_caching=False).start()
    try:
        want = [run(plain, [r])[0] for r in reqs]
        assert plain.stats()["prefix_cache_hits"] == 0
    finally:
        plain.stop()
    hits = scheduler.stats()["prefix_cache_hits"]
    got = [run(scheduler, [r])[0] for r in reqs]
    assert got == want
    assert scheduler.stats()["prefix_cache_hits"] - hits >= 2 * 16


def test_repetition_penalty_matches_generate(tiny_model, codec, scheduler):
    prompt = tuple(codec.encode("Hello hello hello"))
    kw = dict(max_new_tokens=12, eos_token_id=[])
    want = generate(tiny_model.executor, np.array([prompt], np.int32),
                    repetition_penalty=1.8, **kw)[0, len(prompt):]
    plain = generate(tiny_model.executor, np.array([prompt], np.int32), **kw)[0, len(prompt):]
    assert want.tolist() != plain.tolist()  # the penalty matters for this prompt
    noise = SeqRequest(tuple(codec.encode("noise")), 9, ignore_eos=True)
    got = run(scheduler, [noise, SeqRequest(prompt, 12, SamplingParams(repetition_penalty=1.8),
                                            ignore_eos=True)])[1]
    assert got == want.tolist()


def test_min_tokens_bans_eos_until_reached():
    from optkit.serve.engine import _process

    logits = np.zeros((3, 6), np.float32)
    logits[:, 2] = 5.0  # EOS (2) is the favourite of every row
    st = {"counts": np.array([0, 3, 4]), "min_tokens": np.array([4, 4, 4])}
    x = np.asarray(_process(logits, st, eos=2, penalty=False))
    assert np.isneginf(x[:2, 2]).all() and x[2, 2] == 5.0
    np.testing.assert_array_equal(np.delete(x, 2, axis=1), 0.0)


def test_pallas_paged_attention_matches_xla(tiny_model):
    """The GPU kernels' path (here through Pallas' interpreter: a prompt chunk, then
    decodes) gives XLA's tokens."""
    pytest.importorskip("optkit.kernels.paged_attention")
    from optkit.parallel.executor import MeshExecutor

    ex = tiny_model.executor
    fused = MeshExecutor(ex.cfg, ex.params, ex.mesh, ex.rules,
                         options=ModelOptions(kernels="attention"))
    assert set(fused.paged_attention(16)) == {"decode_attention", "chunk_attention"}
    assert ex.paged_attention(16) == {}  # XLA's path off GPUs by default
    outs = []
    for executor in (ex, fused):
        engine = PagedEngine(executor, **ENGINE)
        req = EngineRequest((2, 5, 6, 7, 8), 8, num_top=2)
        first = engine.step([Work(0, req.prompt, 0, [3, 1, 4], req)]).tokens.ids[0, 0]
        out = engine.step([Work(0, (int(first),), 5, [3, 1, 4], req, count=1)], 3)
        outs.append((out.tokens.ids, out.tokens.logprobs))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-4)


def test_scored_prompts_reuse_cached_context(tiny_model, codec, scheduler):
    """echo + logprobs after one long context (lm-eval multiple choice): the context's
    blocks and scores are reused, and every log-prob equals a run without the cache."""
    context = "Question: which city is the capital of France? Answer:" * 3
    reqs = [SeqRequest(tuple(codec.encode(context + c)), 0, echo=True, logprobs=1)
            for c in (" Paris", " Lyon", " Marseille")]

    def scores(s):
        out = []
        for r in reqs:
            (h,) = s.submit([r])
            wait_until(lambda h=h: h.done)
            out.append(h.prompt_scores)
        return out

    plain = Scheduler(PagedEngine(tiny_model.executor, **ENGINE), codec,
                      Limits(max_queue=64), prefix_caching=False).start()
    try:
        want = scores(plain)
    finally:
        plain.stop()
    hits = scheduler.stats()["prefix_cache_hits"]
    got = scores(scheduler)
    assert scheduler.stats()["prefix_cache_hits"] - hits >= 2 * 32
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[0], w[0], atol=1e-5)
        np.testing.assert_array_equal(g[1], w[1])


class _Limited:
    """The executor's device, reporting a memory limit (as GPUs do)."""

    def __init__(self, device, limit: int):
        self.device, self.limit = device, limit

    def memory_stats(self):
        return {"bytes_limit": self.limit}

    def __eq__(self, other):
        return other == self.device

    __hash__ = None


class _OnLimitedDevice:
    """``executor`` whose mesh's first device reports ``limit`` bytes."""

    def __init__(self, executor, limit: int):
        self._executor = executor
        self.mesh = type("Mesh", (), {"devices": np.array(
            [_Limited(d, limit) for d in executor.mesh.devices.flat])})()

    def __getattr__(self, name):
        return getattr(self._executor, name)


def test_default_pool_leaves_room_for_weights_and_a_step(tiny_model):
    ex = tiny_model.executor
    weights = sum(x.nbytes for x in jax.tree.leaves(ex.params))
    kw = {"max_num_seqs": 4, "max_len": 128, "max_batched_tokens": 64, "static_shapes": True}
    probe = PagedEngine(ex, num_blocks=8, **kw)
    limit = int((weights + probe.step_bytes() + 40 * probe.block_bytes()) / 0.85)
    e = PagedEngine(_OnLimitedDevice(ex, limit), **kw)
    assert 39 <= e.num_blocks <= 40
    assert weights + probe.step_bytes() + e.num_blocks * e.block_bytes() <= 0.85 * limit
    # plenty of memory: twice what max_num_seqs sequences of max_len tokens hold, no more
    big = PagedEngine(_OnLimitedDevice(ex, 1 << 40), **kw)
    assert big.num_blocks == 2 * 4 * (128 // big.block_size) + 1


def test_static_chunk_rows_follow_the_prompts_not_the_budget(tiny_model):
    e = PagedEngine(tiny_model.executor, max_num_seqs=4, max_len=128,
                    max_batched_tokens=2048, num_blocks=16, static_shapes=True)
    assert [e.chunk_rows(n) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    assert e.chunk_rows(33) == 64  # many short prompts at once: past the budget's rows
    assert e.chunk_row_buckets() == [8, 16, 32]
    small = PagedEngine(tiny_model.executor, max_num_seqs=4, max_len=128,
                        max_batched_tokens=320, num_blocks=16, static_shapes=True)
    assert small.chunk_row_buckets() == [5]


def test_warmup_compiles_what_static_steps_of_any_prompt_need(tiny_model, codec):
    ex = tiny_model.executor
    engine = PagedEngine(ex, max_num_seqs=16, max_len=128, max_batched_tokens=1024,
                         num_blocks=160, static_shapes=True)
    assert engine.chunk_row_buckets() == [8, 16]
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: name == "/jax/core/compile/backend_compile_duration"
        and listening and compiled.append(secs))
    listening = True
    engine.warmup(steps=(1, 4))
    assert compiled  # (the listener hears compiles)
    compiled.clear()
    s = Scheduler(engine, codec, Limits(), steps_per_dispatch=4).start()
    try:
        # 16 prompts in the first step (16 rows), then one alone (8 rows)
        hs = s.submit([SeqRequest(tuple(range(4, 4 + n)), 6, ignore_eos=True)
                       for n in (3, 20, 50, 70, 100, 9, 30, 60, 5, 7, 11, 13, 17, 19, 23, 29)])
        wait_until(lambda: all(h.done for h in hs))
        hs += s.submit([SeqRequest(tuple(range(4, 120)), 6, ignore_eos=True)])
        wait_until(lambda: all(h.done for h in hs))
    finally:
        s.stop()
    listening = False
    assert all(h.finish_reason == "length" for h in hs)
    assert not compiled
