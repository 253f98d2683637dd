"""The engine thread over the fake engine: slots, limits, cancellation, policies, priorities."""

import math
import threading

import pytest

from optkit.serve import CharCodec, FakeEngine, Limits, Scheduler, SeqRequest
from optkit.serve.scheduler import (
    RETRY_AFTER_MAX,
    QueueFull,
    RequestError,
    ShuttingDown,
    retry_after,
)
from tests.serve.conftest import gated, wait_until

C = CharCodec()


def req(prompt, max_tokens=8, **kw):
    return SeqRequest(tuple(C.encode(prompt)), max_tokens=max_tokens, **kw)


class Collector:
    def __init__(self):
        self.lock = threading.Lock()
        self.outputs = {}

    def __call__(self, h, out):
        with self.lock:
            self.outputs.setdefault(h.id, []).append(out)

    def text(self, h):
        return "".join((o.prompt_text or "") + o.text for o in self.outputs.get(h.id, []))


@pytest.fixture
def sched():
    made = []

    def make(limits=None, **kw):
        engine = FakeEngine(max_slots=kw.pop("max_slots", 2), max_len=kw.pop("max_len", 256),
                            step_delay=kw.pop("step_delay", 0.0),
                            prefill_delay=kw.pop("prefill_delay", 0.0),
                            num_blocks=kw.pop("num_blocks", None))
        s = Scheduler(engine, C, limits or Limits(max_queue=32), **kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def run_all(s, requests, **kw):
    col = Collector()
    hs = s.submit(requests, on_output=col, **kw)
    wait_until(lambda: all(h.done for h in hs))
    return hs, col


def assert_clean(s):
    wait_until(lambda: s.stats()["active"] == 0)
    st = s.stats()
    assert (st["waiting"], st["running"], st["free_slots"], st["cache_tokens"],
            st["tokens_in_flight"]) == (0, 0, st["slots"], 0, 0)


def test_hand_checked_outputs_and_finish_reasons(sched):
    s = sched()
    hs, col = run_all(s, [req("abc", 5), req("XY", 5), req("hello", 30, stop=("uv",)),
                          req("ab", 0, echo=True), req("yz", 4, echo=True)])
    assert [col.text(h) for h in hs] == ["defgh", "Z", "pqrst", "ab", "yzabcd"]
    assert [h.finish_reason for h in hs] == ["length", "stop", "stop", "length", "length"]
    assert [h.generated for h in hs] == [5, 2, 7, 0, 4]  # EOS and stop tokens count
    assert s.engine.calls["prefill"] == 4  # echo without logprobs and 0 tokens: no model work
    assert_clean(s)


def test_logprobs_entries_and_prompt_scores(sched):
    s = sched()
    (h,), col = run_all(s, [req("XY", 3, logprobs=2, echo=True)])
    entries = [e for o in col.outputs[h.id] for e in (o.prompt_entries or []) + o.entries]
    half, quarter = math.log(0.5), math.log(0.25)
    assert [(e.token, e.logprob, e.offset) for e in entries] == [
        ("X", None, 0), ("Y", half, 1), ("Z", half, 2)]
    assert entries[1].top == {"Y": half, "Z": quarter}
    assert entries[2].top == {"Z": half, "<eot>": quarter}
    assert h.cum_logprob == pytest.approx(2 * half)  # "Z" and the end-of-text token


def test_finished_sequences_free_their_slot_at_once(sched):
    s = sched(max_slots=2, step_delay=0.01, steps_per_dispatch=1)
    short, long_, waiting = s.submit([req("a", 2), req("b", 40), req("c", 3)])
    wait_until(lambda: waiting.done and long_.done)
    # the third request ran while the long one still decoded
    assert short.t_done < waiting.t_first and waiting.t_done < long_.t_done
    assert_clean(s)


def test_static_policy_runs_whole_batches(sched):
    s = sched(max_slots=2, step_delay=0.01, steps_per_dispatch=1, policy="static")
    short, long_, waiting = s.submit([req("a", 2), req("b", 20), req("c", 3)])
    wait_until(lambda: waiting.done)
    assert long_.t_first < short.t_done  # the first two ran as one batch
    assert waiting.t_first > long_.t_done  # the third waited for the whole batch


def test_static_policy_batch_window(sched):
    s = sched(max_slots=4, policy="static", static_wait=0.3)
    (h,) = s.submit([req("a", 1)])
    wait_until(lambda: h.done)
    assert h.t_first - h.t_submit >= 0.29  # waited for companions that never came


def test_several_steps_per_dispatch_only_while_none_can_start(sched):
    s = sched(max_slots=1, steps_per_dispatch=4)
    run_all(s, [req("a", 9)])
    assert s.engine.calls["generate"] == 2  # 1 token from prefill + 2 x 4
    # every slot taken: "b" waits for "a" to end whatever the dispatch, so "a" keeps 4 a call
    s1 = sched(max_slots=1, steps_per_dispatch=4, step_delay=0.005)
    hs, col = run_all(s1, [req("a", 9), req("b", 9)])
    assert s1.engine.calls["generate"] == 4
    assert [col.text(h) for h in hs] == ["bcdefghij", "cdefghijk"]
    # a free slot but "b" held back (here by the token budget): one token per dispatch,
    # so "b" starts as soon as it may
    s2 = sched(max_slots=2, steps_per_dispatch=4, step_delay=0.005,
               limits=Limits(max_queue=8, max_tokens_in_flight=15))
    hs, col = run_all(s2, [req("a", 9), req("b", 9)])
    assert s2.engine.calls["generate"] == 10  # decode calls: 8 for "a", 2 for "b"
    assert [col.text(h) for h in hs] == ["bcdefghij", "cdefghijk"]


def test_token_budget_holds_requests_back(sched):
    s = sched(max_slots=4, step_delay=0.005, steps_per_dispatch=1,
              limits=Limits(max_queue=8, max_tokens_in_flight=30))
    a, b = s.submit([req("aaaa", 20), req("bbbb", 20)])
    wait_until(lambda: b.done)
    assert b.t_first > a.t_done
    with pytest.raises(RequestError, match="in flight"):
        s.submit([req("a", 40)])


@pytest.mark.parametrize("request_, match", [
    (req("", 1), "empty"),
    (req("a" * 30, 240), "context length"),
    (req("a" * 40, 1), "at most 32"),
    (SeqRequest((5, 500), 1), "outside the vocabulary"),
    (req("a", 1, logprobs=9), "logprobs"),
])
def test_requests_that_can_never_run(sched, request_, match):
    s = sched(limits=Limits(max_queue=4, max_prompt_len=32))
    with pytest.raises(RequestError, match=match):
        s.submit([request_])


def test_queue_limit_is_all_or_nothing(sched):
    s = sched(max_slots=1, step_delay=0.05, limits=Limits(max_queue=3))
    running = s.submit([req("a", 50)])
    wait_until(lambda: s.stats()["running"] == 1)
    waiting = s.submit([req("b", 5), req("c", 5)])
    with pytest.raises(QueueFull):
        s.submit([req("d", 5), req("e", 5)])
    assert s.stats()["waiting"] == 2
    for h in running + waiting:
        h.cancel()
    wait_until(lambda: all(h.done for h in running + waiting))
    assert {h.finish_reason for h in running + waiting} == {"cancelled"}
    assert_clean(s)


def test_retry_after_follows_the_admission_rate():
    # four admissions in the 4 s up to now: one a second
    assert retry_after(3, [0.0, 1.0, 2.0, 3.0], now=4.0) == 3
    assert retry_after(1, [0.0, 1.0, 2.0, 3.0], now=4.0) == 1
    assert retry_after(3, [0.0, 1.0, 2.0, 3.0], now=8.0) == 6   # nothing since: slower
    assert retry_after(1, [9.0], now=9.2) == 1                  # never below 1 s
    assert retry_after(500, [0.0, 1.0], now=2.0) == RETRY_AFTER_MAX
    assert retry_after(9, [], now=5.0) == 1                     # nothing admitted yet


def test_queue_full_says_when_to_retry(sched):
    s = sched(max_slots=1, step_delay=0.01, limits=Limits(max_queue=2))
    running = s.submit([req("a", 250)])
    wait_until(lambda: s.stats()["running"] == 1)
    waiting = s.submit([req("b", 5), req("c", 5)])
    with pytest.raises(QueueFull) as e:
        s.submit([req("d", 5)])
    assert 1 <= e.value.retry_after <= RETRY_AFTER_MAX
    with pytest.raises(RequestError, match="queues at most 2"):  # can never fit: not a 429
        s.submit([req("d", 5)] * 3)
    for h in running + waiting:
        h.cancel()
    assert_clean(s)


def test_close_ends_the_waiting_and_lets_the_running_finish(sched):
    s = sched(max_slots=1)
    go = gated(s)
    col = Collector()
    run, wait = s.submit([req("a", 30), req("b", 30)], on_output=col)
    wait_until(lambda: s.stats()["running"] == 1)  # its first step waits for ``go``
    s.close(grace=100)
    with pytest.raises(ShuttingDown) as e:
        s.submit([req("c", 1)])
    assert 1 <= e.value.retry_after <= 100
    assert s.stats()["closed"] and not run.done
    go.set()
    wait_until(lambda: wait.done)
    assert wait.finish_reason == "cancelled" and wait.t_first is None
    assert col.outputs[wait.id][-1].error == "the server is shutting down"
    wait_until(lambda: s.idle)
    assert (run.finish_reason, col.text(run)) == ("length", "bcdefghijklmnopqrstuvwxyzabcde")
    assert_clean(s)


def test_stop_after_close_ends_the_running_with_an_error(sched):
    s = sched(max_slots=1, step_delay=0.05, steps_per_dispatch=1)  # 250 tokens: 12.5 s
    col = Collector()
    (run,) = s.submit([req("a", 250)], on_output=col)
    wait_until(lambda: len(col.text(run)) >= 2)
    s.close()
    s.stop()
    assert run.finish_reason == "cancelled" and run.generated < 250
    assert col.outputs[run.id][-1].error == "the server is shutting down"
    with pytest.raises(ShuttingDown):
        s.submit([req("c", 1)])


def test_cancel_running_and_waiting(sched):
    s = sched(max_slots=1, step_delay=0.05, steps_per_dispatch=1)
    col = Collector()
    run, wait = s.submit([req("a", 200), req("b", 200)], on_output=col)
    wait_until(lambda: len(col.text(run)) >= 3)
    wait.cancel()
    wait_until(lambda: wait.done)
    assert wait.finish_reason == "cancelled" and wait.t_first is None
    run.cancel()
    wait_until(lambda: run.done)
    assert run.finish_reason == "cancelled" and run.generated < 200
    assert col.outputs[run.id][-1].finish_reason == "cancelled"
    assert s.stats()["blocks_used"] == 0
    assert_clean(s)


def test_failed_step_fails_its_sequences_only(sched):
    s = sched()

    def broken(works, num_steps=1):
        raise RuntimeError("device on fire")

    ok_step = s.engine.step
    s.engine.step = broken
    (h,), col = run_all(s, [req("a", 3)])
    error = col.outputs[h.id][-1].error
    assert h.finish_reason == "error" and error == "internal error: generation failed"
    s.engine.step = ok_step
    (h,), col = run_all(s, [req("a", 3)])
    assert col.text(h) == "bcd"
    assert_clean(s)


def test_stop_cancels_everything_left(sched):
    s = sched(max_slots=1, step_delay=0.05)
    hs = s.submit([req("a", 200), req("b", 200)])
    wait_until(lambda: s.stats()["running"] == 1)
    s.stop()
    assert all(h.finish_reason == "cancelled" for h in hs)
    assert not s.stats()["alive"]
    with pytest.raises(RuntimeError):
        s.submit([req("a", 1)])


def test_weighted_keys_share_the_slot(sched):
    s = sched(max_slots=1, step_delay=0.01, steps_per_dispatch=1, weights={"a": 3, "b": 1})
    blocker = s.submit([req("z", 250)], key="a")
    a = s.submit([req("a", 1) for _ in range(8)], key="a")
    b = s.submit([req("b", 1) for _ in range(8)], key="b")
    blocker[0].cancel()  # both keys wait now
    wait_until(lambda: all(h.done for h in blocker + a + b))
    order = sorted(a + b, key=lambda h: h.t_first)
    assert sum(h in a for h in order[:8]) == 6


def test_long_prompt_is_chunked_while_a_stream_decodes(sched):
    s = sched(max_slots=2, step_delay=0.01, steps_per_dispatch=1)
    col = Collector()
    (stream,) = s.submit([req("a", 200)], on_output=col)
    wait_until(lambda: stream.generated >= 3)
    s.engine.works = []
    seen = []
    step = s.engine.step

    def spy(works, num_steps=1):
        seen.append([(w.seq, len(w.tokens), w.start) for w in works])
        return step(works, num_steps)

    s.engine.step = spy
    (long_,), _ = run_all(s, [req("b" * 200, 2)])
    # the 200-token prompt went in chunks of the token budget (64), and every one of those
    # steps also decoded the stream
    chunks = [next(n for i, n, _ in st if i == long_.id) for st in seen
              if any(i == long_.id for i, _, _ in st)]
    assert chunks[:4] == [63, 63, 63, 11]
    assert all(any(i == stream.id and n == 1 for i, n, _ in st) for st in seen[:4])
    wait_until(lambda: stream.done)
    assert col.text(stream) == ("bcdefghijklmnopqrstuvwxyza" * 8)[:200]
    assert_clean(s)


def test_preemption_under_memory_pressure_loses_nothing(sched):
    # 6 blocks of 16 tokens: three sequences growing to 60 tokens each cannot all fit
    s = sched(max_slots=3, num_blocks=7, steps_per_dispatch=2)
    hs, col = run_all(s, [req(c * 10, 50) for c in "abc"])
    want = [("".join(chr(ord("a") + (ord(c) - ord("a") + 1 + i) % 26) for i in range(50)))
            for c in "abc"]
    assert [col.text(h) for h in hs] == want
    assert [h.finish_reason for h in hs] == ["length"] * 3
    assert s.stats()["preemptions"] >= 1
    s.blocks.check()
    assert_clean(s)


def test_prefix_cache_shares_prompt_blocks(sched):
    s = sched(max_slots=4)
    prompt = "abcdefghijklmnopqrstuvwxyzabcdefghijklmnop"  # 42 tokens: two full blocks
    (a,), _ = run_all(s, [req(prompt, 4)])
    hits = s.stats()["prefix_cache_hits"]
    (b,), col = run_all(s, [req(prompt, 4)])
    assert s.stats()["prefix_cache_hits"] - hits == 32
    assert col.text(b) == "qrst"
    assert s.engine.works[0].start >= 32 or b.generated == 4
    # n > 1: the copies wait one step for the first one's prompt blocks, then share them
    hits = s.stats()["prefix_cache_hits"]
    hs, col = run_all(s, [req("z" * 40 + "ab", 3) for _ in range(3)])
    assert {col.text(h) for h in hs} == {"cde"}
    assert s.stats()["prefix_cache_hits"] - hits == 2 * 32
    assert_clean(s)


def test_prompt_scores_come_with_cached_blocks(sched):
    """lm-eval's multiple choice: several continuations scored after one context share the
    context's blocks and its scores; the entries equal those of a run without the cache."""
    context = "the quick brown fox jumps over the lazy dog and then it "  # 56 tokens
    choices = ["runs", "sleeps", "eats"]
    reqs = [req(context + c, 0, echo=True, logprobs=2) for c in choices]

    def entries(s):
        out = []
        for r in reqs:  # one at a time: the first one fills the cache
            (h,), col = run_all(s, [r])
            out.append([(e.token, e.logprob, e.top) for o in col.outputs[h.id]
                        for e in o.prompt_entries or []])
        return out

    plain = sched(prefix_caching=False)
    want = entries(plain)
    s = sched()
    assert entries(s) == want
    assert s.stats()["prefix_cache_hits"] == 2 * 48  # three full context blocks, twice
    s.blocks.check()
    # scores kept without top alternatives do not serve a request that wants them
    s2 = sched()
    run_all(s2, [req(context + "x", 0, echo=True, logprobs=0)])
    run_all(s2, [req(context + "y", 0, echo=True, logprobs=2)])
    assert s2.stats()["prefix_cache_hits"] == 0
    run_all(s2, [req(context + "z", 0, echo=True, logprobs=0)])
    assert s2.stats()["prefix_cache_hits"] == 48


def test_plain_sequences_take_a_dispatch_at_once_as_token_by_token(sched):
    """Sequences without stop strings or log-probs account a dispatch's tokens at once:
    the same text, counts, log-prob sums and finish reasons as the token-by-token path
    (taken by requests with log-probs), an end-of-text token mid-dispatch included."""
    prompts = [("XY", 6), ("abc", 5), ("hello", 30), ("tuv", 9), ("W", 3)]
    runs = []
    for logprobs in (None, 0):
        s = sched(max_slots=4, steps_per_dispatch=4)
        hs, col = run_all(s, [req(p, m, logprobs=logprobs) for p, m in prompts])
        runs.append([(col.text(h), h.generated, h.cum_logprob, h.finish_reason) for h in hs])
        assert s.steps > s.engine.calls["step"]  # several steps a dispatch happened
    assert runs[0] == runs[1]
    assert [r[:2] + r[3:] for r in runs[0]] == [
        ("Z", 2, "stop"), ("defgh", 5, "length"), ("pqrstuvwxyzabcdefghijklmnopqrs", 30, "length"),
        ("wxyzabcde", 9, "length"), ("XYZ", 3, "length")]


@pytest.mark.parametrize("in_budget", [True, False])
def test_decodes_take_budget_unless_the_engine_runs_them_beside_the_chunks(sched, in_budget):
    """A long prompt prefilling beside a running decode gets the budget less the decode,
    or all of it from an engine whose decode rows come on top (static shapes)."""
    s = sched(max_slots=2, steps_per_dispatch=1)
    s.engine.decodes_in_budget = in_budget
    mixed, step = [], s.engine.step

    def record(works, num_steps=1):
        sizes = [len(w.tokens) for w in works]
        if 1 in sizes and max(sizes) > 1:
            mixed.append(max(sizes))
        return step(works, num_steps)

    s.engine.step = record
    hs, col = run_all(s, [req("a", 30), req("b" * 200, 2)])
    assert max(mixed) == s.engine.max_batched_tokens - in_budget
    assert [h.finish_reason for h in hs] == ["length", "length"]
