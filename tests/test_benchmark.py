"""The benchmarks behind `jax-nf4 bench` (the README's main job) and bench/bench_attention.py, on
tiny CPU problems."""

from __future__ import annotations

import json
import re

import jax
import pytest

import jax_nf4
from jax_nf4 import benchmark, cli
from jax_nf4.double_quant import DoubleQuantScales


def test_benchmark_rows_and_table():
    rows = benchmark.run_benchmark(shapes=((64, 128),), rows=(1, 3), min_bytes=1e4, iters=1,
                                   reps=1)
    ops = {(r.m, r.op) for r in rows}
    for m in (1, 3):
        assert {(m, "nf4 matmul"), (m, "nf4 dq matmul"), (m, "jnp nf4"), (m, "dense bf16")} <= ops
    assert {(0, "nf4 dequantize"), (0, "nf4 quantize")} <= ops
    assert all(r.us > 0 and r.gbps > 0 for r in rows)
    nf4_bytes = 64 * 128 // 2 + 64 * 2 * 4
    assert next(r for r in rows if r.op == "nf4 matmul").weight_bytes == nf4_bytes
    table = benchmark.format_table(rows)
    assert "| 64x128 | 1 |" in table and "| 64x128 | 3 |" in table and "quantize us" in table


def test_weight_copies_rotate_the_scale_arrays_past_min_bytes():
    # The GEMV streams the packed codes evict-first, so L2 would keep the scales of a short
    # rotation: each NF4 list must have min_bytes of scale arrays, from distinct weights.
    import numpy as np
    dense, plain, dq = benchmark._random_weights(jax.random.PRNGKey(0), 64, 128, 64, 40000, 6000)
    assert len(dense) == 3  # a 64x128 bf16 weight is 16 KB
    plain_scales = [q.absmax.nbytes for q in plain]
    dq_scales = [q.nbytes - q.packed.size for q in dq]
    assert sum(plain_scales) >= 6000 > sum(plain_scales[:-1])  # 512 B each: 12 copies
    assert sum(dq_scales) >= 6000 > sum(dq_scales[:-1])
    packed = {np.asarray(q.packed).tobytes() for q in dq}
    assert len(packed) == len(dq)  # distinct weights, not repeats of one
    assert np.array_equal(np.asarray(plain[0].packed), np.asarray(dq[0].packed))


def test_weight_copies_stop_at_the_memory_cap_with_a_warning(monkeypatch):
    # On a small GPU the rotation is cut short (one weight at least), with a warning.
    dense, plain, dq = benchmark._random_weights(jax.random.PRNGKey(0), 64, 128, 64, 40000, 6000,
                                                 max_list_bytes=11000)
    assert (len(dense), len(plain), len(dq)) == (1, 2, 2)  # 16384, 2 x 4608, 2 x 5256 bytes
    monkeypatch.setattr(benchmark, "_device_memory_limit", lambda: 60000)  # 10000 per list
    with pytest.warns(UserWarning) as caught:
        rows = benchmark.run_benchmark(shapes=((64, 64),), rows=(1,), min_bytes=3e4, iters=1,
                                       reps=1)
    # 64x64: plain 2304 bytes a weight (4 fit: 1 KB of scales), double-quant 3144 (3 fit)
    assert [str(w.message) for w in caught] == [
        f"bench 64x64: device memory allows only 0.0 MB of {kind} scale arrays rotated (wanted "
        f"0.0 MB): the L2 cache may serve part of them, so the {kind} matmul times may be "
        f"optimistic" for kind in ("plain", "double-quant")]
    assert {r.op for r in rows} >= {"nf4 matmul", "nf4 dq matmul"}


def test_dequant_dot_baseline_from_16_rows():
    rows = benchmark.run_benchmark(shapes=((128, 256),), rows=(1, 16), min_bytes=1e4, iters=1,
                                   reps=1)
    dd = [r for r in rows if r.op == "dequant + dot"]
    assert [r.m for r in dd] == [16] and dd[0].us > 0  # left out below 16 rows
    assert dd[0].weight_bytes == next(r for r in rows if r.op == "nf4 matmul").weight_bytes
    table = benchmark.format_table(rows)
    assert "| dense bf16 us | dequant+dot us |" in table and "| vs dense | vs dequant+dot |" in table
    line1 = next(l for l in table.splitlines() if l.startswith("| 128x256 | 1 |"))
    line16 = next(l for l in table.splitlines() if l.startswith("| 128x256 | 16 |"))
    assert line1.rstrip(" |").endswith("| -") and line1.count("| - |") == 2
    assert line16.endswith("x |") and "| - |" not in line16
    assert line1.count("|") == line16.count("|") == table.splitlines()[3].count("|")


@pytest.mark.parametrize("op, target, calls", [(benchmark._dequant_dot, "nf4_dequantize", 2),
                                               (benchmark.matmul, "nf4_matmul", 6)])
def test_chain_merges_weight_only_work_across_passes(op, target, calls):
    # Three passes over two weights: XLA computes the dequantize of each weight once (so such
    # ops are timed one pass per dispatch), while the x-dependent fused matmul runs 6 times.
    weights = [jax_nf4.quantize(jax.random.normal(jax.random.PRNGKey(i), (32, 32)), 32)
               for i in range(2)]
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 32))
    compiled = benchmark._chained(op, passes=3).lower(x, weights).compile().as_text()
    assert len(re.findall(rf'custom_call_target="[^"]*{target}"', compiled)) == calls


def test_ops_with_weight_only_work_are_timed_one_pass_per_dispatch():
    fused = benchmark.fused_max_rows(jax.default_backend(), jax.numpy.bfloat16, 64)
    assert benchmark._weight_only_work("jnp nf4", 1, 64)
    assert benchmark._weight_only_work("dequant + dot", 16, 64)
    assert not benchmark._weight_only_work("dense bf16", 256, 64)
    for op in ("nf4 matmul", "nf4 dq matmul"):
        assert not benchmark._weight_only_work(op, fused, 64)
        assert benchmark._weight_only_work(op, fused + 1, 64)


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--shapes", "64x128", "--rows", "2,16", "--min-mb", "0.01",
                     "--iters", "1", "--json", str(out)]) == 0
    assert "| 64x128 | 2 |" in capsys.readouterr().out
    dumped = json.loads(out.read_text())
    assert {r["op"] for r in dumped} >= {"nf4 matmul", "dense bf16", "dequant + dot"}
    assert [r["m"] for r in dumped if r["op"] == "dequant + dot"] == [16]


@pytest.mark.parametrize("flags, checked", [((), True), (("--no-check",), False)])
def test_bench_command_checks_unless_told_not_to(monkeypatch, flags, checked):
    seen = []
    monkeypatch.setattr(benchmark, "_check_against_reference",
                        lambda q: seen.append((q.shape, isinstance(q.absmax, DoubleQuantScales))))
    assert cli.main(["bench", "--shapes", "64x128", "--rows", "1", "--min-mb", "0.01",
                     "--iters", "1", *flags]) == 0
    # both scale kinds: the plain and the double-quantized weight
    assert seen == ([((64, 128), False), ((64, 128), True)] if checked else [])


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_reference_check_passes_and_catches_a_wrong_product(monkeypatch, double_quant):
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 128))
    q = jax_nf4.quantize(w, 64, double_quant=double_quant)
    benchmark._check_against_reference(q)
    monkeypatch.setattr(benchmark, "matmul", lambda x, q: 2 * jax_nf4.matmul(x, q))
    kind = "double-quant " if double_quant else ""
    with pytest.raises(RuntimeError, match=f"nf4 {kind}matmul disagrees with the reference"):
        benchmark._check_against_reference(q)


def _meta(pid, name, tid=None):
    e = {"ph": "M", "pid": pid, "name": "thread_name" if tid is not None else "process_name",
         "args": {"name": name}}
    return e | ({"tid": tid} if tid is not None else {})


def test_device_busy_time_is_the_union_of_stream_events():
    events = [_meta(1, "/host:CPU"), _meta(1, "python3", tid=9),
              _meta(2, "/device:GPU:0 (NVIDIA H100)"), _meta(2, "Stream #13(Compute)", tid=13),
              _meta(2, "Stream #14(Compute)", tid=14), _meta(2, "XLA Modules", tid=1),
              {"ph": "X", "pid": 2, "tid": 13, "ts": 10.0, "dur": 5.0, "name": "GemvKernel"},
              {"ph": "X", "pid": 2, "tid": 14, "ts": 12.0, "dur": 5.0, "name": "copy"},   # overlap
              {"ph": "X", "pid": 2, "tid": 13, "ts": 30.0, "dur": 2.5, "name": "GemvKernel"},
              {"ph": "X", "pid": 2, "tid": 1, "ts": 0.0, "dur": 100.0, "name": "jit_chain"},
              {"ph": "X", "pid": 1, "tid": 9, "ts": 0.0, "dur": 50.0, "name": "python"}]
    # [10, 17) and [30, 32.5): the module span and host events do not count, nor the gap
    assert benchmark.device_busy_us({"traceEvents": events}) == 9.5
    assert benchmark.device_busy_us({"traceEvents": events[:2] + events[-1:]}) is None
    # by kernel class: the two GemvKernel events, the copy; sums of durations, and the union
    assert benchmark.device_us_by_kind({"traceEvents": events}) == {
        "nf4": 7.5, "gemm": 0.0, "collective": 0.0, "other": 5.0, "busy": 9.5}
    assert benchmark.device_us_by_kind({"traceEvents": events[:2]}) is None


def test_device_times_of_one_gpu_and_the_top_kernels():
    events = [_meta(2, "/device:GPU:0 (NVIDIA H100)"), _meta(2, "Stream #13(Compute)", tid=13),
              _meta(3, "/device:GPU:1"), _meta(3, "Stream #13(Compute)", tid=13),
              _meta(4, "/device:GPU:10"), _meta(4, "Stream #13(Compute)", tid=13),
              {"ph": "X", "pid": 2, "tid": 13, "ts": 0.0, "dur": 4.0, "name": "GemvKernel"},
              {"ph": "X", "pid": 2, "tid": 13, "ts": 5.0, "dur": 3.0, "name": "ncclDevKernel_"
               "AllReduce_Sum_f32_RING_LL"},
              {"ph": "X", "pid": 2, "tid": 13, "ts": 9.0, "dur": 2.0, "name": "GemvKernel"},
              {"ph": "X", "pid": 3, "tid": 13, "ts": 0.0, "dur": 7.0, "name": "GemvKernel"},
              {"ph": "X", "pid": 4, "tid": 13, "ts": 0.0, "dur": 1.0, "name": "fusion"}]
    trace = {"traceEvents": events}
    assert benchmark.device_us_by_kind(trace, device=1) == {
        "nf4": 7.0, "gemm": 0.0, "collective": 0.0, "other": 0.0, "busy": 7.0}
    assert benchmark.device_us_by_kind(trace, device=0) == {
        "nf4": 6.0, "gemm": 0.0, "collective": 3.0, "other": 0.0, "busy": 9.0}
    assert benchmark.device_us_by_kind(trace)["nf4"] == 13.0
    assert benchmark.device_us_by_kind(trace, device=3) is None
    assert benchmark.top_kernels(trace, device=0) == [
        ("GemvKernel", 6.0, 2), ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 3.0, 1)]
    assert benchmark.top_kernels(trace, 1) == [("GemvKernel", 13.0, 3)]


def test_traced_device_ms_per_unit_of_work(monkeypatch):
    events = [_meta(2, "/device:GPU:0"), _meta(2, "Stream #1", tid=1),
              {"ph": "X", "pid": 2, "tid": 1, "ts": 0.0, "dur": 300.0, "name": "GemvKernel"},
              {"ph": "X", "pid": 2, "tid": 1, "ts": 400.0, "dur": 100.0, "name": "fusion"}]
    monkeypatch.setattr(benchmark, "trace_call", lambda fn, *args: {"traceEvents": events})
    kinds, top = benchmark.traced_device_ms(None, per=4, device=0, top=1)
    assert kinds == {"nf4": 0.075, "gemm": 0.0, "collective": 0.0, "other": 0.025, "busy": 0.1}
    assert top == [("GemvKernel", 0.075, 0.25)]
    monkeypatch.setattr(benchmark, "trace_call", lambda fn, *args: None)
    assert benchmark.traced_device_ms(None, per=4) == (None, None)


def test_kernel_kinds():
    def kind(name):
        trace = {"traceEvents": [_meta(2, "/device:GPU:0"), _meta(2, "Stream #1", tid=1),
                                 {"ph": "X", "pid": 2, "tid": 1, "ts": 0.0, "dur": 1.0,
                                  "name": name}]}
        return next(k for k, v in benchmark.device_us_by_kind(trace).items() if v)

    assert kind("void jax_nf4::(anonymous namespace)::GemvBytePairKernel<__nv_bfloat16, 2, "
                "4, jax_nf4::PlainScales>(jax_nf4::GemvArgs<jax_nf4::PlainScales>)") == "nf4"
    assert kind("void jax_nf4::(anonymous namespace)::SumKSplitsKernel<float>()") == "nf4"
    assert kind("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_NTN") == "gemm"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert kind("loop_multiply_fusion_3") == "other"
    assert kind("psum_2408_0_fusion_1") == "collective"
    assert kind("ncclDevKernel_AllGather_RING_LL") == "collective"


class _FakeTimer:
    """A timer whose n-th call (over all fake timers) takes `base + n`: later is slower."""
    calls: list[str] = []

    def __init__(self, name: str, base: float, kernel: float | None = 1.0):
        self.name, self.base, self.kernel = name, base, kernel

    def wall_us(self) -> float:
        _FakeTimer.calls.append(self.name)
        return self.base + len(_FakeTimer.calls)

    def kernel_us(self) -> float | None:
        _FakeTimer.calls.append(self.name + "*")
        return None if self.kernel is None else self.kernel + len(_FakeTimer.calls)


def test_ops_are_timed_in_rounds_of_alternating_order():
    _FakeTimer.calls = []
    timers = [_FakeTimer("a", 100.0), _FakeTimer("b", 200.0), _FakeTimer("c", 300.0, None)]
    best = benchmark._best_in_rounds(timers, reps=3, kernel_times=True)
    assert _FakeTimer.calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c",
                                "c*", "b*", "a*", "a*", "b*", "c*"]
    # each op's best wall time is its earliest call; kernel times the smaller of two traces
    assert best == [(101.0, 13.0), (202.0, 12.0), (303.0, None)]
    _FakeTimer.calls = []
    assert benchmark._best_in_rounds(timers[:2], reps=2, kernel_times=False) == [
        (101.0, None), (202.0, None)]
    assert _FakeTimer.calls == ["a", "b", "b", "a"]


def test_kernel_times_on_cpu_are_absent():
    with jax.default_device(jax.devices("cpu")[0]):  # GPU runs: the CPU backend, no streams
        rows = benchmark.run_benchmark(shapes=((64, 128),), rows=(1,), min_bytes=1e4, iters=1,
                                       reps=1, kernel_times=True)
    assert all(r.kernel_us is None for r in rows)
    assert {(0, "nf4 dequantize"), (0, "nf4 quantize")} <= {(r.m, r.op) for r in rows}
    table = benchmark.format_table(rows)
    # no device streams traced: the kernel columns of both tables are left out
    assert "kernel us" not in table
    assert "| N x K | dequantize us | GB/s | quantize us | GB/s |\n|---|---|---|---|---|\n" in table


def _stream_trace(busy_us):
    return {"traceEvents": [_meta(2, "/device:GPU:0"), _meta(2, "Stream #1", tid=1),
                            {"ph": "X", "pid": 2, "tid": 1, "ts": 0.0, "dur": busy_us,
                             "name": "kernel"}]}


def test_dequantize_and_quantize_kernel_times_trace_one_call_over_all_copies(monkeypatch,
                                                                             tmp_path):
    traced = []

    def trace_call(fn, *args):  # runs the call as the profiler would; 600 µs busy each time
        traced.append(jax.block_until_ready(fn(*args)))
        return _stream_trace(600.0)

    monkeypatch.setattr(benchmark, "trace_call", trace_call)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--shapes", "64x128", "--rows", "1", "--min-mb", "0.01",
                     "--iters", "1", "--kernel-times", "--json", str(out)]) == 0
    # 64x128 NF4 is 4608 bytes, paired with a 128x64 one: 2 copies rotate 1e4 bytes; one
    # 64x128 bf16 weight (16 KB) is more than 1e4 bytes
    dequantized, quantized = traced[-2:]
    assert [w.shape for w in dequantized] == [(64, 128)] * 2
    assert [w.dtype for w in dequantized] == [jax.numpy.bfloat16] * 2
    assert [type(q) for q in quantized] == [jax_nf4.NF4Weight]
    dumped = {r["op"]: r for r in json.loads(out.read_text())}
    assert dumped["nf4 dequantize"]["kernel_us"] == 300.0  # 600 µs busy over 2 copies
    assert dumped["nf4 quantize"]["kernel_us"] == 600.0
    assert dumped["nf4 dq matmul"]["kernel_us"] is not None


def _rows(kernel_us):
    """Hand-made rows of one shape, M = 1, with the kernel times `kernel_us` by op."""
    ops = {"nf4 matmul": 10.0, "nf4 dq matmul": 12.0, "jnp nf4": 40.0, "dense bf16": 20.0,
           "nf4 dequantize": 50.0, "nf4 quantize": 80.0}
    return [benchmark.Row((64, 128), 0 if "quantize" in op else 1, op, us, 2_000_000,
                          kernel_us.get(op)) for op, us in ops.items()]


def test_table_kernel_columns():
    table = benchmark.format_table(_rows({
        "nf4 matmul": 5.0, "nf4 dq matmul": 6.0, "jnp nf4": 30.0, "dense bf16": 15.0,
        "nf4 dequantize": 20.0, "nf4 quantize": 40.0}))
    lines = table.splitlines()
    assert lines[2].endswith("| nf4 kernel us | dq kernel us | dense kernel us | "
                             "kernel vs dense |")
    matmul = next(l for l in lines if l.startswith("| 64x128 | 1 |"))
    assert matmul.endswith("| 5.0 | 6.0 | 15.0 | 3.00x |")
    assert lines[2].count("|") == lines[3].count("|") == matmul.count("|")
    head = lines.index("| N x K | dequantize us | GB/s | quantize us | GB/s | "
                       "dequantize kernel us | GB/s | quantize kernel us | GB/s |")
    # 2 MB per call: 50 / 80 µs wall, 20 / 40 µs kernel
    assert lines[head + 2] == "| 64x128 | 50.0 | 40 | 80.0 | 25 | 20.0 | 100 | 40.0 | 50 |"
    assert lines[head].count("|") == lines[head + 1].count("|") == lines[head + 2].count("|")


def test_table_kernel_columns_with_missing_kernel_times():
    # kernel times of some rows only: their columns are there, '-' where a row has none
    table = benchmark.format_table(_rows({"nf4 matmul": 5.0, "nf4 dequantize": 20.0}))
    lines = table.splitlines()
    assert next(l for l in lines if l.startswith("| 64x128 | 1 |")).endswith(
        "| 5.0 | - | - | - |")
    assert "| 64x128 | 50.0 | 40 | 80.0 | 25 | 20.0 | 100 | - | - |" in lines
    # none at all: no kernel columns
    table = benchmark.format_table(_rows({}))
    assert "kernel" not in table
    assert "| 64x128 | 50.0 | 40 | 80.0 | 25 |" in table.splitlines()
    assert benchmark.Row((1, 1), 0, "nf4 quantize", 1.0, 1).kernel_gbps is None


def test_bench_attention_quick(bench_script, tmp_path, capsys):
    out = tmp_path / "attention.json"
    rows = bench_script("bench_attention").main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["label"] for r in rows] == ["tiny", "tiny b2"]
    assert all(r["fused_us"] > 0 and r["xla_us"] > 0 for r in rows)
    assert "| tiny b2 | 2 | 1 | 3 | 8 | 40 |" in capsys.readouterr().out
