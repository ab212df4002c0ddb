"""jax_nf4.quantize / dequantize / matmul / linear and NF4Weight, on every available backend.

quantize and dequantize must be bit-identical to jax_nf4.reference; matmul and linear are checked
against the float64 reference with tolerances derived below (see assert_matmul_close).
"""

from __future__ import annotations

import functools
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nf4
from jax_nf4 import NF4Weight, reference

DTYPES = [pytest.param(np.dtype(np.float32), id="f32"),
          pytest.param(np.dtype(jnp.bfloat16), id="bf16"),
          pytest.param(np.dtype(np.float16), id="f16")]
MODES = ["eager", "jit"]
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23


# ----------------------------------------------------------------------------- helpers

def call(mode: str, fn, *args):
    """fn(*args), eagerly or through jax.jit (the args are already committed to a device)."""
    return jax.jit(fn)(*args) if mode == "jit" else fn(*args)


def bits(a) -> np.ndarray:
    """The raw bits of an array, so that comparisons tell -0.0 from 0.0 and compare NaNs."""
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}")


def random_weight(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Normal weights with row scales spread over four decades (within float16 range)."""
    scales = 10.0 ** rng.uniform(-2, 2, size=shape[:-1] + (1,))
    return (rng.standard_normal(shape) * scales).astype(np.float32).astype(dtype)


def random_activations(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def random_codes_and_scales(rng: np.random.Generator, shape: tuple[int, ...], block_size: int):
    """Any packed bytes, and scales from 2**-30 to 2**20 (float16 subnormals and overflow)."""
    *lead, n, k = shape
    packed = rng.integers(0, 256, size=(*lead, n // 2, k), dtype=np.uint8)
    absmax = (2.0 ** rng.uniform(-30, 20, size=(*lead, n, k // block_size))).astype(np.float32)
    absmax.reshape(-1)[:2] = [2.0 ** 19, 2.0 ** -20]
    return packed, absmax


def assert_matmul_close(y, x: np.ndarray, packed: np.ndarray, absmax: np.ndarray,
                        block_size: int, platform: str, bias=None) -> None:
    """y ~= x @ W.T (+ bias) against the float64 reference, elementwise and in Frobenius norm.

    x holds the activations as the op saw them (already rounded to their dtype). The kernels
    accumulate in float32 and round the output once to x.dtype, so
      |y - ref| <= atol + rtol * |ref|, with
    * rtol = 2u, twice the unit roundoff u of the output dtype (bf16 2**-7, f16 2**-10,
      f32 2**-23): the one final rounding errs by at most u * |ref|.
    * atol = the float32 accumulation error. Summing K products of random sign one after the
      other, the partial sums grow like sqrt(k) * s (s: the rms of one product), each addition
      errs by ~0.2 * EPS32 * |partial sum|, so the total has a standard deviation of about
      0.14 * EPS32 * K * s. We allow K * EPS32 * max|x[m]| * max|absmax[n]| / 4, which is about
      four times that spread at every K (tree reductions on GPU err less).
    * On GPU, bf16/f16 activations meet the weight in their own dtype (the tensor-core GEMV takes
      the code values as mma operands; the tiled kernel and dequantize-to-x.dtype + an XLA dot
      round the scaled weight to x.dtype): a relative error of up to u per product, summing to
      ~0.6 * u * sqrt(K) * s. There we add u * sqrt(K) * max|x[m]| * max|absmax[n]|, and one
      more u * |ref|_F to the Frobenius bound.
    The Frobenius error must stay below u * |ref|_F per rounding (the elementwise rounding bound,
    summed; its rms is about u / sqrt(3)) plus half the elementwise accumulation allowance,
    aggregated (accumulation errors follow the size of the terms, not |ref|: terms cancel).
    With a bias (linear) the sum is rounded once more, so the bounds grow by u * |ref + bias|.
    """
    dtype = np.dtype(x.dtype)
    x64 = np.asarray(x).astype(np.float64)
    k = x64.shape[-1]
    ref = reference.matmul(x64, packed, absmax, block_size)
    u = float(jnp.finfo(dtype).eps) / 2
    x_scale = np.max(np.abs(x64), axis=-1, keepdims=True)
    w_scale = np.max(absmax, axis=-1).astype(np.float64)
    atol = k * EPS32 * x_scale * w_scale / 4
    roundings = 1
    if platform == "gpu" and dtype != np.float32:
        atol = atol + u * np.sqrt(k) * x_scale * w_scale
        roundings = 2
    bound = atol + 2 * u * np.abs(ref)
    # Accumulation errors scale with the terms, not with |ref| (terms cancel): half of the
    # elementwise allowance, aggregated, is twice their expected spread.
    frobenius_bound = (roundings * u * np.linalg.norm(ref)
                       + 0.5 * np.linalg.norm(np.broadcast_to(atol, ref.shape)))
    if bias is not None:
        ref = ref + np.asarray(bias).astype(np.float64)
        bound = bound + 2 * u * np.abs(ref)
        frobenius_bound += u * np.linalg.norm(ref)
    y = np.asarray(y)
    assert y.dtype == dtype and y.shape == ref.shape
    err = y.astype(np.float64) - ref
    worst = np.unravel_index(np.argmax(np.abs(err) - bound), err.shape)
    assert np.all(np.abs(err) <= bound), (f"|y - ref| = {abs(err[worst]):.3g} > "
                                          f"{bound[worst]:.3g} at {worst} (ref {ref[worst]:.6g})")
    assert np.linalg.norm(err) <= frobenius_bound, (
        f"Frobenius error {np.linalg.norm(err):.3g} > {frobenius_bound:.3g}")


def quantize_on(device, w: np.ndarray, block_size: int) -> NF4Weight:
    return jax_nf4.quantize(jax.device_put(w, device), block_size)


def assert_weight_equals_reference(q: NF4Weight, w: np.ndarray, block_size: int) -> None:
    packed, absmax = reference.quantize(w, block_size)
    assert q.packed.dtype == np.uint8 and q.packed.shape == packed.shape
    assert q.absmax.dtype == np.float32 and q.absmax.shape == absmax.shape
    np.testing.assert_array_equal(np.asarray(q.packed), packed)
    np.testing.assert_array_equal(bits(q.absmax), bits(absmax))


# ----------------------------------------------------------------------------- quantize

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, block_size", [
    ((2, 32), 32), ((6, 128), 64), ((8, 192), 96), ((4, 4096), 4096), ((2, 3, 4, 64), 32)])
def test_quantize_matches_reference(rng, device, mode, dtype, shape, block_size):
    w = random_weight(rng, shape, dtype)
    q = call(mode, lambda w: jax_nf4.quantize(w, block_size), jax.device_put(w, device))
    assert isinstance(q, NF4Weight)
    assert (q.shape, q.block_size, q.dtype, q.stack_shape) == (shape[-2:], block_size, dtype,
                                                              shape[:-2])
    assert q.packed.devices() == {device} and q.absmax.devices() == {device}
    assert_weight_equals_reference(q, w, block_size)


def tie_test_weight(rng: np.random.Generator, dtype) -> np.ndarray:
    """[4, 128] in blocks of 32 with midpoints (as close as dtype gets; exact in float32) and their
    neighbours in dtype in blocks of absmax 1 and 2**-5, all-zero blocks of +0 and -0, and
    random blocks."""
    mids = reference.MIDPOINTS.astype(dtype)
    below = np.nextafter(mids, np.array(-np.inf, dtype))
    above = np.nextafter(mids, np.array(np.inf, dtype))
    one = np.ones(1, dtype)
    tie_block = np.concatenate([mids, one, below, -one / 2])
    return np.stack([
        np.concatenate([tie_block, above, -one, mids, one * 0, tie_block * 2.0 ** -5,
                        np.zeros(32, dtype)]),
        np.concatenate([np.full(32, -0.0, dtype), random_weight(rng, (96,), dtype)]),
        random_weight(rng, (128,), dtype),
        np.concatenate([random_weight(rng, (64,), dtype), np.zeros(32, dtype),
                        random_weight(rng, (32,), dtype)]),
    ]).astype(dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_ties_go_low_and_zero_blocks_get_code_7(rng, device, mode, dtype):
    w = tie_test_weight(rng, dtype)
    q = call(mode, lambda w: jax_nf4.quantize(w, 32), jax.device_put(w, device))
    assert_weight_equals_reference(q, w, 32)
    codes = reference.unpack_pairs(np.asarray(q.packed))
    absmax = np.asarray(q.absmax)
    mids = reference.MIDPOINTS.astype(dtype).astype(np.float32)
    tie_codes = np.arange(15) + (mids > reference.MIDPOINTS)  # exact ties (all f32) go low
    for start in (0, 64):
        np.testing.assert_array_equal(codes[0, start:start + 15], tie_codes)
        np.testing.assert_array_equal(codes[0, start + 16:start + 31], np.arange(15))
    np.testing.assert_array_equal(codes[0, 32:47], np.arange(1, 16))
    np.testing.assert_array_equal(codes[0, 48:63], tie_codes)
    np.testing.assert_array_equal(absmax[0, :3], [1.0, 1.0, 2.0 ** -5])
    for row, block in [(0, 3), (1, 0), (3, 2)]:
        assert bits(absmax[row, block]) == 0  # +0.0, also for a block of -0.0
        np.testing.assert_array_equal(codes[row, 32 * block:32 * (block + 1)], 7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stack", [(), (3,)])
def test_weight_codes_unpack_the_nibbles(rng, device, mode, stack):
    w = jax.device_put(rng.standard_normal((*stack, 6, 64)).astype(np.float32), device)
    q = jax_nf4.quantize(w, 32)
    codes = call(mode, lambda q: q.codes(), q)
    assert codes.shape == (*stack, 6, 64) and codes.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(codes), reference.unpack_pairs(np.asarray(q.packed)))


@pytest.mark.parametrize("mode", MODES)
def test_quantize_casts_float64_to_float32(rng, device, mode):
    w = random_weight(rng, (4, 128), np.float64)
    with jax.enable_x64(True):  # without x64, JAX itself turns float64 input into float32
        w64 = jax.device_put(w, device)
        assert w64.dtype == np.float64
        q = call(mode, lambda w: jax_nf4.quantize(w, 64), w64)
    assert q.dtype == np.float32 and q.absmax.dtype == np.float32
    q32 = quantize_on(device, w.astype(np.float32), 64)
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(q32.packed))
    np.testing.assert_array_equal(bits(q.absmax), bits(q32.absmax))


def test_quantize_block_with_nan_does_not_crash(rng, device):
    # NaN is the caller's problem (its block's result is unspecified); other blocks are exact.
    w = random_weight(rng, (4, 128), np.float32)
    w[1, 70] = np.nan
    q = quantize_on(device, w, 64)
    packed, absmax = reference.quantize(w, 64)
    clean_blocks = ~np.isnan(absmax)
    assert clean_blocks.sum() == 7
    np.testing.assert_array_equal(bits(q.absmax)[clean_blocks], bits(absmax)[clean_blocks])
    clean = np.repeat(clean_blocks, 64, axis=1)
    np.testing.assert_array_equal(reference.unpack_pairs(np.asarray(q.packed))[clean],
                                  reference.unpack_pairs(packed)[clean])


# ----------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, block_size", [
    ((2, 32), 32), ((6, 192), 64), ((4, 288), 96), ((2, 4096), 4096), ((2, 3, 4, 64), 32)])
def test_dequantize_matches_reference(rng, device, mode, dtype, shape, block_size):
    packed, absmax = random_codes_and_scales(rng, shape, block_size)
    q = jax.device_put(NF4Weight(packed, absmax, shape[-2:], block_size), device)
    out = call(mode, lambda q: jax_nf4.dequantize(q, dtype), q)
    with np.errstate(over="ignore"):  # float16 overflows to inf, as it should
        want = reference.dequantize(packed, absmax, block_size, dtype)
    assert out.dtype == dtype and out.shape == shape and out.devices() == {device}
    np.testing.assert_array_equal(bits(out), bits(want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_round_trip_error_is_within_half_the_widest_code_gap(rng, device, dtype):
    w = random_weight(rng, (8, 256), dtype)
    w_deq = np.asarray(jax_nf4.dequantize(quantize_on(device, w, 64), np.float32))
    absmax = np.max(np.abs(w.astype(np.float32).reshape(8, 4, 64)), axis=-1)
    half_gap = np.max(np.diff(reference.CODEBOOK)) / 2
    bound = half_gap * np.repeat(absmax, 64, axis=1) * (1 + EPS32)
    assert np.all(np.abs(w_deq - w.astype(np.float32)) <= bound)


# ----------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 32, 33])
def test_matmul_rows(rng, platform, device, mode, dtype, m):
    n, k, block_size = 48, 256, 64
    w = random_weight(rng, (n, k), np.float32)
    x = random_activations(rng, (m, k), dtype)
    q = quantize_on(device, w, block_size)
    y = call(mode, jax_nf4.matmul, jax.device_put(x, device), q)
    assert y.devices() == {device}
    packed, absmax = reference.quantize(w, block_size)
    assert_matmul_close(y, x, packed, absmax, block_size, platform)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [32, 64, 128, 256, 4096, 48, 96, 40])
def test_matmul_block_sizes(rng, platform, device, mode, dtype, block_size):
    n, k = (8, 4096) if block_size == 4096 else (16, 3 * block_size)
    w = random_weight(rng, (n, k), dtype)
    x = random_activations(rng, (5, k), dtype)
    y = call(mode, jax_nf4.matmul, jax.device_put(x, device), quantize_on(device, w, block_size))
    packed, absmax = reference.quantize(w, block_size)
    assert_matmul_close(y, x, packed, absmax, block_size, platform)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, n, block_size", [
    ((64,), 2, 64), ((1, 64), 2, 64), ((7, 32), 2, 32), ((2, 3, 128), 16, 64),
    ((2, 1, 5, 96), 6, 48), ((33, 256), 64, 256)])
def test_matmul_shapes(rng, platform, device, mode, dtype, x_shape, n, block_size):
    w = random_weight(rng, (n, x_shape[-1]), dtype)
    x = random_activations(rng, x_shape, dtype)
    y = call(mode, jax_nf4.matmul, jax.device_put(x, device), quantize_on(device, w, block_size))
    assert y.shape == x_shape[:-1] + (n,)
    packed, absmax = reference.quantize(w, block_size)
    assert_matmul_close(y, x, packed, absmax, block_size, platform)


def assert_jit_matmul_close(rng, platform: str, device, dtype, m: int, n: int, k: int,
                            block_size: int) -> None:
    """A jitted matmul of fresh random (m, k) activations and an (n, k) weight quantized on
    `device` against the float64 reference (assert_matmul_close)."""
    w = random_weight(rng, (n, k), np.float32)
    x = random_activations(rng, (m, k), dtype)
    y = jax.jit(jax_nf4.matmul)(jax.device_put(x, device), quantize_on(device, w, block_size))
    packed, absmax = reference.quantize(w, block_size)
    assert_matmul_close(y, x, packed, absmax, block_size, platform)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("m", [1, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("n, k, block_size", [
    (34, 448, 64), (1030, 4160, 64), (1030, 4224, 64), (4096, 1024, 128), (72000, 192, 64)],
    ids=["2-tiles-odd-spans", "tail-tile-65-spans", "tail-tile-66-spans", "256-tiles-block128",
         "2250-tiles-3-spans"])
def test_matmul_gemv_grid(rng, platform, device, dtype, m, n, k, block_size):
    """GEMV grids: a last tile of 16 row pairs only partly filled, an odd number of 64-element
    spans (a load group past the end of a row), and many tiles (on the GPU the byte-pair
    kernel's persistent CTAs take more than one round of work units)."""
    assert_jit_matmul_close(rng, platform, device, dtype, m, n, k, block_size)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("m", [9, 16, 24, 33, 64, 65, 129, 200, 256, 300, 520])
@pytest.mark.parametrize("n, k, block_size", [(34, 448, 64), (1030, 4160, 64), (256, 8192, 128)],
                         ids=["partial-tile-7-spans", "5-row-blocks-65-spans", "k-split"])
def test_matmul_tiled_grid(rng, platform, device, dtype, m, n, k, block_size):
    """The tiled kernel (M = 9..256 on CUDA) and the wgmma kernel (M > 64 on H100 / H200):
    each n-tile count (M <= 16, 32, 64, above) full and partial, several M tiles (partial ones
    too), partial row blocks, stages cut short by the end of K, and K split across CTAs (few
    row blocks, long K)."""
    assert_jit_matmul_close(rng, platform, device, dtype, m, n, k, block_size)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("n, k, m", [(256, 1024, 100), (2304, 2048, 300), (1536, 3072, 300),
                                     (256, 3072, 100)],
                         ids=["2-splits", "3-splits", "5-splits", "6-splits"])
def test_matmul_wgmma_k_split(rng, platform, device, dtype, n, k, m):
    """On an H100 / H200 (132 SMs) the wgmma kernel splits K of these shapes in 2 (a cluster of
    two CTAs adding up over distributed shared memory), 3, 5 and 6 (float32 partial sums): the
    ids; token groups shared by the cluster's CTAs, a last split shorter than the others."""
    assert_jit_matmul_close(rng, platform, device, dtype, m, n, k, 64)


@pytest.mark.parametrize("wgmma", [False, True])
@pytest.mark.parametrize("platform_name, dtype, block_size, rows", [
    ("cuda", jnp.bfloat16, 64, 256), ("cuda", np.float16, 256, 256),
    ("cuda", np.float32, 64, 8), ("cuda", jnp.bfloat16, 48, 8), ("cuda", jnp.bfloat16, 32, 8),
    ("cpu", jnp.bfloat16, 64, 8), ("cpu", np.float32, 64, 8)])
def test_fused_max_rows(monkeypatch, platform_name, dtype, block_size, rows, wgmma):
    """The documented routing: tensor-core kernels to M = 256 on CUDA (every M where the wgmma
    kernel runs), 8 rows elsewhere."""
    from jax_nf4 import _lowering
    monkeypatch.setattr(_lowering, "cuda_wgmma_available", lambda: wgmma)
    expected = sys.maxsize if wgmma and rows == 256 else rows
    assert _lowering.fused_max_rows(platform_name, dtype, block_size) == expected


@pytest.mark.parametrize("m, fused", [(8, True), (9, False)])
def test_matmul_lowering_by_rows_on_cpu(rng, m, fused):
    """On CPU M <= 8 lowers to the fused custom call, larger M to dequantize + an XLA dot."""
    q = jax_nf4.quantize(random_weight(rng, (16, 128), np.float32), 64)
    x = jnp.asarray(random_activations(rng, (m, 128), np.float32))
    with jax.default_device(jax.devices("cpu")[0]):
        hlo = jax.jit(jax_nf4.matmul).lower(x, q).as_text()
    assert ("jax_nf4_nf4_matmul" in hlo) == fused
    assert ("jax_nf4_nf4_dequantize" in hlo) == (not fused)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 40])
def test_matmul_is_deterministic(rng, device, dtype, m):
    q = quantize_on(device, random_weight(rng, (32, 8192), np.float32), 64)  # K split on CUDA
    x = jax.device_put(random_activations(rng, (m, 8192), dtype), device)
    matmul = jax.jit(jax_nf4.matmul)
    first = bits(matmul(x, q))
    for _ in range(3):
        np.testing.assert_array_equal(bits(matmul(x, q)), first)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, "x", np.float32])
def test_linear(rng, platform, device, mode, dtype, bias_dtype):
    n, k = 24, 128
    w = random_weight(rng, (n, k), dtype)
    x = random_activations(rng, (2, 5, k), dtype)
    q = quantize_on(device, w, 64)
    args = [jax.device_put(x, device), q]
    bias = None
    if bias_dtype is not None:
        bias = rng.standard_normal(n).astype(dtype if bias_dtype == "x" else bias_dtype)
        args.append(jax.device_put(bias, device))
    y = call(mode, jax_nf4.linear, *args)
    packed, absmax = reference.quantize(w, 64)
    assert_matmul_close(y, x, packed, absmax, 64, platform, bias=bias)
    if bias is None:
        np.testing.assert_array_equal(bits(y), bits(jax_nf4.matmul(*args)))


# ----------------------------------------------------------------------------- vmap and scan

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_axis", [0, 1])
def test_vmap_matmul_over_activations(rng, platform, device, mode, dtype, x_axis):
    batch, m, n, k = 4, 5, 16, 128
    w = random_weight(rng, (n, k), np.float32)
    x = random_activations(rng, (batch, m, k), dtype)
    y = call(mode, jax.vmap(jax_nf4.matmul, in_axes=(x_axis, None)),
             jax.device_put(np.moveaxis(x, 0, x_axis), device), quantize_on(device, w, 32))
    packed, absmax = reference.quantize(w, 32)
    assert_matmul_close(y, x, packed, absmax, 32, platform)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_matmul_over_stacked_weights(rng, platform, device, mode, dtype):
    layers, m, n, k = 3, 4, 16, 128
    w = random_weight(rng, (layers, n, k), np.float32)
    x = random_activations(rng, (m, k), dtype)
    q = quantize_on(device, w, 64)
    y = call(mode, jax.vmap(jax_nf4.matmul, in_axes=(None, 0)), jax.device_put(x, device), q)
    assert y.shape == (layers, m, n)
    packed, absmax = reference.quantize(w, 64)
    for i in range(layers):
        assert_matmul_close(y[i], x, packed[i], absmax[i], 64, platform)


@pytest.mark.parametrize("m", [1, 8, 150])
def test_vmap_matmul_over_stacked_weights_with_many_tiles(rng, platform, device, m):
    """Two stacked weights of 1250 tiles of 16 row pairs each: on the GPU the byte-pair GEMV's
    persistent CTAs work through units of both weights, their loads running on from a unit of
    one weight into a unit of the next; at M = 150 the wgmma kernel's grid spans both weights
    (its tensor maps have the stack as their third dimension)."""
    layers, n, k = 2, 40000, 192
    w = random_weight(rng, (layers, n, k), np.float32)
    x = random_activations(rng, (m, k), np.dtype(jnp.bfloat16))
    q = quantize_on(device, w, 64)
    y = jax.jit(jax.vmap(jax_nf4.matmul, in_axes=(None, 0)))(jax.device_put(x, device), q)
    packed, absmax = reference.quantize(w, 64)
    for i in range(layers):
        assert_matmul_close(y[i], x, packed[i], absmax[i], 64, platform)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_matmul_over_activations_and_weights(rng, platform, device, mode, dtype):
    m, n, k = 3, 8, 96
    w = [random_weight(rng, (n, k), dtype) for _ in range(2)]
    q = jax.tree.map(lambda *a: jnp.stack(a), *(quantize_on(device, wi, 32) for wi in w))
    x = random_activations(rng, (2, m, k), dtype)
    y = call(mode, jax.vmap(jax_nf4.matmul), jax.device_put(x, device), q)
    assert y.shape == (2, m, n)
    for i in range(2):
        packed, absmax = reference.quantize(w[i], 32)
        assert_matmul_close(y[i], x[i], packed, absmax, 32, platform)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_vmap_matmul_over_a_grid_of_weights(rng, platform, device, mode, dtype):
    m, n, k = 2, 8, 64
    w = random_weight(rng, (2, 3, n, k), np.float32)
    x = random_activations(rng, (m, k), dtype)
    inner = jax.vmap(jax_nf4.matmul, in_axes=(None, 0))
    y = call(mode, jax.vmap(inner, in_axes=(None, 0)), jax.device_put(x, device),
             quantize_on(device, w, 32))
    assert y.shape == (2, 3, m, n)
    packed, absmax = reference.quantize(w, 32)
    for i in range(2):
        for j in range(3):
            assert_matmul_close(y[i, j], x, packed[i, j], absmax[i, j], 32, platform)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_vmap_matmul_over_weights_then_activations(rng, platform, device, mode, dtype):
    layers, batch, m, n, k = 2, 3, 4, 8, 64
    w = random_weight(rng, (layers, n, k), np.float32)
    x = random_activations(rng, (batch, m, k), dtype)
    inner = jax.vmap(jax_nf4.matmul, in_axes=(0, None))
    y = call(mode, jax.vmap(inner, in_axes=(None, 0)), jax.device_put(x, device),
             quantize_on(device, w, 32))
    assert y.shape == (layers, batch, m, n)
    packed, absmax = reference.quantize(w, 32)
    for i in range(layers):
        assert_matmul_close(y[i], x, packed[i], absmax[i], 32, platform)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_axis", [0, 1])
def test_vmap_quantize(rng, device, mode, dtype, w_axis):
    w = random_weight(rng, (3, 6, 64), dtype)
    quantize = jax.vmap(lambda w: jax_nf4.quantize(w, 32), in_axes=w_axis)
    q = call(mode, quantize, jax.device_put(np.moveaxis(w, 0, w_axis), device))
    assert (q.shape, q.stack_shape, q.dtype) == ((6, 64), (3,), dtype)
    assert_weight_equals_reference(q, w, 32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_dequantize(rng, device, mode, dtype):
    packed, absmax = random_codes_and_scales(rng, (3, 6, 64), 32)
    q = jax.device_put(NF4Weight(packed, absmax, (6, 64), 32), device)
    out = call(mode, jax.vmap(functools.partial(jax_nf4.dequantize, dtype=dtype)), q)
    with np.errstate(over="ignore"):
        want = reference.dequantize(packed, absmax, 32, dtype)
    assert out.dtype == dtype and out.shape == (3, 6, 64)
    np.testing.assert_array_equal(bits(out), bits(want))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_linear_over_stacked_weights_and_biases(rng, platform, device, mode, dtype):
    layers, m, n, k = 3, 4, 16, 128
    w = random_weight(rng, (layers, n, k), dtype)
    x = random_activations(rng, (m, k), dtype)
    bias = rng.standard_normal((layers, n)).astype(dtype)
    y = call(mode, jax.vmap(jax_nf4.linear, in_axes=(None, 0, 0)), jax.device_put(x, device),
             quantize_on(device, w, 64), jax.device_put(bias, device))
    assert y.shape == (layers, m, n)
    packed, absmax = reference.quantize(w, 64)
    for i in range(layers):
        assert_matmul_close(y[i], x, packed[i], absmax[i], 64, platform, bias=bias[i])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_over_stacked_weights(rng, platform, device, mode, dtype):
    layers, m, k = 3, 4, 64  # square layers, chained: h <- h @ W_l.T
    w = (rng.standard_normal((layers, k, k)) / np.sqrt(k)).astype(np.float32)
    x = random_activations(rng, (m, k), dtype)

    def forward(x, q):
        def layer(h, q_l):
            h = jax_nf4.matmul(h, q_l)
            return h, h
        return jax.lax.scan(layer, x, q)

    last, hs = call(mode, forward, jax.device_put(x, device), quantize_on(device, w, 32))
    assert hs.shape == (layers, m, k)
    np.testing.assert_array_equal(bits(last), bits(hs[-1]))
    packed, absmax = reference.quantize(w, 32)
    inputs = [x] + [np.asarray(h) for h in hs[:-1]]
    for i in range(layers):
        assert_matmul_close(hs[i], inputs[i], packed[i], absmax[i], 32, platform)


@pytest.mark.parametrize("m", [1, 5])
def test_back_to_back_matmuls_read_what_the_kernel_before_wrote(rng, platform, device, m):
    """Every operand of a matmul may be the output of the kernel right before it: a chain in
    which each layer's weight is quantized, and its input computed, just before the matmul."""
    layers, k = 6, 2048
    dtype = np.dtype(jnp.bfloat16)
    w = (rng.standard_normal((layers, k, k)) / np.sqrt(k)).astype(dtype)
    x = random_activations(rng, (m, k), dtype)

    def forward(h, w):
        hs = []
        for layer in range(layers):
            h = jax_nf4.matmul(h, jax_nf4.quantize(w[layer], 64))
            hs.append(h)
        return hs

    hs = jax.jit(forward)(jax.device_put(x, device), jax.device_put(w, device))
    packed, absmax = reference.quantize(w, 64)
    inputs = [x] + [np.asarray(h) for h in hs[:-1]]
    for layer in range(layers):
        assert_matmul_close(hs[layer], inputs[layer], packed[layer], absmax[layer], 64, platform)


# ----------------------------------------------------------------------------- zero sizes

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, m", [(0, 64, 5), (4, 0, 5), (64, 0, 40), (0, 0, 3)])
def test_zero_sized_weight(rng, device, mode, dtype, n, k, m):
    # With K = 0 the product is an empty sum: every output must be written as zero.
    w = jax.device_put(np.zeros((n, k), dtype), device)
    q = call(mode, lambda w: jax_nf4.quantize(w, 32), w)
    assert q.packed.shape == (n // 2, k) and q.absmax.shape == (n, k // 32)
    dense = call(mode, jax_nf4.dequantize, q)
    assert dense.shape == (n, k) and dense.dtype == dtype
    x = jax.device_put(random_activations(rng, (m, k), dtype), device)
    y = call(mode, jax_nf4.matmul, x, q)
    assert y.shape == (m, n) and y.dtype == dtype
    np.testing.assert_array_equal(bits(y), np.zeros((m, n), f"u{dtype.itemsize}"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_with_no_rows(rng, device, mode, dtype):
    q = quantize_on(device, random_weight(rng, (8, 64), dtype), 32)
    x = jax.device_put(np.ones((0, 64), dtype), device)
    y = call(mode, jax_nf4.matmul, x, q)
    assert y.shape == (0, 8) and y.dtype == dtype
    y = call(mode, jax_nf4.linear, x, q, jax.device_put(np.ones(8, dtype), device))
    assert y.shape == (0, 8) and y.dtype == dtype


# ----------------------------------------------------------------------------- NF4Weight

def test_weight_flatten_unflatten(rng, device):
    q = quantize_on(device, random_weight(rng, (8, 64), jnp.bfloat16), 32)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 2 and leaves[0] is q.packed and leaves[1] is q.absmax
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, NF4Weight)
    assert (back.shape, back.block_size, back.dtype) == ((8, 64), 32, np.dtype(jnp.bfloat16))
    assert back.packed is q.packed and back.absmax is q.absmax
    other = quantize_on(device, random_weight(rng, (8, 64), jnp.bfloat16), 64)
    assert jax.tree.structure(other) != treedef  # block_size is static metadata


def test_weight_tree_map(rng, platform, device):
    w = random_weight(rng, (8, 64), np.float16)
    q = quantize_on(device, w, 32)
    host = jax.tree.map(np.asarray, q)
    assert isinstance(host, NF4Weight) and isinstance(host.packed, np.ndarray)
    assert (host.shape, host.block_size, host.dtype) == (q.shape, q.block_size, q.dtype)
    doubled = jax.tree.map(lambda a: a * 2 if a.dtype == np.float32 else a, q)
    np.testing.assert_array_equal(np.asarray(doubled.absmax), 2 * np.asarray(q.absmax))
    x = jax.device_put(random_activations(rng, (3, 64), np.float16), device)
    np.testing.assert_array_equal(bits(jax_nf4.dequantize(jax.device_put(host, device))),
                                  bits(jax_nf4.dequantize(q)))
    packed, absmax = reference.quantize(w, 32)
    assert_matmul_close(jax_nf4.matmul(x, doubled), np.asarray(x), packed, 2 * absmax, 32,
                        platform)


def test_weight_pickle_round_trip(rng, device):
    q = quantize_on(device, random_weight(rng, (8, 64), jnp.bfloat16), 32)
    back = pickle.loads(pickle.dumps(q))
    assert isinstance(back, NF4Weight)
    assert (back.shape, back.block_size, back.dtype) == (q.shape, q.block_size, q.dtype)
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(q.packed))
    np.testing.assert_array_equal(bits(back.absmax), bits(q.absmax))
    x = jax.device_put(random_activations(rng, (3, 64), jnp.bfloat16), device)
    np.testing.assert_array_equal(bits(jax_nf4.matmul(x, jax.device_put(back, device))),
                                  bits(jax_nf4.matmul(x, q)))


def test_weight_stacking_equals_quantizing_the_stack(rng, platform, device):
    w = random_weight(rng, (2, 8, 64), np.float32)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(quantize_on(device, wi, 32) for wi in w))
    assert isinstance(stacked, NF4Weight)
    assert (stacked.shape, stacked.stack_shape, stacked.block_size) == ((8, 64), (2,), 32)
    assert_weight_equals_reference(stacked, w, 32)
    first = jax.tree.map(lambda a: a[0], stacked)
    assert first.stack_shape == ()
    x = jax.device_put(random_activations(rng, (3, 64), np.float32), device)
    packed, absmax = reference.quantize(w[0], 32)
    assert_matmul_close(jax_nf4.matmul(x, first), np.asarray(x), packed, absmax, 32, platform)


def test_weight_repr(rng):
    w = random_weight(rng, (3, 8, 64), jnp.bfloat16)
    assert repr(jax_nf4.quantize(w[0], 32)) == (
        "NF4Weight(shape=(8, 64), block_size=32, dtype=bfloat16)")
    assert repr(jax_nf4.quantize(w, 64)) == (
        "NF4Weight(shape=(8, 64), stack=(3,), block_size=64, dtype=bfloat16)")


@pytest.mark.parametrize("stack", [(), (3,), (2, 2)])
def test_weight_nbytes(rng, stack):
    q = jax_nf4.quantize(random_weight(rng, stack + (8, 128), np.float32), 32)
    per_matrix = 8 * 128 // 2 + 4 * 8 * (128 // 32)
    assert q.nbytes == per_matrix * int(np.prod(stack))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_defaults_to_the_quantized_dtype(rng, device, dtype):
    w = random_weight(rng, (6, 128), dtype)
    q = quantize_on(device, w, 64)
    assert q.dtype == dtype
    out = jax_nf4.dequantize(q)
    packed, absmax = reference.quantize(w, 64)
    assert out.dtype == dtype
    np.testing.assert_array_equal(bits(out), bits(reference.dequantize(packed, absmax, 64, dtype)))
