"""Autodiff rules (JVP and transpose) of the NF4 primitives.

The rules are registered on the primitives themselves (``ad.primitive_jvps`` and
``ad.primitive_transposes``), not through ``jax.custom_vjp``, so forward mode (``jax.jvp``),
reverse mode (``jax.grad``, ``jax.vjp``, ``jax.linear_transpose``) and any order of the two work,
under ``jit``, ``vmap`` and ``lax.scan``, on every platform that has a lowering of the primitives.

``nf4_matmul`` — ``y[G, M, N] = x[G, M, K] @ W[G, N, K]^T``, ``W = dequantize(packed, absmax)``
  * is linear in the activations ``x``. Its JVP binds ``nf4_matmul`` again on the tangent of
    ``x`` (the fused kernel on the tangent).
  * Its transpose (the backward pass, ``dx = dy @ W``) is an **efficient composition, not a
    dedicated kernel**: ``nf4_dequantize`` (the CPU/CUDA dequantize kernel) writes ``W`` in the
    cotangent's dtype, then one XLA ``dot_general`` contracts it with ``dy`` with float32
    accumulation (``preferred_element_type=float32``, ``Precision.HIGHEST`` for float32) and the
    result is cast to ``x``'s dtype. This is the same path the CUDA lowering takes for the
    forward product with many rows; the dense ``W`` is a temporary of ``N*K`` elements.
  * The NF4 weight is **frozen**. ``packed`` is integer data (its tangent is always a
    symbolic zero of dtype ``float0``). A non-zero tangent for ``absmax`` (for example
    ``jax.grad`` with respect to an ``NF4Weight``, or an ``absmax`` computed from a
    differentiated value) raises a ``TypeError`` that says so — never a silent zero or a wrong
    number. Differentiate with respect to the activations / LoRA adapters instead, or apply
    ``jax.lax.stop_gradient`` to the ``NF4Weight``.

``nf4_dequantize`` — ``W[G, N, K] = dtype(CODEBOOK[code] * absmax[block])``
  * is linear in ``absmax`` (a product in float32, one rounding to ``dtype``), so it is
    differentiable with respect to ``absmax``: JVP = ``nf4_dequantize(packed, absmax_dot)``;
    transpose = for each block, ``sum(CODEBOOK[code] * ct)`` in float32, computed as
    ``nf4_dequantize(packed, ones, float32) * ct`` reduced over the block (a float32 result, the
    dtype of ``absmax``). The codes (``packed``) carry no derivative.

``nf4_quantize`` is **not differentiable** (rounding to 16 codes is piecewise constant and its
gradient would be zero almost everywhere, which is never what a caller wants): a non-zero
tangent raises a ``TypeError``. Quantize outside the differentiated function, or wrap the input
in ``jax.lax.stop_gradient`` (then JAX never asks for the rule).

``decode_attention`` is an inference-only decode step (rotary, cache write and attention of one
token): a non-zero tangent of any input raises a ``NotImplementedError``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad

from jax_nf4._primitives import (decode_attention_p, nf4_dequantize_p, nf4_matmul_p,
                                 nf4_quantize_p)

__all__: list[str] = []

FROZEN_WEIGHT_MESSAGE = (
    "jax_nf4: the NF4 weight is frozen and cannot be differentiated: a non-zero tangent / "
    "cotangent reached the {what} of an NF4Weight in {op}. Differentiate with respect to the "
    "activations or the LoRA adapters only (e.g. jax.grad(f, argnums=...) / nnx.grad over "
    "LoRA params, with the NF4Weight closed over or passed as a non-differentiated argument), "
    "or apply jax.lax.stop_gradient to the NF4Weight. (jax_nf4.dequantize is differentiable "
    "with respect to absmax if you really need d/dabsmax.)")

QUANTIZE_MESSAGE = (
    "jax_nf4.quantize is not differentiable (rounding to the 16 NF4 codes is piecewise "
    "constant). Quantize outside the differentiated function, or quantize "
    "jax.lax.stop_gradient(w) to say that the weight is frozen.")


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def _zero_like(aval) -> ad.Zero:
    """A symbolic zero tangent for a value of abstract type ``aval``."""
    return ad.Zero(aval.to_tangent_aval())


def _zero_tangent_of(value) -> ad.Zero:
    """A symbolic zero tangent for ``value`` (a jax.Array or tracer)."""
    return _zero_like(value.aval)


def _frozen_error(what: str, op: str) -> TypeError:
    return TypeError(FROZEN_WEIGHT_MESSAGE.format(what=what, op=op))


# ----------------------------------------------------------------------------- nf4_matmul

def _matmul_jvp(primals, tangents, *, block_size):
    x, packed, *scales = primals
    x_dot, _packed_dot, *scale_dots = tangents  # packed is uint8: its tangent is float0 / Zero
    if not all(_is_zero(t) for t in scale_dots):
        raise _frozen_error("absmax (scales)", "jax_nf4.matmul / linear")
    y = nf4_matmul_p.bind(x, packed, *scales, block_size=block_size)
    if _is_zero(x_dot):
        return y, _zero_tangent_of(y)
    y_dot = nf4_matmul_p.bind(x_dot, packed, *scales, block_size=block_size)
    return y, y_dot


def _dense_backward(ct, packed, scales, block_size, out_dtype):
    """``dx[G, M, K] = ct[G, M, N] @ W[G, N, K]``: dequantize kernel + dot with f32 accumulation."""
    ct_dtype = np.dtype(ct.dtype)
    w = nf4_dequantize_p.bind(packed, *scales, block_size=block_size, dtype=ct_dtype)
    precision = lax.Precision.HIGHEST if ct_dtype == np.float32 else None
    dx = lax.dot_general(ct, w, dimension_numbers=(((2,), (1,)), ((0,), (0,))),
                         precision=precision, preferred_element_type=jnp.float32)
    return dx.astype(out_dtype)


def _matmul_transpose(ct, x, packed, *scales, block_size):
    if any(ad.is_undefined_primal(a) for a in (packed, *scales)):
        raise _frozen_error("packed codes / absmax", "the transpose of jax_nf4.matmul")
    weight_cts = [None] * (1 + len(scales))
    if not ad.is_undefined_primal(x):
        # Not linear in anything we were asked about (cannot happen from our JVP).
        return [None, *weight_cts]
    if _is_zero(ct):
        return [_zero_like(x.aval), *weight_cts]
    return [_dense_backward(ct, packed, scales, block_size, x.aval.dtype), *weight_cts]


# ----------------------------------------------------------------------------- nf4_dequantize

def _dequantize_jvp(primals, tangents, *, block_size, dtype):
    packed, *scales = primals
    _packed_dot, *scale_dots = tangents
    w = nf4_dequantize_p.bind(packed, *scales, block_size=block_size, dtype=dtype)
    if len(scales) > 1:  # double-quantized scales: codes, tables and offsets are frozen
        if not all(_is_zero(t) for t in scale_dots):
            raise _frozen_error("double-quantized scales", "jax_nf4.dequantize")
        return w, _zero_tangent_of(w)
    (absmax_dot,) = scale_dots
    if _is_zero(absmax_dot):
        return w, _zero_tangent_of(w)
    w_dot = nf4_dequantize_p.bind(packed, absmax_dot, block_size=block_size, dtype=dtype)
    return w, w_dot


def _dequantize_transpose(ct, packed, *scales, block_size, dtype):
    if len(scales) > 1:
        raise _frozen_error("double-quantized scales", "the transpose of jax_nf4.dequantize")
    (absmax,) = scales
    if ad.is_undefined_primal(packed):
        raise TypeError("jax_nf4.dequantize: the packed NF4 codes are integer data and cannot "
                        "be differentiated or transposed (only absmax can)")
    if not ad.is_undefined_primal(absmax):
        return [None, None]
    if _is_zero(ct):
        return [None, _zero_like(absmax.aval)]
    g, n, nblocks = absmax.aval.shape
    k = packed.shape[2]
    codes = nf4_dequantize_p.bind(packed, jnp.ones((g, n, nblocks), jnp.float32),
                                  block_size=block_size, dtype=np.dtype(np.float32))
    prod = codes * ct.astype(jnp.float32)
    dabsmax = prod.reshape(g, n, k // block_size, block_size).sum(axis=-1)
    return [None, dabsmax.astype(absmax.aval.dtype)]


# ----------------------------------------------------------------------------- nf4_quantize

def _quantize_jvp(primals, tangents, *, block_size):
    # JAX calls this only when the tangent of w is non-zero (stop_gradient avoids it).
    raise TypeError(QUANTIZE_MESSAGE)


# ----------------------------------------------------------------------------- decode_attention

DECODE_ATTENTION_MESSAGE = (
    "jax_nf4.decode_attention is an inference-only decode step and has no derivative; a "
    "non-zero tangent / gradient reached its {what}. Differentiate a jnp attention instead "
    "(e.g. jax_nf4.models.llama with LlamaConfig(decode_attention=False)), or apply "
    "jax.lax.stop_gradient to the op's inputs.")


def _decode_attention_jvp(primals, tangents, *, rope_theta):
    names = ("qkv", "k_cache", "v_cache", "pos")
    live = [n for n, t in zip(names, tangents) if not _is_zero(t)]
    if live:
        raise NotImplementedError(DECODE_ATTENTION_MESSAGE.format(what=", ".join(live)))
    outs = decode_attention_p.bind(*primals, rope_theta=rope_theta)
    return outs, [_zero_tangent_of(o) for o in outs]


ad.primitive_jvps[nf4_matmul_p] = _matmul_jvp
ad.primitive_transposes[nf4_matmul_p] = _matmul_transpose
ad.primitive_jvps[nf4_dequantize_p] = _dequantize_jvp
ad.primitive_transposes[nf4_dequantize_p] = _dequantize_transpose
ad.primitive_jvps[nf4_quantize_p] = _quantize_jvp
ad.primitive_jvps[decode_attention_p] = _decode_attention_jvp
