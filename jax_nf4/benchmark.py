"""Benchmark of the NF4 ops against the baselines a JAX user has, in one run.

For each weight shape N x K and each M it times, on JAX's default device:
  nf4 matmul      jax_nf4.matmul (fused dequant + GEMV; large M: dequantize + XLA dot)
  nf4 dq matmul   the same with double-quantized scales (decoded inside the kernel)
  dense bf16      jnp.dot on the unquantized bf16 weight
  dequant + dot   jax_nf4.dequantize, then the dense dot (M >= 16: the unfused large-M baseline)
  jnp nf4         NF4 written in plain jnp (codebook gather * absmax, then dot) under jit
and per shape jax_nf4.dequantize (bf16 out) and jax_nf4.quantize (bf16 in). Matmuls run chained
under jax.jit: each call's output is the next call's input (a non-square N x K weight is paired
with a K x N one), so XLA can neither fold nor de-duplicate them, and weight copies are rotated
so that the L2 cache cannot serve them. The kernels stream the packed codes with an evict-first
hint, so L2 keeps the scale arrays of earlier copies (H100, 200 MB of weights rotated: the
plain 28672 x 8192 GEMV 9% faster than with 1600 MB); so there are as many distinct copies as
make the scale arrays alone (plain absmax; double-quant codes, nested absmax, table and
offset) exceed ``min_bytes`` (dense weights: ``min_bytes`` in all), within half of the memory
XLA may allocate on the device (past it, a warning says which times may be optimistic). One
jit dispatch makes at least MIN_PASSES_PER_DISPATCH passes over the weights and
MIN_CALLS_PER_DISPATCH calls, so that the host's per-dispatch work on every weight array is
hidden (one pass per dispatch for ops with work on the weight alone, which XLA would merge
across passes). Times are wall clock
over many chained calls after a warm-up, divided by the number of calls (the launch gap
between dependent kernels included), the best of several rounds over the ops of one shape and
M in alternating order (a GPU's clock drops under sustained load: no op gains by going
first). With --kernel-times every timed op is also traced twice with jax.profiler: "kernel us"
is the time the GPU streams were busy per call (no gaps), the smaller of the two; dequantize
and quantize are traced as one jit call over all the weight copies, since their wall times
(one dispatch per call) are host-bound on small shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_nf4 import reference
from jax_nf4._lowering import fused_max_rows
from jax_nf4._weight import NF4Weight
from jax_nf4.double_quant import DoubleQuantScales
from jax_nf4.ops import dequantize, matmul, quantize

LLAMA_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192))
DEFAULT_ROWS = (1, 2, 4, 8, 16, 64, 128, 256, 2048)  # GPU: each kernel's range, the switches
DEQUANT_DOT_MIN_ROWS = 16  # "dequant + dot" is timed from this M up


@dataclasses.dataclass
class Row:
    shape: tuple[int, int]
    m: int
    op: str
    us: float
    weight_bytes: int
    kernel_us: float | None = None  # GPU busy time per call (--kernel-times), None elsewhere

    def _gbps_at(self, us: float) -> float:
        return self.weight_bytes / (us * 1e-6) / 1e9

    @property
    def gbps(self) -> float:
        """GB/s at the wall time per call."""
        return self._gbps_at(self.us)

    @property
    def kernel_gbps(self) -> float | None:
        """GB/s at the kernel time (None without one)."""
        return None if self.kernel_us is None else self._gbps_at(self.kernel_us)


# The weight lists of one shape may take at most this share of the memory XLA may allocate
# on the device: on a small GPU the rotation is cut short, with a warning, rather than running
# out of memory (the double-quant lists of the largest shapes take ~7 GB otherwise).
MAX_WEIGHT_MEMORY_SHARE = 0.5


def _device_memory_limit() -> int | None:
    """Bytes XLA may allocate on the default device; None where it does not say (the CPU)."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _scale_bytes(q: NF4Weight) -> int:
    """Bytes of a weight's arrays other than the packed codes (its scales)."""
    return q.nbytes - q.packed.size


def _random_weights(key, n: int, k: int, block_size: int, min_dense_bytes: float,
                    min_scale_bytes: float, max_list_bytes: float = math.inf):
    """Distinct random bf16 weights [N, K] (std 1/sqrt(K): chained products keep their scale)
    totalling at least `min_dense_bytes`, and NF4 versions of as many of them as make the scale
    arrays of each NF4 list (plain; double-quantized) total at least `min_scale_bytes`. No
    list grows past `max_list_bytes` (each has at least one weight)."""
    lists: tuple[list, list, list] = ([], [], [])  # dense, plain NF4, double-quant NF4
    totals = [0, 0, 0]  # dense bytes, then the scale bytes of each NF4 list
    sizes = [0, 0, 0]  # bytes of one weight of each list
    minimums = (min_dense_bytes, min_scale_bytes, min_scale_bytes)

    def wants(j: int) -> bool:
        return not lists[j] or (totals[j] < minimums[j]
                                and (len(lists[j]) + 1) * sizes[j] <= max_list_bytes)

    i = 0
    while any(wants(j) for j in range(3)):
        w = (jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32)
             / math.sqrt(k)).astype(jnp.bfloat16)
        for j, make in enumerate((lambda: w, lambda: quantize(w, block_size),
                                  lambda: quantize(w, block_size, double_quant=True))):
            if wants(j):
                item = make()
                lists[j].append(item)
                sizes[j] = item.nbytes
                totals[j] += item.nbytes if j == 0 else _scale_bytes(item)
        i += 1
    return lists


def _jnp_nf4_matmul(x, q: NF4Weight):
    """NF4 in plain jnp: unpack nibbles, gather the codebook, scale, then a dense dot."""
    scales = jnp.repeat(q.absmax, q.block_size, axis=1)
    w = (jnp.asarray(reference.CODEBOOK)[q.codes()] * scales).astype(x.dtype)
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                           ).astype(x.dtype)


def _dense_matmul(x, w):
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                           ).astype(x.dtype)


def _dequant_dot(x, q: NF4Weight):
    """The unfused path: jax_nf4.dequantize to x's dtype, then the dense dot."""
    return _dense_matmul(x, dequantize(q, x.dtype))


def _device_spans(trace: dict, device: int | None = None) -> list[tuple[float, float, str]]:
    """``(start, end, name)`` in microseconds of the events on the threads named
    ``Stream #...`` of the ``/device:...`` processes of a ``jax.profiler`` perfetto trace (of
    ``/device:GPU:{device}`` alone when ``device`` is given)."""
    events = trace.get("traceEvents", [])
    process = re.compile("/device:" if device is None else rf"/device:GPU:{device}\b")
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and process.match(str(e.get("args", {}).get("name", "")))}
    streams = {(e["pid"], e["tid"]) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in devices
               and str(e.get("args", {}).get("name", "")).startswith("Stream #")}
    return sorted((e["ts"], e["ts"] + e["dur"], str(e.get("name", ""))) for e in events
                  if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams)


def device_busy_us(trace: dict) -> float | None:
    """Microseconds the device streams were busy in a ``jax.profiler`` perfetto trace: the
    union of the event intervals on the threads named ``Stream #...`` of the ``/device:...``
    processes (kernels and copies; the gaps between them do not count). None when the trace
    has no device streams (a CPU run)."""
    spans = _device_spans(trace)
    return _union_us(spans) if spans else None


def _union_us(spans: list[tuple[float, float, str]]) -> float:
    """Length of the union of sorted, non-empty ``spans``."""
    busy, (start, end, _) = 0.0, spans[0]
    for s0, s1, _ in spans[1:]:
        if s0 > end:
            busy, start = busy + end - start, s0
        end = max(end, s1)
    return busy + end - start


#: Kernel classes of :func:`device_us_by_kind` (first match of the name, case-insensitive).
KERNEL_KINDS = {"nf4": re.compile(r"jax_nf4|gemv|gemmtile|ksplits", re.I),
                "gemm": re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.I),
                # NCCL's kernels, and XLA's own all-reduce kernels (named after the jax psum)
                "collective": re.compile(r"nccl|psum|all.?reduce|all.?gather|reduce.?scatter",
                                         re.I)}


def device_us_by_kind(trace: dict, device: int | None = None) -> dict[str, float] | None:
    """Device microseconds of a trace by kernel class: ``nf4`` (jax_nf4's kernels), ``gemm``
    (cuBLAS / CUTLASS matrix products), ``collective`` (NCCL and XLA's collective kernels),
    ``other`` (XLA's fusions, copies) summed over their events, and ``busy`` (the union of the
    events' intervals). All devices' streams together, or GPU ``device``'s alone. None
    without device streams."""
    spans = _device_spans(trace, device)
    if not spans:
        return None
    out = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for s0, s1, name in spans:
        kind = next((k for k, pattern in KERNEL_KINDS.items() if pattern.search(name)), "other")
        out[kind] += s1 - s0
    out["busy"] = _union_us(spans)
    return out


def top_kernels(trace: dict, n: int = 10, device: int | None = None
                ) -> list[tuple[str, float, int]]:
    """The ``n`` kernel names with the most device time in a trace (all devices, or GPU
    ``device``): ``(name, microseconds summed over its events, number of events)``, the
    longest first."""
    totals: dict[str, list] = {}
    for s0, s1, name in _device_spans(trace, device):
        t = totals.setdefault(name, [0.0, 0])
        t[0] += s1 - s0
        t[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    return [(name, us, count) for name, (us, count) in ranked]


def trace_call(fn: Callable, *args) -> dict | None:
    """The ``jax.profiler`` perfetto trace (parsed JSON) of one call ``fn(*args)``, or None
    when the profiler wrote none."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            return None
        with gzip.open(paths[0]) as f:
            return json.load(f)


def traced_device_ms(fn: Callable, *args, per: int, device: int | None = None, top: int = 0
                     ) -> tuple[dict[str, float] | None, list[tuple[str, float, float]] | None]:
    """One traced call of ``fn(*args)``: its device milliseconds by kernel class
    (:func:`device_us_by_kind`) and its ``top`` longest kernels ``(name, ms, calls)``
    (:func:`top_kernels`), all divided by ``per`` (e.g. the tokens the call generates); of GPU
    ``device`` alone when given. ``(None, None)`` without device streams (a CPU)."""
    trace = trace_call(fn, *args)
    kinds = None if trace is None else device_us_by_kind(trace, device)
    if kinds is None:
        return None, None
    return ({k: v / 1e3 / per for k, v in kinds.items()},
            [(name, us / 1e3 / per, calls / per)
             for name, us, calls in top_kernels(trace, top, device)])


def _traced_busy_us(fn: Callable, *args) -> float | None:
    """GPU busy microseconds of one call of ``fn(*args)`` (see :func:`device_busy_us`)."""
    trace = trace_call(fn, *args)
    return None if trace is None else device_busy_us(trace)


# Op calls per jit dispatch at least, and passes over the weights per dispatch at least. The
# host handles every leaf of every weight at each dispatch (a double-quantized weight has 5,
# ~3 µs each): one pass over hundreds of weights would time the host, not the GPU.
MIN_CALLS_PER_DISPATCH = 32
MIN_PASSES_PER_DISPATCH = 8
# Passes beyond this many calls run in a fori_loop (one pass of HLO) rather than unrolled.
MAX_UNROLLED_CALLS = 512


def _chained(op: Callable, passes: int) -> Callable:
    """jit of `passes` passes of ``x = op(x, w)`` over a list of weights. Work on a weight
    alone (a dequantization) is merged by XLA across passes over the same weight: ops with such
    work must be timed with one pass per dispatch (:func:`_weight_only_work`)."""

    def one_pass(x, weights):
        for w in weights:
            x = op(x, w)
        return x

    @jax.jit
    def chain(x, weights):
        if passes * len(weights) > MAX_UNROLLED_CALLS:
            return lax.fori_loop(0, passes, lambda _, y: one_pass(y, weights), x)
        for _ in range(passes):
            x = one_pass(x, weights)
        return x

    return chain


def _weight_only_work(op_name: str, m: int, block_size: int) -> bool:
    """Whether `op_name` at M = `m` computes something from the weight alone (the plain-jnp
    and dequantize + dot baselines; jax_nf4.matmul above the fused kernel's M range)."""
    if op_name in ("jnp nf4", "dequant + dot"):
        return True
    if op_name in ("nf4 matmul", "nf4 dq matmul"):
        return m > fused_max_rows(jax.default_backend(), jnp.bfloat16, block_size)
    return False


class _ChainTimer:
    """`op` chained over `weights` from `x` (:func:`_chained`), compiled and warmed up: one jit
    call runs the chain over all of them, at least MIN_PASSES_PER_DISPATCH times and to at
    least MIN_CALLS_PER_DISPATCH calls unless `one_pass`, and such calls are dispatched back to
    back, each taking the previous output."""

    def __init__(self, op: Callable, weights: Sequence, x, iters: int, one_pass: bool = False):
        passes = 1 if one_pass else max(MIN_PASSES_PER_DISPATCH,
                                        math.ceil(MIN_CALLS_PER_DISPATCH / len(weights)))
        self.calls = passes * len(weights)
        self.dispatches = math.ceil(iters / passes)
        self.chain = _chained(op, passes)
        self.weights, self.x = weights, x
        self.chain(x, weights).block_until_ready()  # compile + warm up

    def wall_us(self) -> float:
        """Microseconds per op call of one timed repetition (`iters` passes)."""
        t0 = time.perf_counter()
        out = self.x
        for _ in range(self.dispatches):
            out = self.chain(out, self.weights)
        out.block_until_ready()
        seconds = time.perf_counter() - t0
        if not bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))):
            raise RuntimeError("benchmark chain produced non-finite values")
        return seconds / (self.dispatches * self.calls) * 1e6

    def kernel_us(self) -> float | None:
        """GPU busy microseconds per op call of one traced dispatch (None without a trace)."""
        busy = _traced_busy_us(self.chain, self.x, self.weights)
        return None if busy is None else busy / self.calls


def _best_in_rounds(timers: Sequence[_ChainTimer], reps: int, kernel_times: bool
                    ) -> list[tuple[float, float | None]]:
    """(wall µs, kernel µs) per call of each timer, the best of `reps` rounds over all of them
    (kernel times: of two traced rounds), the order reversed every round: under sustained load
    the GPU's clock drops (H100: a compute-bound op ran up to 5% slower right after another),
    which would favour whichever op is timed first."""
    wall = [math.inf] * len(timers)
    kernel: list[float | None] = [None] * len(timers)
    order = list(range(len(timers)))
    for _ in range(reps):
        for i in order:
            wall[i] = min(wall[i], timers[i].wall_us())
        order.reverse()
    for _ in range(2 if kernel_times else 0):
        for i in order:
            us = timers[i].kernel_us()
            if us is not None:
                kernel[i] = us if kernel[i] is None else min(kernel[i], us)
        order.reverse()
    return list(zip(wall, kernel))


def _time_calls(fn: Callable, args: Sequence, reps: int, kernel_time: bool = False
                ) -> tuple[float, float | None]:
    """Microseconds per call of jit(fn), dispatched back to back over the rotating args
    (independent calls: XLA sees one op per dispatch and cannot share work between them).
    Small ops are dispatch-bound this way; large ones are timed fairly. With `kernel_time`,
    also the GPU busy time per call of one traced jit that applies fn to every arg (distinct
    args: XLA cannot merge the calls; no dispatch per call), else None."""
    one = jax.jit(fn)
    for _ in range(2):  # compile, then warm the allocator with a full rotation
        jax.block_until_ready([one(a) for a in args])
    calls = max(reps * len(args), 20)
    t0 = time.perf_counter()
    outs = [one(args[i % len(args)]) for i in range(calls)]
    jax.block_until_ready(outs)
    us = (time.perf_counter() - t0) / calls * 1e6
    del outs  # the timed outputs are not needed past here: free them before the traced call
    if not kernel_time:
        return us, None
    every = jax.jit(lambda xs: [fn(a) for a in xs])
    jax.block_until_ready(every(args))  # compile + warm up
    busy = _traced_busy_us(every, args)
    return us, None if busy is None else busy / len(args)


def run_benchmark(shapes=LLAMA_SHAPES, rows=DEFAULT_ROWS, block_size: int = 64,
                  min_bytes: float = 200e6, iters: int = 20, reps: int = 3,
                  check: bool = True, kernel_times: bool = False) -> list[Row]:
    """Times every op on every shape and M; returns the rows of the table. `kernel_times`:
    every row also gets its GPU busy time per call from a profiler trace."""
    key = jax.random.PRNGKey(0)
    results: list[Row] = []
    for n, k in shapes:
        nf4_bytes = n * k // 2 + n * (k // block_size) * 4
        square = n == k
        per_copy = nf4_bytes * (1 if square else 2)
        copies = max(1, math.ceil(min_bytes / per_copy))
        # A non-square chain pairs two lists; quantize rotates over the first list alone.
        per_list = min_bytes / (1 if square else 2)
        limit = _device_memory_limit()
        max_list = (math.inf if limit is None
                    else MAX_WEIGHT_MEMORY_SHARE * limit / (3 if square else 6))
        d1, q1, dq1 = _random_weights(jax.random.fold_in(key, 1), n, k, block_size, min_bytes,
                                      per_list, max_list)
        if square:
            d2, q2, dq2 = d1, q1, dq1
        else:
            d2, q2, dq2 = _random_weights(jax.random.fold_in(key, 2), k, n, block_size,
                                          min_bytes, per_list, max_list)
        for kind, weights in (("plain", q1), ("double-quant", dq1)):
            rotated = sum(_scale_bytes(q) for q in weights)
            if rotated < per_list:
                warnings.warn(
                    f"bench {n}x{k}: device memory allows only {rotated / 1e6:.1f} MB of "
                    f"{kind} scale arrays rotated (wanted {per_list / 1e6:.1f} MB): the L2 cache "
                    f"may serve part of them, so the {kind} matmul times may be optimistic",
                    stacklevel=2)

        def chain(first, second):
            return [w for pair in zip(first, second) for w in (pair if not square else pair[:1])]

        chain_q, chain_dq = chain(q1, q2), chain(dq1, dq2)
        chain_d = chain(d1, d2)
        avg_nf4 = sum(w.nbytes for w in chain_q) / len(chain_q)
        avg_dq = sum(w.nbytes for w in chain_dq) / len(chain_dq)
        avg_dense = sum(2 * w.shape[0] * w.shape[1] for w in chain_d) / len(chain_d)
        if check:
            _check_against_reference(q1[0])
            _check_against_reference(dq1[0])
        for m in rows:
            x = (jax.random.normal(jax.random.fold_in(key, 3), (m, k), jnp.float32)
                 ).astype(jnp.bfloat16)
            ops = [(op_name, op, chain, nbytes) for op_name, op, chain, nbytes in (
                ("nf4 matmul", matmul, chain_q, avg_nf4),
                ("nf4 dq matmul", matmul, chain_dq, avg_dq),
                ("jnp nf4", _jnp_nf4_matmul, chain_q, avg_nf4),
                ("dense bf16", _dense_matmul, chain_d, avg_dense),
                ("dequant + dot", _dequant_dot, chain_q, avg_nf4))
                if op_name != "dequant + dot" or m >= DEQUANT_DOT_MIN_ROWS]
            timers = [_ChainTimer(op, chain, x, iters, _weight_only_work(op_name, m, block_size))
                      for op_name, op, chain, _ in ops]
            for (op_name, _, _, nbytes), (us, kernel_us) in zip(
                    ops, _best_in_rounds(timers, reps, kernel_times)):
                results.append(Row((n, k), m, op_name, us, int(nbytes), kernel_us))
            del timers
        # dequantize writes 4x the bytes it reads (normal priority): with min_bytes of weights
        # its outputs alone keep the scales out of L2.
        for op_name, fn, args in (
                ("nf4 dequantize", lambda q: dequantize(q, jnp.bfloat16), q1[:copies]),
                ("nf4 quantize", lambda w: quantize(w, block_size), d1)):
            us, kernel_us = _time_calls(fn, args, reps, kernel_times)
            results.append(Row((n, k), 0, op_name, us, nf4_bytes + 2 * n * k, kernel_us))
        del d1, q1, dq1, d2, q2, dq2, chain_q, chain_dq, chain_d
    return results


def _check_against_reference(q: NF4Weight) -> None:
    """The fused matmul agrees with a dot on the dequantized weight (bf16 rounding level), for
    plain or double-quantized scales (decoded first for the reference)."""
    k = q.shape[1]
    x = jax.random.normal(jax.random.PRNGKey(7), (3, k), jnp.float32).astype(jnp.bfloat16)
    got = np.asarray(matmul(x, q), np.float64)
    double_quant = isinstance(q.absmax, DoubleQuantScales)
    absmax = q.absmax.decode() if double_quant else q.absmax
    want = reference.matmul(np.asarray(x.astype(jnp.float32)), np.asarray(q.packed),
                            np.asarray(absmax), q.block_size)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    if not err < 1e-2:
        kind = "double-quant " if double_quant else ""
        raise RuntimeError(f"nf4 {kind}matmul disagrees with the reference: relative error "
                           f"{err:.3g}")


def _cell(value: float | None, spec: str = ".1f") -> str:
    """A table cell: `value` formatted, '-' when None."""
    return "-" if value is None else format(value, spec)


def format_table(results: list[Row]) -> str:
    """Markdown tables: one line per shape and M of the matmuls, one per shape of dequantize
    and quantize; times in microseconds per call. Kernel columns where any row has a kernel
    time ('-' in those without)."""
    device = jax.devices()[0]
    kernel = any(r.kernel_us is not None for r in results)
    lines = [f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", "",
             "| N x K | M | nf4 matmul us | GB/s | dq matmul us | jnp nf4 us | dense bf16 us | "
             "dequant+dot us | vs jnp nf4 | vs dense | vs dequant+dot |"
             + (" nf4 kernel us | dq kernel us | dense kernel us | kernel vs dense |"
                if kernel else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|"
             + ("---|---|---|---|" if kernel else "")]
    by_key = {(r.shape, r.m, r.op): r for r in results}
    for (shape, m, op), r in by_key.items():
        if op != "nf4 matmul":
            continue
        jn, de = by_key[(shape, m, "jnp nf4")], by_key[(shape, m, "dense bf16")]
        dq = by_key[(shape, m, "nf4 dq matmul")]
        dd = by_key.get((shape, m, "dequant + dot"))
        line = (f"| {shape[0]}x{shape[1]} | {m} | {r.us:.1f} | {r.gbps:.0f} | {dq.us:.1f} | "
                f"{jn.us:.1f} | {de.us:.1f} | {f'{dd.us:.1f}' if dd else '-'} | "
                f"{jn.us / r.us:.2f}x | {de.us / r.us:.2f}x | "
                f"{f'{dd.us / r.us:.2f}x' if dd else '-'} |")
        if kernel:
            both = r.kernel_us is not None and de.kernel_us is not None
            line += (f" {_cell(r.kernel_us)} | {_cell(dq.kernel_us)} | {_cell(de.kernel_us)} | "
                     f"{f'{de.kernel_us / r.kernel_us:.2f}x' if both else '-'} |")
        lines.append(line)
    lines += ["", "| N x K | dequantize us | GB/s | quantize us | GB/s |"
              + (" dequantize kernel us | GB/s | quantize kernel us | GB/s |" if kernel else ""),
              "|---|---|---|---|---|" + ("---|---|---|---|" if kernel else "")]
    for (shape, m, op), r in by_key.items():
        if op == "nf4 dequantize":
            qr = by_key[(shape, m, "nf4 quantize")]
            line = (f"| {shape[0]}x{shape[1]} | {r.us:.1f} | {r.gbps:.0f} | {qr.us:.1f} | "
                    f"{qr.gbps:.0f} |")
            if kernel:
                line += (f" {_cell(r.kernel_us)} | {_cell(r.kernel_gbps, '.0f')} | "
                         f"{_cell(qr.kernel_us)} | {_cell(qr.kernel_gbps, '.0f')} |")
            lines.append(line)
    lines.append("(GB/s of bytes read plus written)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jax-nf4 bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None,
                        help="comma-separated NxK list (default: Llama shapes on GPU, "
                             "a small CPU set otherwise)")
    parser.add_argument("--rows", default=None, help="comma-separated M list")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--min-mb", type=float, default=None,
                        help="weight megabytes rotated per pass (default 200 on GPU, 1 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="chain passes per timing")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--kernel-times", action="store_true",
                        help="also trace each op twice with jax.profiler and report the GPU "
                             "busy time per call (kernel durations, no launch gaps; the "
                             "smaller of the two)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the check of the fused matmul against the reference before "
                             "timing (for timing-only kernel builds, wrong by design)")
    args = parser.parse_args(argv)

    on_gpu = jax.devices()[0].platform == "gpu"
    shapes = (tuple(tuple(int(d) for d in s.split("x")) for s in args.shapes.split(","))
              if args.shapes else (LLAMA_SHAPES if on_gpu else ((1024, 1024), (2048, 512))))
    rows = (tuple(int(m) for m in args.rows.split(",")) if args.rows
            else (DEFAULT_ROWS if on_gpu else (1, 8, 64)))
    min_mb = args.min_mb if args.min_mb is not None else (200.0 if on_gpu else 1.0)
    iters = args.iters or (20 if on_gpu else 2)
    results = run_benchmark(shapes, rows, args.block_size, min_mb * 1e6, iters,
                            check=not args.no_check, kernel_times=args.kernel_times)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"gbps": r.gbps} for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
