"""The NF4 primitives: abstract evaluation and batching rules.

Every primitive works on a leading group dim G, so a vmap over weights (stacked layers,
experts) folds into G and a vmap over activations only folds into M:

  nf4_quantize_p   (w[G, N, K])                    -> packed u8[G, N/2, K], absmax f32[G, N, K/bs]
  nf4_dequantize_p (packed, *scales)               -> w[G, N, K] in ``dtype``
  nf4_matmul_p     (x[G, M, K], packed, *scales)   -> out[G, M, N] in x.dtype

and the fused decode-attention step (:func:`jax_nf4.decode_attention`):

  decode_attention_p (qkv[B, H_kv, G+2, D], k_cache[B, T, H_kv, D], v_cache, pos i32[])
                     -> out[B, H_kv, G, D], k_cache, v_cache            (rope_theta)

``scales`` is ``(absmax,)`` or, for double-quantized scales, ``(codes u8[G, N, K/bs],
nested_absmax f32[G, ceil(N*K/bs/256)], table f32[G, 256], offset f32[G])``; the kernels decode
the latter on the fly.

Lowerings live in ``_lowering.py``; autodiff rules in ``_autodiff.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching
from jax.interpreters.xla import apply_primitive
from jax.core import ShapedArray

from jax_nf4 import _shapes

__all__ = ["decode_attention_p", "nf4_quantize_p", "nf4_dequantize_p", "nf4_matmul_p"]


def _varying_axes(x) -> frozenset:
    """The manual mesh axes a value (or abstract value) varies over inside ``jax.shard_map``."""
    aval = x if isinstance(x, ShapedArray) else jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax 0.10: the manual-axis type; later: aval.vma
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


class _Nf4Primitive(Primitive):
    """Inside ``jax.shard_map`` (with ``check_vma``), operands that vary over fewer manual axes
    than the others are cast to vary over all of them before binding, as JAX's own primitives
    do; abstract evaluation then gives the outputs that type, so transposes insert the right
    ``psum``s."""

    def bind(self, *args, **params):
        axes = frozenset().union(*(_varying_axes(a) for a in args))
        if axes:
            args = [a if _varying_axes(a) == axes else
                    jax.lax.pcast(a, tuple(sorted(axes - _varying_axes(a))), to="varying")
                    for a in args]
        return super().bind(*args, **params)


def _out_aval(ref, shape, dtype) -> ShapedArray:
    """An output of ``shape`` / ``dtype`` varying over the same manual axes as operand ``ref``."""
    if _varying_axes(ref):
        return ref.update(shape=shape, dtype=np.dtype(dtype), weak_type=False)
    return ShapedArray(shape, dtype)


def _make(name: str, multiple_results: bool = False) -> Primitive:
    p = _Nf4Primitive(name)
    p.multiple_results = multiple_results
    p.def_impl(lambda *args, **params: apply_primitive(p, *args, **params))
    return p


nf4_quantize_p = _make("nf4_quantize", multiple_results=True)
nf4_dequantize_p = _make("nf4_dequantize")
nf4_matmul_p = _make("nf4_matmul")
decode_attention_p = _make("decode_attention", multiple_results=True)


# ----------------------------------------------------------------------------- abstract eval

def _quantize_abstract(w, *, block_size):
    g, n, k = _shapes.check_quantize(w.shape, w.dtype, block_size)
    return (_out_aval(w, (g, n // 2, k), np.uint8),
            _out_aval(w, (g, n, k // block_size), np.float32))


def _dequantize_abstract(packed, *scales, block_size, dtype):
    g, n, k = _shapes.check_weight_operands(packed, scales, block_size, "nf4_dequantize")
    return _out_aval(packed, (g, n, k), _shapes.check_activation_dtype(dtype, "dtype"))


def _matmul_abstract(x, packed, *scales, block_size):
    g, n, k = _shapes.check_weight_operands(packed, scales, block_size, "nf4_matmul")
    if x.ndim != 3 or x.shape[0] != g or x.shape[2] != k:
        raise ValueError(f"nf4_matmul: x must be [{g}, M, {k}], got {tuple(x.shape)}")
    return _out_aval(x, (g, x.shape[1], n), _shapes.check_activation_dtype(x.dtype, "x"))


def _decode_attention_abstract(qkv, k_cache, v_cache, pos, *, rope_theta):
    b, h, g, d, dtype = _shapes.check_decode_attention(qkv, k_cache, v_cache, pos)
    return (_out_aval(qkv, (b, h, g, d), dtype),
            _out_aval(k_cache, tuple(k_cache.shape), dtype),
            _out_aval(v_cache, tuple(v_cache.shape), dtype))


nf4_quantize_p.def_abstract_eval(_quantize_abstract)
nf4_dequantize_p.def_abstract_eval(_dequantize_abstract)
nf4_matmul_p.def_abstract_eval(_matmul_abstract)
decode_attention_p.def_abstract_eval(_decode_attention_abstract)


# ----------------------------------------------------------------------------- batching

def _to_front(x, dim, size):
    """Batch dim of x moved to the front, or x broadcast along a new front dim."""
    if dim is None:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, dim, 0)


def _fold(x):
    """[B, G, ...] -> [B*G, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unfold(x, size):
    """[B*G, ...] -> [B, G, ...]."""
    return x.reshape((size, x.shape[0] // size) + x.shape[1:])


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _quantize_batch(args, dims, *, block_size):
    (w,), (dim,) = args, dims
    size = w.shape[dim]
    packed, absmax = nf4_quantize_p.bind(_fold(_to_front(w, dim, size)), block_size=block_size)
    return (_unfold(packed, size), _unfold(absmax, size)), (0, 0)


def _dequantize_batch(args, dims, *, block_size, dtype):
    size = _batch_size(args, dims)
    weight = [_fold(_to_front(a, d, size)) for a, d in zip(args, dims)]
    out = nf4_dequantize_p.bind(*weight, block_size=block_size, dtype=dtype)
    return _unfold(out, size), 0


def _matmul_batch(args, dims, *, block_size):
    x, *weight = args
    x_dim, *weight_dims = dims
    size = _batch_size(args, dims)
    if all(d is None for d in weight_dims):
        # Only the activations are batched: fold the batch into M and read each weight once.
        xb = jnp.moveaxis(x, x_dim, 1)  # [G, B, M, K]
        g, b, m, k = xb.shape
        out = nf4_matmul_p.bind(xb.reshape(g, b * m, k), *weight, block_size=block_size)
        return out.reshape(g, b, m, out.shape[-1]), 1
    # Batched weights fold into the group dim; activations follow (broadcast if unbatched).
    folded = [_fold(_to_front(a, d, size)) for a, d in zip(args, dims)]
    out = nf4_matmul_p.bind(*folded, block_size=block_size)
    return _unfold(out, size), 0


def _decode_attention_batch(args, dims, *, rope_theta):
    """A vmapped axis folds into the batch dim B of qkv and the caches (an unbatched operand
    is broadcast along it); pos must be shared by the whole batch."""
    *arrays, pos = args
    *array_dims, pos_dim = dims
    if pos_dim is not None:
        raise NotImplementedError(
            "jax_nf4.decode_attention: pos is batched by vmap, but every batch row of one "
            "decode step must be at the same position: pass pos unbatched (vmap in_axes=None "
            "for it), or call the op once per position")
    size = _batch_size(arrays, array_dims)
    folded = [_fold(_to_front(a, d, size)) for a, d in zip(arrays, array_dims)]
    outs = decode_attention_p.bind(*folded, pos, rope_theta=rope_theta)
    return [_unfold(o, size) for o in outs], [0, 0, 0]


batching.primitive_batchers[nf4_quantize_p] = _quantize_batch
batching.primitive_batchers[nf4_dequantize_p] = _dequantize_batch
batching.primitive_batchers[nf4_matmul_p] = _matmul_batch
batching.primitive_batchers[decode_attention_p] = _decode_attention_batch
