"""The load generator against optkit's server on the fake engine, whose delays are known."""

import asyncio
import math

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from optkit.bench.loadgen import (
    Lengths,
    LoadConfig,
    arrival_times,
    make_requests,
    read_dataset,
    run_load,
    run_load_sweep,
)
from optkit.bench.results import read_rows
from optkit.serve import (
    BackgroundServer,
    CharCodec,
    FakeEngine,
    Limits,
    Metrics,
    Scheduler,
    create_app,
)

LETTERS = (97, 123)  # the fake engine's lowercase letters, one token each


@pytest.fixture
def fake_server():
    """Factory: a fake-engine server with chosen delays -> (server, engine)."""
    servers = []

    def make(prefill_delay=0.0, step_delay=0.0, steps_per_dispatch=1, max_slots=4):
        engine = FakeEngine(max_slots=max_slots, prefill_delay=prefill_delay,
                            step_delay=step_delay)
        sched = Scheduler(engine, CharCodec(), Limits(max_queue=64),
                          steps_per_dispatch=steps_per_dispatch, metrics=Metrics())
        srv = BackgroundServer(create_app(sched, sched.codec, "fake")).start()
        servers.append(srv)
        return srv, engine

    yield make
    for s in servers:
        s.stop()


def test_lengths():
    rng = np.random.default_rng(0)
    assert str(Lengths.parse(64)) == "64" and (Lengths.parse("64").sample(rng, 3) == 64).all()
    u = Lengths.parse("uniform:3:5").sample(rng, 2000)
    assert set(u) == {3, 4, 5}
    n = Lengths.parse("normal:100:10").sample(rng, 20000)
    assert abs(n.mean() - 100) < 0.5 and abs(n.std() - 10) < 0.5
    assert Lengths.parse("exponential:2").sample(rng, 1000).min() >= 1
    assert abs(np.median(Lengths.parse("lognormal:50:0.5").sample(rng, 20000)) - 50) < 1.5
    assert str(Lengths.parse("uniform:3:5")) == "uniform:3:5"
    for bad in ("uniform:5:3", "normal:10", "zipf:2", "0", "uniform:a:b"):
        with pytest.raises(ValueError, match="bad length distribution"):
            Lengths.parse(bad)


@pytest.mark.parametrize("burstiness, cv", [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_arrivals_have_the_rate_and_burstiness(burstiness, cv):
    t = arrival_times(40001, rate=8.0, burstiness=burstiness, rng=np.random.default_rng(1))
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    assert (arrival_times(5, math.inf) == 0).all()


def test_requests_from_distributions_and_files(tmp_path):
    cfg = LoadConfig(url="http://x", num_requests=50, prompt_len="uniform:4:9", output_len=7,
                     token_range=(10, 20), rate=5)
    reqs = make_requests(cfg)
    assert all(len(r["prompt"]) == r["prompt_len"] and 4 <= r["prompt_len"] <= 9 for r in reqs)
    assert all(10 <= t < 20 for r in reqs for t in r["prompt"])
    assert all(r["max_tokens"] == 7 for r in reqs)
    assert reqs == make_requests(cfg)  # seeded
    assert [r["send_at"] for r in reqs] == sorted(r["send_at"] for r in reqs)
    text = make_requests(cfg.replace(prompt_format="text", prompt_len=6))
    assert all(len(r["prompt"].split()) == 6 for r in text)

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello", "max_tokens": 3}\n\n{"prompt": [5, 6, 7]}\n')
    reqs = make_requests(cfg.replace(dataset=str(data), num_requests=5))
    assert sorted(map(str, (r["prompt"] for r in reqs[:2]))) == ["[5, 6, 7]", "hello"]
    assert {r["max_tokens"] for r in reqs if r["prompt"] == "hello"} == {3}
    assert {r["max_tokens"] for r in reqs if r["prompt"] != "hello"} == {7}
    for bad, msg in (('{"text": "x"}', "needs a 'prompt'"), ("nope", "not JSON"),
                     ('{"prompt": "x", "max_tokens": 0}', "positive")):
        data.write_text(bad + "\n")
        with pytest.raises(ValueError, match=msg):
            read_dataset(data)
    with pytest.raises(FileNotFoundError):
        LoadConfig(url="http://x", dataset=str(tmp_path / "missing.jsonl"))


def server_means_ms(url: str) -> dict:
    """Mean TTFT and time per output token (ms) from the server's own /metrics histograms."""
    text = httpx.get(url + "/metrics", timeout=10).text
    samples = {s.name: s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples}
    return {k: 1e3 * samples[f"optkit_{name}_sum"] / samples[f"optkit_{name}_count"]
            for k, name in (("ttft", "time_to_first_token_seconds"),
                            ("tpot", "time_per_output_token_seconds"))}


def test_reports_the_servers_known_delays(fake_server):
    """Prefill 250 ms then one token every 40 ms: the client sees that, and agrees with what
    the server measured itself (which also carries a loaded machine's scheduling delays, so
    the generator is checked against it; the nominal delays bound it from below)."""
    srv, engine = fake_server(prefill_delay=0.25, step_delay=0.04)
    reqs, s = run_load(url=srv.url, num_requests=4, concurrency=1, prompt_len=5,
                       output_len=12, token_range=LETTERS, progress=False)
    assert s["completed"] == 4 and s["failed"] == 0 and s["served_model"] == "fake"
    assert all(r["output_tokens"] == 12 and r["chunks"] == 12 for r in reqs)
    server = server_means_ms(srv.url)
    # The nominal delays bound every latency from below; a loaded machine only adds to them,
    # so the checks above those bounds compare the client with the server's own measurement.
    # The client's TTFT also spans the HTTP request and the SSE write: a little more.
    assert 250 <= s["ttft_p50_ms"] <= s["ttft_p99_ms"] and s["ttft_mean_ms"] >= 250
    assert 0 <= s["ttft_mean_ms"] - server["ttft"] < 250  # far less than a queued request adds
    assert s["itl_p50_ms"] >= 40 * 0.98 and s["tpot_mean_ms"] >= 40 * 0.98
    assert s["itl_mean_ms"] == pytest.approx(server["tpot"], rel=0.1)
    assert s["tpot_mean_ms"] == pytest.approx(s["itl_mean_ms"], rel=0.02)
    # end to end = first token + 11 gaps
    assert s["e2e_mean_ms"] == pytest.approx(s["ttft_mean_ms"] + 11 * s["itl_mean_ms"],
                                             rel=0.03)
    assert s["mean_output_tokens"] == 12 and s["mean_prompt_tokens"] == 5
    assert s["request_throughput"] == pytest.approx(4 / s["duration_s"])
    assert s["output_token_throughput"] == pytest.approx(48 / s["duration_s"])
    assert engine.calls["prefill"] == 4


def test_chunks_of_several_tokens(fake_server):
    """4 decode steps per dispatch: chunks carry 4 tokens; log-probs reveal that."""
    srv, _ = fake_server(prefill_delay=0.02, step_delay=0.03, steps_per_dispatch=4)
    common = dict(url=srv.url, num_requests=2, concurrency=1, prompt_len=3, output_len=13,
                  token_range=LETTERS, progress=False)
    reqs, s = run_load(**common)
    assert all(r["output_tokens"] == 13 and r["chunks"] == 4 for r in reqs)
    # one gap per chunk of 4 tokens; the time per token comes from the token count
    assert s["itl_p50_ms"] >= 120 * 0.98 and s["tpot_mean_ms"] >= 30 * 0.98
    assert s["itl_mean_ms"] == pytest.approx(4 * s["tpot_mean_ms"], rel=0.15)
    reqs, s = run_load(**common, logprobs=True)
    assert all(len(r["itl_s"]) == 12 for r in reqs)
    assert s["itl_p50_ms"] >= 30 * 0.98                      # each gap over its 4 tokens
    assert s["itl_mean_ms"] == pytest.approx(s["tpot_mean_ms"], rel=0.15)


def test_concurrency_cap_and_goodput(fake_server):
    srv, _ = fake_server(prefill_delay=0.05, step_delay=0.01)
    reqs, s = run_load(url=srv.url, num_requests=6, concurrency=2, prompt_len=3,
                       output_len=10, token_range=LETTERS, progress=False,
                       slo_ttft_ms=1000, slo_e2e_ms=5000)
    spans = [(r["start_s"], r["start_s"] + r["e2e_s"]) for r in reqs]
    overlap = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert overlap == 2
    assert s["slo_attainment"] == 1.0 and s["goodput"] == pytest.approx(s["request_throughput"])
    _, s = run_load(url=srv.url, num_requests=3, prompt_len=3, output_len=4, rate=50,
                    token_range=LETTERS, progress=False, slo_ttft_ms=20)
    assert s["completed"] == 3 and s["slo_attainment"] == 0.0 and s["goodput"] == 0.0


def test_errors_are_recorded(fake_server):
    srv, _ = fake_server()
    reqs, s = run_load(url=srv.url, model="no-such-model", num_requests=2, prompt_len=2,
                       output_len=2, token_range=LETTERS, progress=False)
    assert s["failed"] == 2 and s["completed"] == 0 and "HTTP 404" in s["first_error"]
    assert s["ttft_mean_ms"] is None and s["goodput"] == 0.0


def test_an_unreachable_server_is_one_clear_error():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=r"cannot list the models at http://127\.0\.0\.1:"
                                         r"\d+/v1/models .*is the server running"):
        run_load(url=f"http://127.0.0.1:{port}", num_requests=1, prompt_len=2, output_len=2,
                 token_range=LETTERS, progress=False)


def test_runs_inside_a_running_event_loop(fake_server):
    """Jupyter cells run inside an event loop; run_load then uses a thread of its own."""
    srv, _ = fake_server()

    async def cell():
        return run_load(url=srv.url, num_requests=2, prompt_len=2, output_len=3,
                        token_range=LETTERS, progress=False)

    reqs, s = asyncio.run(cell())
    assert s["completed"] == 2


def test_sweep_over_rates_writes_and_resumes(fake_server, tmp_path):
    srv, engine = fake_server(step_delay=0.002)
    cfg = LoadConfig(url=srv.url, num_requests=5, prompt_len=3, output_len=4,
                     token_range=LETTERS)
    out, per_request = tmp_path / "load.csv", tmp_path / "req.jsonl"
    df = run_load_sweep(cfg, rates=[20, 100], output=out, requests_output=per_request,
                        progress=False)
    assert list(df["rate"]) == [20, 100] and (df["completed"] == 5).all()
    assert list(read_rows(out)["rate"]) == [20, 100]
    req = read_rows(per_request)
    assert len(req) == 10 and set(req["rate"]) == {20, 100} and set(req["load_id"]) == \
        set(df["load_id"])
    before = engine.calls["prefill"]
    again = run_load_sweep(cfg, rates=[20, 100], output=out, progress=False)
    assert engine.calls["prefill"] == before  # read back, not rerun
    assert list(again["load_id"]) == list(df["load_id"])


def test_cli(fake_server, tmp_path):
    from optkit.cli import main

    srv, _ = fake_server()
    out, png = tmp_path / "load.csv", tmp_path / "load.png"
    rc = main(["bench", "load", "--url", srv.url, "--rate", "50", "inf", "--num-requests", "4",
               "--prompt-len", "3", "--output-len", "uniform:2:4", "--token-range", "97", "123",
               "--slo-ttft-ms", "500", "--output", str(out), "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 10_000
    df = read_rows(out)
    assert list(df["rate"]) == [50, math.inf] and (df["completed"] == 4).all()
    assert (df["slo_ttft_ms"] == 500).all() and (df["output_len"] == "uniform:2:4").all()
