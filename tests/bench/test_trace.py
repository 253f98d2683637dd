import jax
import jax.numpy as jnp
import pytest

from optkit.bench.trace import Event, _busy, around, kind, profile, summarize


@pytest.mark.parametrize("name,op,expected", [
    ("ncclDevKernel_AllReduce_Sum_f16_RING_LL", "all-reduce-start.3", "collective"),
    ("loop_fusion", "all-reduce.1", "collective"),
    ("psum_176_0_fusion_1", "psum.176.0-fusion.1", "collective"),  # XLA's own all-reduce
    ("int8_matvec", "custom-call.7", "pallas"),
    ("decode_attention", "custom-call.2", "pallas"),
    ("sm90_xmma_gemm_f16f16_f16f32", "custom-call.1", "gemm"),
    ("gemv2T_kernel_val", "", "gemm"),
    ("Memcpy DtoD", "", "copy"),
    ("loop_add_fusion", "add_fusion.4", "fusion"),
])
def test_kind_rules(name, op, expected):
    assert kind(Event("gpu:0", name, op, 0, 0)) == expected


def test_busy_is_the_union_of_intervals():
    assert _busy([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert _busy([]) == 0


def test_summarize_per_step_and_per_device():
    ev = [Event("gpu:0", "gemv", "dot.1", 0, 6000), Event("gpu:0", "add_fusion", "f", 8000, 2000),
          Event("gpu:0", "gemv", "dot.1", 10000, 6000), Event("gpu:0", "add_fusion", "f", 18000,
                                                              2000),
          Event("gpu:1", "ncclDevKernel_AllReduce", "all-reduce", 0, 4000)]
    s = summarize(ev, steps=2, top=1)
    g = s["gpu:0"]
    assert g["span_us"] == pytest.approx(10.0) and g["busy_us"] == pytest.approx(8.0)
    assert g["idle_us"] == pytest.approx(2.0) and g["kernels"] == 2
    assert g["by_kind_us"] == {"gemm": pytest.approx(6.0), "fusion": pytest.approx(2.0)}
    assert [t["name"] for t in g["top"]] == ["gemv"] and g["top"][0]["count"] == 1
    assert s["gpu:1"]["by_kind_us"] == {"collective": pytest.approx(2.0)}


def test_profile_reads_back_this_process_ops():
    f = jax.jit(lambda x: jnp.tanh(x @ x) + 1)
    x = jnp.ones((128, 128))
    f(x).block_until_ready()

    def three(x):
        for _ in range(3):
            x = f(x)
        return x

    out, events = profile(three, x)
    assert out.shape == (128, 128)
    s = summarize(events, steps=3)
    (dev,) = s.values()
    assert dev["kernels"] >= 1 and dev["busy_us"] > 0
    assert dev["span_us"] >= dev["busy_us"]
    assert sum(dev["by_kind_us"].values()) >= dev["busy_us"] * 0.99


def test_around_lists_neighbours_from_the_match():
    ev = [Event("gpu:0", f"k{i}", "", 1000 * i, 500) for i in range(6)]
    ev.insert(3, Event("gpu:0", "ncclDevKernel_AllGather", "all-gather.1", 2500, 100))
    got = around(ev, "all-gather", before=2, after=1)["gpu:0"]
    assert [g[0] for g in got] == ["k1", "k2", "ncclDevKernel_AllGather", "k3"]
    assert got[2][2] == 0 and got[0][2] == pytest.approx(-1.5)
    assert around(ev, "all-gather", nth=1) == {}
    middle = around(ev, r"^k\d", before=0, after=0, nth=None)["gpu:0"]  # k0..k5: the 4th
    assert [m[0] for m in middle] == ["k3"]
