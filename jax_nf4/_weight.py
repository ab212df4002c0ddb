"""`NF4Weight`: the pytree that carries an NF4-quantized weight matrix (layout A)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_nf4.double_quant import DoubleQuantScales, _shape, dequantize_scales

__all__ = ["NF4Weight", "DoubleQuantScales"]


@jax.tree_util.register_pytree_node_class
class NF4Weight:
    """An NF4-quantized weight ``W[N, K]`` (N output features, K input features).

    Leaves (arrays; may carry extra leading dims when weights are stacked or vmapped):
      packed: ``uint8[..., N/2, K]``; byte ``(j, k)`` holds row ``2j`` in its low nibble and
        row ``2j+1`` in its high nibble.
      absmax: the block scales, in one of two forms:
        * plain: ``float32[..., N, K/block_size]``, the largest ``|W|`` of each block;
        * double-quantized: a :class:`~jax_nf4.double_quant.DoubleQuantScales` (bitsandbytes'
          ``compress_statistics``): ``codes uint8[..., N, K/block_size]`` into a 256-entry
          ``table``, ``nested_absmax float32[..., ceil(N*K/block_size/256)]`` and ``offset``;
          ``absmax[i] = table[codes[i]] * nested_absmax[i // 256] + offset`` in flat block order.
    Static metadata (part of the tree structure, not leaves):
      shape: ``(N, K)`` of one matrix.
      block_size: elements of one row that share a scale.
      dtype: the dtype the weight had before quantization (the default of ``dequantize``).

    Build one with :func:`jax_nf4.quantize` (``double_quant=True`` for the second form) or load
    one with :mod:`jax_nf4.checkpoint`; it flows through ``jit``, ``vmap``, ``scan``,
    ``tree_map``, stacking and pickling like any pytree.
    """

    __slots__ = ("packed", "absmax", "shape", "block_size", "dtype")

    def __init__(self, packed: Any, absmax: Any, shape: tuple[int, int], block_size: int,
                 dtype: Any = np.float32):
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
            raise TypeError(f"NF4Weight: block_size must be an int, got "
                            f"{type(block_size).__name__}")
        block_size = int(block_size)
        if block_size <= 0:
            raise ValueError(f"NF4Weight: block_size must be positive, got {block_size}")
        try:
            dims = tuple(shape)
        except TypeError:
            raise TypeError(f"NF4Weight: shape must be a pair (N, K), got {shape!r}") from None
        if len(dims) != 2 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                                     for d in dims):
            raise ValueError(f"NF4Weight: shape must be a pair of ints (N, K), got {shape!r}")
        n, k = (int(d) for d in dims)
        if n < 0 or k < 0 or n % 2 or k % block_size:
            raise ValueError(
                f"NF4Weight: shape (N, K) = {(n, k)} needs N >= 0 even and K >= 0 a multiple "
                f"of block_size = {block_size}")
        if _shape(packed)[-2:] != (n // 2, k) or len(packed.shape) < 2:
            raise ValueError(f"NF4Weight: packed must be [..., {n // 2}, {k}] for shape {(n, k)}, "
                             f"got {_shape(packed)}")
        scales = absmax.codes if isinstance(absmax, DoubleQuantScales) else absmax
        what = "absmax codes" if isinstance(absmax, DoubleQuantScales) else "absmax"
        if _shape(scales)[-2:] != (n, k // block_size) or len(scales.shape) < 2:
            raise ValueError(f"NF4Weight: {what} must be [..., {n}, {k // block_size}] for shape "
                             f"{(n, k)} and block_size {block_size}, got {_shape(scales)}")
        if isinstance(absmax, DoubleQuantScales):
            if np.dtype(packed.dtype) != np.uint8:
                raise TypeError(f"NF4Weight: packed must be uint8, got {packed.dtype}")
        elif np.dtype(packed.dtype) != np.uint8 or np.dtype(absmax.dtype) != np.float32:
            raise TypeError(f"NF4Weight: packed must be uint8 and absmax float32, got "
                            f"{packed.dtype} and {absmax.dtype}")
        if _shape(packed)[:-2] != _shape(scales)[:-2]:
            raise ValueError(f"NF4Weight: packed and {what} must have the same stack dims, got "
                             f"packed {_shape(packed)} and {what} {_shape(scales)}")
        self.packed = packed
        self.absmax = absmax
        self.shape = (n, k)
        self.block_size = block_size
        self.dtype = np.dtype(dtype)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading dims of stacked weights (``()`` for a single matrix)."""
        return tuple(self.packed.shape[:-2])

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are double-quantized (:class:`DoubleQuantScales`)."""
        return isinstance(self.absmax, DoubleQuantScales)

    def scales(self) -> Any:
        """The float32 block scales ``[..., N, K/block_size]``: ``absmax`` itself, or the
        decoded double-quantized scales (a jnp computation, bit-identical to bitsandbytes)."""
        if isinstance(self.absmax, DoubleQuantScales):
            return dequantize_scales(self.absmax)
        return self.absmax

    def codes(self) -> Any:
        """The 4-bit codes ``uint8[..., N, K]`` unpacked from ``packed`` (a jnp computation):
        row ``2j`` from the low nibbles of packed row ``j``, row ``2j+1`` from the high ones."""
        p = jnp.asarray(self.packed)
        return jnp.stack([p & 15, p >> 4], axis=-2).reshape(*p.shape[:-2], *self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales."""
        if isinstance(self.absmax, DoubleQuantScales):
            return int(self.packed.size) + self.absmax.nbytes
        return int(self.packed.size) + 4 * int(self.absmax.size)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight element (4.5 plain, about 4.127 double-quantized, block 64)."""
        n, k = self.shape
        count = n * k * max(1, int(np.prod(self.stack_shape, dtype=np.int64)))
        return 8.0 * self.nbytes / count if count else 0.0

    def tree_flatten(self):
        return (self.packed, self.absmax), (self.shape, self.block_size, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation: transformations rebuild the tree with tracers, None or other objects.
        obj = object.__new__(cls)
        obj.packed, obj.absmax = children
        obj.shape, obj.block_size, obj.dtype = aux
        return obj

    def __repr__(self) -> str:
        stack = f"stack={self.stack_shape}, " if self.stack_shape else ""
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4Weight(shape={self.shape}, {stack}block_size={self.block_size}, "
                f"dtype={self.dtype.name}{dq})")
