"""Shape and dtype rules of the NF4 ops, with errors that name the argument, what it got and
what it needs. Used by the public API (user-facing names) and by abstract evaluation."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

#: Activation / dense-weight dtypes the kernels take.
ACTIVATION_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def check_block_size(block_size: Any, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"{name} must be positive, got {block_size}")
    return int(block_size)


def check_activation_dtype(dtype: Any, name: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in ACTIVATION_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {dt.name}")
    return dt


def check_nk(n: int, k: int, block_size: int, name: str) -> None:
    if n % 2:
        raise ValueError(f"{name}: N (output features) must be even for row-pair packing, got "
                         f"N = {n}")
    if k % block_size:
        raise ValueError(f"{name}: K (input features) = {k} must be a multiple of block_size = "
                         f"{block_size}")


def check_quantize(shape: tuple[int, ...], dtype: Any, block_size: int,
                   name: str = "w") -> tuple[int, ...]:
    """Checks a dense weight ``[..., N, K]`` for quantization; returns its shape."""
    block_size = check_block_size(block_size)
    if len(shape) < 2:
        raise ValueError(f"{name} must have shape [..., N, K] (rank >= 2), got shape "
                         f"{tuple(shape)}")
    check_activation_dtype(dtype, name)
    check_nk(shape[-2], shape[-1], block_size, f"{name} of shape {tuple(shape)}")
    return tuple(shape)


def check_weight_operands(packed: Any, absmax: Any, block_size: int,
                          op: str) -> tuple[int, int, int]:
    """Checks primitive operands ``packed[G, N/2, K]``, ``absmax[G, N, K/bs]``; returns (G, N, K)."""
    block_size = check_block_size(block_size)
    if packed.ndim != 3 or np.dtype(packed.dtype) != np.uint8:
        raise ValueError(f"{op}: packed must be uint8[G, N/2, K], got "
                         f"{np.dtype(packed.dtype).name}{list(packed.shape)}")
    g, half_n, k = packed.shape
    n = 2 * half_n
    if k % block_size:
        raise ValueError(f"{op}: K = {k} must be a multiple of block_size = {block_size}")
    want = (g, n, k // block_size)
    if tuple(absmax.shape) != want or np.dtype(absmax.dtype) != np.float32:
        raise ValueError(f"{op}: absmax must be float32{list(want)}, got "
                         f"{np.dtype(absmax.dtype).name}{list(absmax.shape)}")
    return g, n, k
