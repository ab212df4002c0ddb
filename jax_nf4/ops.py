"""Public ops: NF4 quantize, dequantize, matmul, linear; the fused decode-attention step."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jax_nf4 import _lowering  # noqa: F401  (registers the lowerings)
from jax_nf4 import _shapes
from jax_nf4._primitives import (decode_attention_p, nf4_dequantize_p, nf4_matmul_p,
                                 nf4_quantize_p)
from jax_nf4._weight import NF4Weight
from jax_nf4.double_quant import NESTED_BLOCK_SIZE, DoubleQuantScales, quantize_scales

__all__ = ["quantize", "dequantize", "matmul", "linear", "decode_attention"]


def _check_weight(q: Any, name: str = "q") -> NF4Weight:
    if not isinstance(q, NF4Weight):
        raise TypeError(f"{name} must be an NF4Weight (from jax_nf4.quantize), got "
                        f"{type(q).__name__}")
    return q


def _check_matmul_args(x: ArrayLike, q: Any, op: str,
                       map_with: str = "jax.vmap or lax.scan") -> tuple[jax.Array, NF4Weight]:
    """Checks the arguments of a matmul ``op``: activations ``[..., K]`` of an activation dtype
    and one (unstacked) NF4Weight of shape ``(N, K)``; ``map_with`` says how to map stacks."""
    q = _check_weight(q)
    x = jnp.asarray(x)
    k = q.shape[1]
    if q.stack_shape:
        raise ValueError(f"q is a stack of weights (stack dims {q.stack_shape}, shape {q.shape}); "
                         f"{op} takes one weight: map over the stack with {map_with}")
    if x.ndim < 1:
        raise ValueError(f"x must have shape [..., K] with K = {k}, got a scalar")
    _shapes.check_activation_dtype(x.dtype, "x")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the weight "
                         f"of shape (N, K) = {q.shape} needs K = {k}")
    return x, q


def _scale_operands(q: NF4Weight, groups: int) -> tuple[jax.Array, ...]:
    """The primitives' scale operands with the stack folded into one group dim: ``(absmax,)``,
    or the four double-quantized arrays, which the kernels decode on the fly (scales with a
    nested block size other than bitsandbytes' 256 are decoded here first)."""
    def fold(a: jax.Array, inner: int) -> jax.Array:  # keep the inner dims for the checks
        return a.reshape((groups,) + tuple(a.shape[a.ndim - inner:]))

    dq = q.absmax
    if not isinstance(dq, DoubleQuantScales) or dq.nested_block_size != NESTED_BLOCK_SIZE:
        return (fold(q.scales(), 2),)
    return (fold(dq.codes, 2), fold(dq.nested_absmax, 1), fold(dq.table, 1), fold(dq.offset, 0))


def quantize(w: ArrayLike, block_size: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantizes a dense weight to NF4 (as a custom call; bit-identical to ``reference``).

    Args:
      w: ``[..., N, K]`` float32, bfloat16 or float16 (float64 is cast to float32), N even,
        K a multiple of ``block_size``. Leading dims give a stacked weight.
      block_size: elements of one row sharing a scale (64 is QLoRA's default).
      double_quant: also quantize the block scales to 8 bits, as bitsandbytes'
        ``compress_statistics`` / ``bnb_4bit_use_double_quant`` does (see
        :mod:`jax_nf4.double_quant`): the NF4 codes are the same, the scales shrink from 32 to
        about 8 bits per block. Each matrix of a stack gets its own offset.

    Returns:
      An :class:`NF4Weight` with ``packed uint8[..., N/2, K]`` and
      ``absmax float32[..., N, K/block_size]`` (a :class:`~jax_nf4.double_quant.DoubleQuantScales`
      with ``double_quant=True``); its ``dtype`` is ``w``'s dtype.
    """
    w = jnp.asarray(w)
    if w.dtype == np.float64:
        w = w.astype(np.float32)
    shape = _shapes.check_quantize(w.shape, w.dtype, block_size)
    *lead, n, k = shape
    g = math.prod(lead)
    packed, absmax = nf4_quantize_p.bind(w.reshape(g, n, k), block_size=int(block_size))
    absmax = absmax.reshape(*lead, n, k // block_size)
    if double_quant:
        absmax = quantize_scales(absmax, NESTED_BLOCK_SIZE)
    return NF4Weight(packed.reshape(*lead, n // 2, k), absmax, (n, k), block_size, w.dtype)


def dequantize(q: NF4Weight, dtype: DTypeLike | None = None) -> jax.Array:
    """Dense ``[..., N, K]`` weight: ``CODEBOOK[code] * absmax`` in float32, rounded once to
    ``dtype`` (float32, bfloat16 or float16; default: the dtype the weight was quantized from).
    Double-quantized scales are decoded inside the kernel."""
    q = _check_weight(q)
    dtype = _shapes.check_activation_dtype(q.dtype if dtype is None else dtype, "dtype")
    n, k = q.shape
    lead = q.stack_shape
    g = math.prod(lead)
    out = nf4_dequantize_p.bind(q.packed.reshape(g, n // 2, k), *_scale_operands(q, g),
                                block_size=q.block_size, dtype=dtype)
    return out.reshape(*lead, n, k)


def matmul(x: ArrayLike, q: NF4Weight) -> jax.Array:
    """``x @ dequantize(q).T`` with the dequantization fused into the product.

    Args:
      x: ``[..., K]`` float32, bfloat16 or float16 activations.
      q: an unstacked :class:`NF4Weight` of shape ``(N, K)`` (map stacked weights with
        ``jax.vmap`` or ``lax.scan``); double-quantized scales are decoded inside the kernel.

    Returns:
      ``[..., N]`` in ``x``'s dtype, accumulated in float32. On GPU with bfloat16 / float16
      activations the weight meets ``x`` in ``x``'s dtype (for M > 8 rows scaled and rounded
      as ``dequantize(q, x.dtype)`` rounds it), so with float16 the weight must lie within
      float16 range, as for ``dequantize`` to float16.
    """
    x, q = _check_matmul_args(x, q, "matmul")
    n, k = q.shape
    lead = x.shape[:-1]
    out = nf4_matmul_p.bind(x.reshape(1, math.prod(lead), k), q.packed[None],
                            *_scale_operands(q, 1), block_size=q.block_size)
    return out.reshape(*lead, n)


def linear(x: ArrayLike, q: NF4Weight, bias: ArrayLike | None = None) -> jax.Array:
    """``matmul(x, q) + bias``: a dense layer ``[..., K] -> [..., N]`` with an NF4 weight.

    ``bias`` is ``[N]``; it is added in float32 and the result cast to ``x``'s dtype.
    """
    return _add_bias(matmul(x, q), q, bias)


def _add_bias(y: jax.Array, q: NF4Weight, bias: ArrayLike | None) -> jax.Array:
    """``y + bias`` for a ``[N]`` bias of weight ``q``, added in float32, in ``y``'s dtype."""
    if bias is None:
        return y
    bias = jnp.asarray(bias)
    if bias.shape != (q.shape[0],):
        raise ValueError(f"bias must have shape ({q.shape[0]},) for a weight of shape (N, K) = "
                         f"{q.shape}, got {tuple(bias.shape)}")
    return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


def decode_attention(qkv: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike, pos: ArrayLike, *,
                     rope_theta: float = 500000.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One grouped-query attention decode step, fused: rotary embedding, KV-cache write and
    attention over the cache in one kernel (inference only: no derivative).

    Args:
      qkv: ``[B, H_kv, G + 2, D]`` float32, bfloat16 or float16: per KV head ``h``, rows
        ``0 .. G-1`` are query heads ``h G .. h G + G - 1``, row ``G`` the new key, row
        ``G + 1`` the new value (one token of a fused qkv projection, grouped by KV head).
        ``G >= 1``, ``D`` even.
      k_cache, v_cache: ``[B, T, H_kv, D]`` in ``qkv``'s dtype; slot ``t`` holds position ``t``.
      pos: the new token's position, an integer scalar (shared by the batch); the slot written
        is ``pos`` clamped to ``[0, T - 1]``.
      rope_theta: the rotary base (Llama's half-split layout, as
        :func:`jax_nf4.models.llama.rope`).

    Returns:
      ``(out [B, H_kv, G, D], k_cache, v_cache)``: the caches with slot ``pos`` set to the
      rotated key (rounded to the dtype) and the value; ``out[b, h, g]`` is the softmax
      attention of the rotated query (rounded to the dtype) over slots ``0 .. pos``, scaled by
      ``1 / sqrt(D)``, in float32 arithmetic, rounded once (on a GPU, bf16 / f16 weights enter
      the value sum as two terms of the dtype: 16 significant bits or more, far below that
      rounding). Later slots are never read.

    The caches are updated in place where XLA may reuse their buffers: donate them
    (``jax.jit(..., donate_argnums=...)``) or carry them through ``lax.scan`` /
    ``lax.fori_loop`` inside ``jit``; otherwise XLA copies them first.
    """
    return tuple(decode_attention_p.bind(*_decode_attention_operands(qkv, k_cache, v_cache, pos),
                                         rope_theta=float(rope_theta)))


def _decode_attention_operands(qkv: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike,
                               pos: ArrayLike) -> tuple[jax.Array, ...]:
    """decode_attention's operands as arrays, ``pos`` an int32 scalar (else a TypeError /
    ValueError); the primitive's abstract eval checks the rest."""
    pos_dtype = np.dtype(jnp.result_type(pos))
    if not np.issubdtype(pos_dtype, np.integer):
        raise TypeError(f"decode_attention: pos must be an integer scalar (the new token's "
                        f"position), got {pos_dtype.name}{list(np.shape(pos))}")
    if np.ndim(pos) != 0:
        raise ValueError(f"decode_attention: pos must be a scalar (one position shared by the "
                         f"batch), got {pos_dtype.name}{list(np.shape(pos))}")
    return (jnp.asarray(qkv), jnp.asarray(k_cache), jnp.asarray(v_cache),
            jnp.asarray(pos, jnp.int32))
