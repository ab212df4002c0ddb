"""NumPy reference for the NF4 format (layout A): the ground truth the kernels are tested against.

Follows ``shared/NF4_FORMAT.md`` exactly: float32 reciprocal of the block absmax, nearest code
with ties to the lower code (strict ``>`` against the 15 float32 midpoints), code 7 for an
all-zero block, and dequantization as one float32 product rounded once to the output dtype.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CODEBOOK", "MIDPOINTS", "quantize", "dequantize", "dequantize_f32", "matmul",
           "pack_pairs", "unpack_pairs"]

#: The 16 NF4 code values (float32), index = 4-bit code.
CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
CODEBOOK.setflags(write=False)

#: Float32 midpoints between neighbouring codes (bitsandbytes' decision-tree constants).
MIDPOINTS = ((CODEBOOK[:-1] + CODEBOOK[1:]) * np.float32(0.5)).astype(np.float32)
MIDPOINTS.setflags(write=False)

_ZERO_CODE = 7


def _as_float32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


def pack_pairs(codes: np.ndarray) -> np.ndarray:
    """``uint8[..., N, K]`` codes (0..15) -> ``uint8[..., N/2, K]``; row 2j low, 2j+1 high."""
    codes = np.asarray(codes, dtype=np.uint8)
    return (codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)).astype(np.uint8)


def unpack_pairs(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_pairs`: ``uint8[..., N/2, K]`` -> codes ``uint8[..., N, K]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty(packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]), np.uint8)
    codes[..., 0::2, :] = packed & 15
    codes[..., 1::2, :] = packed >> 4
    return codes


def quantize(w: np.ndarray, block_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Quantizes ``w[..., N, K]`` (any float dtype) to ``(packed uint8[..., N/2, K],
    absmax float32[..., N, K/block_size])``."""
    w32 = _as_float32(w)
    *lead, n, k = w32.shape
    if n % 2 or k % block_size:
        raise ValueError(f"need N even and K a multiple of block_size, got {(n, k)}, {block_size}")
    blocks = w32.reshape(*lead, n, k // block_size, block_size)
    absmax = np.max(np.abs(blocks), axis=-1, initial=np.float32(0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1) / absmax).astype(np.float32)
        xn = (blocks * inv[..., None]).astype(np.float32)
    codes = np.sum(xn[..., None] > MIDPOINTS, axis=-1).astype(np.uint8)
    codes = np.where((absmax == 0)[..., None], np.uint8(_ZERO_CODE), codes)
    return pack_pairs(codes.reshape(*lead, n, k)), absmax


def dequantize_f32(packed: np.ndarray, absmax: np.ndarray, block_size: int) -> np.ndarray:
    """Float32 ``CODEBOOK[code] * absmax`` of shape ``[..., N, K]`` (before output rounding)."""
    codes = unpack_pairs(packed)
    scales = np.repeat(np.asarray(absmax, np.float32), block_size, axis=-1)
    return (CODEBOOK[codes] * scales).astype(np.float32)


def dequantize(packed: np.ndarray, absmax: np.ndarray, block_size: int,
               dtype=np.float32) -> np.ndarray:
    """Dequantized ``[..., N, K]`` in ``dtype``: one float32 product, rounded once."""
    return dequantize_f32(packed, absmax, block_size).astype(dtype)


def matmul(x: np.ndarray, packed: np.ndarray, absmax: np.ndarray,
           block_size: int) -> np.ndarray:
    """Float64 ``x[..., K] @ dequantize(W)[N, K].T`` -> ``float64[..., N]``."""
    w = dequantize_f32(packed, absmax, block_size).astype(np.float64)
    return np.asarray(x).astype(np.float64) @ w.T

