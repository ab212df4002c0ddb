"""Shape and dtype rules of the NF4 ops, with errors that name the argument, what it got and
what it needs. Used by the public API (user-facing names) and by abstract evaluation."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

#: Activation / dense-weight dtypes the kernels take.
ACTIVATION_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def _describe_array(a: Any) -> str:
    """dtype[shape] of an array or abstract value, e.g. ``bfloat16[1, 8, 6, 128]``."""
    return f"{np.dtype(a.dtype).name}{list(a.shape)}"


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


def check_weight_operands(packed: Any, scales: tuple, block_size: int,
                          op: str) -> tuple[int, int, int]:
    """Checks primitive operands ``packed[G, N/2, K]`` and the block scales, either
    ``(absmax f32[G, N, K/bs],)`` or double-quantized ``(codes u8[G, N, K/bs],
    nested_absmax f32[G, ceil(N*K/bs/256)], table f32[G, 256], offset f32[G])``;
    returns (G, N, K)."""
    block_size = check_block_size(block_size)
    if packed.ndim != 3 or np.dtype(packed.dtype) != np.uint8:
        raise ValueError(f"{op}: packed must be uint8[G, N/2, K], got "
                         f"{_describe_array(packed)}")
    g, half_n, k = packed.shape
    n = 2 * half_n
    if k % block_size:
        raise ValueError(f"{op}: K = {k} must be a multiple of block_size = {block_size}")
    blocks = k // block_size
    if len(scales) == 1:
        want = {"absmax": ((g, n, blocks), np.float32)}
    elif len(scales) == 4:
        want = {"absmax codes": ((g, n, blocks), np.uint8),
                "nested_absmax": ((g, -(-n * blocks // 256)), np.float32),
                "table": ((g, 256), np.float32), "offset": ((g,), np.float32)}
    else:
        raise ValueError(f"{op}: expected 1 (absmax) or 4 (double-quantized) scale operands, "
                         f"got {len(scales)}")
    for (name, (shape, dtype)), a in zip(want.items(), scales):
        if tuple(a.shape) != shape or np.dtype(a.dtype) != dtype:
            raise ValueError(f"{op}: {name} must be {np.dtype(dtype).name}{list(shape)}, got "
                             f"{_describe_array(a)}")
    return g, n, k


def check_decode_attention(qkv: Any, k_cache: Any, v_cache: Any,
                           pos: Any) -> tuple[int, int, int, int, np.dtype]:
    """Checks the decode-attention operands ``qkv[B, H_kv, G + 2, D]``, ``k_cache`` and
    ``v_cache`` ``[B, T, H_kv, D]`` of qkv's dtype and ``pos`` an int32 scalar; returns
    (B, H_kv, G, D, dtype)."""
    op = "decode_attention"
    if qkv.ndim != 4:
        raise ValueError(f"{op}: qkv must be [B, H_kv, G + 2, D] (rank 4: per KV head its G "
                         f"query heads, the new key and the new value), got "
                         f"{_describe_array(qkv)}")
    dtype = check_activation_dtype(qkv.dtype, f"{op}: qkv")
    b, h, g2, d = qkv.shape
    if g2 < 3:
        raise ValueError(f"{op}: qkv's dim 2 is G + 2 (G >= 1 query heads, the new key, the new "
                         f"value) and must be >= 3, got {_describe_array(qkv)}")
    if d < 2 or d % 2:
        raise ValueError(f"{op}: the head dim D (qkv's last dim) must be even and positive "
                         f"(rotary pairs), got {_describe_array(qkv)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.ndim != 4 or cache.shape[0] != b or cache.shape[2] != h or cache.shape[3] != d
                or cache.shape[1] < 1):
            raise ValueError(f"{op}: {name} must be [B, T, H_kv, D] = [{b}, T >= 1, {h}, {d}] "
                             f"to match qkv {_describe_array(qkv)}, got "
                             f"{_describe_array(cache)}")
        if np.dtype(cache.dtype) != dtype:
            raise TypeError(f"{op}: {name} must have qkv's dtype {dtype.name}, got "
                            f"{_describe_array(cache)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must have the same shape, got "
                         f"{_describe_array(k_cache)} and {_describe_array(v_cache)}")
    if pos.ndim != 0 or np.dtype(pos.dtype) != np.int32:
        raise TypeError(f"{op}: pos must be an int32 scalar (the new token's position), got "
                        f"{_describe_array(pos)}")
    return b, h, g2 - 2, d, dtype
