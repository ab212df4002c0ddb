"""jax_nf4.reference against an independent, straightforward reading of shared/NF4_FORMAT.md."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jax_nf4 import reference

# The codebook table of NF4_FORMAT.md, as written there.
FORMAT_CODEBOOK = np.array([
    "-1.0", "-0.6961928009986877", "-0.5250730514526367", "-0.39491748809814453",
    "-0.28444138169288635", "-0.18477343022823334", "-0.09105003625154495", "0.0",
    "0.07958029955625534", "0.16093020141124725", "0.24611230194568634", "0.33791524171829224",
    "0.44070982933044434", "0.5626170039176941", "0.7229568362236023", "1.0"]).astype(np.float32)

# bitsandbytes' decision-tree literals (the 15 midpoints its quantizer compares against).
BNB_MIDPOINTS = np.array([
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011], dtype=np.float32)

ZERO_CODE = 7
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(ml_dtypes.bfloat16, id="bf16"),
                pytest.param(np.float16, id="f16")]


# ----------------------------------------------------------------------------- independent model

def nearest_code(xn: np.float32) -> int:
    """The code nearest to one normalized float32 value; an exact tie at a bitsandbytes midpoint
    goes to the lower code."""
    ties = np.flatnonzero(BNB_MIDPOINTS == xn)
    if ties.size:
        return int(ties[0])
    return int(np.argmin(np.abs(FORMAT_CODEBOOK.astype(np.float64) - np.float64(xn))))


def quantize_model(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Element-by-element layout-A quantizer: codes uint8[N, K] and absmax float32[N, K/bs]."""
    w = np.asarray(w).astype(np.float32)
    n, k = w.shape
    codes = np.empty((n, k), np.uint8)
    absmax = np.empty((n, k // block_size), np.float32)
    for row in range(n):
        for b in range(k // block_size):
            block = w[row, b * block_size:(b + 1) * block_size]
            amax = np.float32(np.max(np.abs(block.astype(np.float64))))
            absmax[row, b] = amax
            for i, v in enumerate(block):
                if amax == 0:
                    code = ZERO_CODE
                else:
                    code = nearest_code(np.float32(v * (np.float32(1) / amax)))
                codes[row, b * block_size + i] = code
    return codes, absmax


def pack_model(codes: np.ndarray) -> np.ndarray:
    """Byte (j, k) = code(2j, k) in the low nibble | code(2j+1, k) in the high nibble."""
    n, k = codes.shape
    packed = np.empty((n // 2, k), np.uint8)
    for j in range(n // 2):
        for col in range(k):
            packed[j, col] = int(codes[2 * j, col]) | (int(codes[2 * j + 1, col]) << 4)
    return packed


def dequantize_model(codes: np.ndarray, absmax: np.ndarray, block_size: int,
                     dtype) -> np.ndarray:
    """codebook[code] * absmax: the float64 product of two float32 values is exact, so rounding
    it to float32 gives the float32 product; then one rounding to dtype."""
    scales = np.repeat(absmax.astype(np.float64), block_size, axis=-1)
    return (FORMAT_CODEBOOK.astype(np.float64)[codes] * scales).astype(np.float32).astype(dtype)


def random_weight(rng: np.random.Generator, n: int, k: int, dtype) -> np.ndarray:
    """Normal weights with row scales spread over four decades (within float16 range)."""
    scales = 10.0 ** rng.uniform(-2, 2, size=(n, 1))
    return (rng.standard_normal((n, k)) * scales).astype(np.float32).astype(dtype)


# ----------------------------------------------------------------------------- constants

def test_codebook_is_the_format_table():
    assert reference.CODEBOOK.dtype == np.float32
    np.testing.assert_array_equal(reference.CODEBOOK.view(np.uint32),
                                  FORMAT_CODEBOOK.view(np.uint32))


def test_midpoints_are_bitsandbytes_literals():
    assert reference.MIDPOINTS.dtype == np.float32
    np.testing.assert_array_equal(reference.MIDPOINTS.view(np.uint32),
                                  BNB_MIDPOINTS.view(np.uint32))


def test_midpoints_lie_strictly_between_neighbouring_codes():
    assert np.all(FORMAT_CODEBOOK[:-1] < BNB_MIDPOINTS)
    assert np.all(BNB_MIDPOINTS < FORMAT_CODEBOOK[1:])


def test_constants_are_read_only():
    with pytest.raises(ValueError, match="read-only"):
        reference.CODEBOOK[0] = 0
    with pytest.raises(ValueError, match="read-only"):
        reference.MIDPOINTS[0] = 0


# ----------------------------------------------------------------------------- quantize

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, block_size", [(2, 32, 32), (6, 128, 64), (4, 96, 48)])
def test_quantize_matches_model_on_random_data(rng, dtype, n, k, block_size):
    w = random_weight(rng, n, k, dtype)
    packed, absmax = reference.quantize(w, block_size)
    codes, want_absmax = quantize_model(w, block_size)
    assert packed.dtype == np.uint8 and packed.shape == (n // 2, k)
    assert absmax.dtype == np.float32 and absmax.shape == (n, k // block_size)
    np.testing.assert_array_equal(absmax.view(np.uint32), want_absmax.view(np.uint32))
    np.testing.assert_array_equal(packed, pack_model(codes))


def test_quantize_exact_midpoints_go_to_the_lower_code():
    # Row 0: one block with absmax 1.0 holding every midpoint; row 1: each midpoint's float32
    # neighbours, which round away from the tie. Scaled by 2**-3 in a second block (exact).
    below = np.nextafter(BNB_MIDPOINTS, np.float32(-np.inf))
    above = np.nextafter(BNB_MIDPOINTS, np.float32(np.inf))
    row0 = np.concatenate([BNB_MIDPOINTS, [1.0], np.full(16, 0.5, np.float32)])
    row1 = np.concatenate([below, above, [-1.0, 0.25]])
    w = np.stack([row0, row1]).astype(np.float32)
    w = np.concatenate([w, w * np.float32(2.0 ** -3)], axis=1)
    packed, absmax = reference.quantize(w, block_size=32)
    codes = reference.unpack_pairs(packed)
    np.testing.assert_array_equal(absmax, [[1.0, 2.0 ** -3], [1.0, 2.0 ** -3]])
    for offset in (0, 32):
        np.testing.assert_array_equal(codes[0, offset:offset + 15], np.arange(15))
        np.testing.assert_array_equal(codes[1, offset:offset + 15], np.arange(15))
        np.testing.assert_array_equal(codes[1, offset + 15:offset + 30], np.arange(1, 16))
    np.testing.assert_array_equal(packed, pack_model(quantize_model(w, 32)[0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_all_zero_block_gives_code_7_and_absmax_0(rng, dtype):
    w = random_weight(rng, 4, 192, dtype)
    w[0, 64:128] = 0
    w[3, :64] = -0.0
    packed, absmax = reference.quantize(w, block_size=64)
    codes = reference.unpack_pairs(packed)
    for row, block in [(0, 1), (3, 0)]:
        assert absmax[row, block] == 0 and not np.signbit(absmax[row, block])
        np.testing.assert_array_equal(codes[row, block * 64:(block + 1) * 64], ZERO_CODE)
    assert np.all(absmax[1:3] > 0)
    want_codes, want_absmax = quantize_model(w, 64)
    np.testing.assert_array_equal(absmax.view(np.uint32), want_absmax.view(np.uint32))
    np.testing.assert_array_equal(codes, want_codes)


def test_quantize_block_with_nan_does_not_crash(rng):
    # NaN is the caller's problem: its block's scale is NaN, every other block is unaffected.
    w = random_weight(rng, 2, 128, np.float32)
    clean = w.copy()
    w[1, 70] = np.nan
    with np.errstate(all="raise"):
        packed, absmax = reference.quantize(w, block_size=64)
    assert np.isnan(absmax[1, 1])
    want_codes, want_absmax = quantize_model(clean, 64)
    codes = reference.unpack_pairs(packed)
    other_blocks = ~np.isnan(absmax)
    assert other_blocks.sum() == 3
    np.testing.assert_array_equal(absmax[other_blocks], want_absmax[other_blocks])
    other_elements = np.repeat(other_blocks, 64, axis=1)
    np.testing.assert_array_equal(codes[other_elements], want_codes[other_elements])


def test_quantize_keeps_leading_dims(rng):
    w = random_weight(rng, 12, 64, np.float32).reshape(3, 4, 64)
    packed, absmax = reference.quantize(w, block_size=32)
    assert packed.shape == (3, 2, 64) and absmax.shape == (3, 4, 2)
    for i in range(3):
        one_packed, one_absmax = reference.quantize(w[i], block_size=32)
        np.testing.assert_array_equal(packed[i], one_packed)
        np.testing.assert_array_equal(absmax[i], one_absmax)


# ----------------------------------------------------------------------------- packing

def test_pack_puts_even_row_in_low_nibble():
    codes = np.array([[1, 2, 15], [3, 4, 0], [7, 8, 9], [10, 11, 12]], np.uint8)
    want = np.array([[0x31, 0x42, 0x0F], [0xA7, 0xB8, 0xC9]], np.uint8)
    np.testing.assert_array_equal(reference.pack_pairs(codes), want)
    np.testing.assert_array_equal(reference.unpack_pairs(want), codes)


def test_pack_unpack_round_trip(rng):
    codes = rng.integers(0, 16, size=(2, 6, 40), dtype=np.uint8)
    packed = reference.pack_pairs(codes)
    np.testing.assert_array_equal(packed, np.stack([pack_model(c) for c in codes]))
    np.testing.assert_array_equal(reference.unpack_pairs(packed), codes)
    every_byte = np.arange(256, dtype=np.uint8).reshape(2, 128)
    np.testing.assert_array_equal(reference.pack_pairs(reference.unpack_pairs(every_byte)),
                                  every_byte)


# ----------------------------------------------------------------------------- dequantize / matmul

@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_model(rng, dtype):
    # Random codes and scales over a range that reaches float16 subnormals and overflow.
    codes = rng.integers(0, 16, size=(6, 128), dtype=np.uint8)
    absmax = (2.0 ** rng.uniform(-30, 20, size=(6, 4))).astype(np.float32)
    absmax[0, :2] = [2.0 ** 19, 2.0 ** -20]
    with np.errstate(over="ignore"):  # float16 overflows to inf, as it should
        out = reference.dequantize(reference.pack_pairs(codes), absmax, 32, dtype)
        want = dequantize_model(codes, absmax, 32, dtype)
    assert out.dtype == np.dtype(dtype) and out.shape == (6, 128)
    np.testing.assert_array_equal(out.view(f"u{out.itemsize}"), want.view(f"u{want.itemsize}"))


def test_dequantize_f32_is_the_float32_product(rng):
    codes = rng.integers(0, 16, size=(4, 64), dtype=np.uint8)
    absmax = rng.uniform(0.01, 10, size=(4, 2)).astype(np.float32)
    out = reference.dequantize_f32(reference.pack_pairs(codes), absmax, 32)
    want = FORMAT_CODEBOOK[codes] * np.repeat(absmax, 32, axis=1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))


def test_matmul_is_float64_product_with_dequantized_weight(rng):
    w = random_weight(rng, 6, 128, np.float32)
    packed, absmax = reference.quantize(w, block_size=64)
    x = rng.standard_normal((2, 3, 128)).astype(ml_dtypes.bfloat16)
    out = reference.matmul(x, packed, absmax, 64)
    w_deq = dequantize_model(reference.unpack_pairs(packed), absmax, 64, np.float64)
    want = np.einsum("abk,nk->abn", x.astype(np.float64), w_deq)
    assert out.dtype == np.float64 and out.shape == (2, 3, 6)
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=0)


def test_quantization_error_is_within_half_the_widest_code_gap(rng):
    w = random_weight(rng, 8, 256, np.float32)
    packed, absmax = reference.quantize(w, block_size=64)
    w_deq = reference.dequantize_f32(packed, absmax, 64).astype(np.float64)
    half_gap = np.max(np.diff(FORMAT_CODEBOOK.astype(np.float64))) / 2
    bound = half_gap * np.repeat(absmax.astype(np.float64), 64, axis=1) * (1 + 1e-6)
    assert np.all(np.abs(w_deq - w) <= bound)
