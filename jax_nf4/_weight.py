"""`NF4Weight`: the pytree that carries an NF4-quantized weight matrix (layout A)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["NF4Weight"]


@jax.tree_util.register_pytree_node_class
class NF4Weight:
    """An NF4-quantized weight ``W[N, K]`` (N output features, K input features).

    Leaves (arrays; may carry extra leading dims when weights are stacked or vmapped):
      packed: ``uint8[..., N/2, K]``; byte ``(j, k)`` holds row ``2j`` in its low nibble and
        row ``2j+1`` in its high nibble.
      absmax: ``float32[..., N, K/block_size]``; the largest ``|W|`` of each block.
    Static metadata (part of the tree structure, not leaves):
      shape: ``(N, K)`` of one matrix.
      block_size: elements of one row that share a scale.
      dtype: the dtype the weight had before quantization (the default of ``dequantize``).

    Build one with :func:`jax_nf4.quantize`; it flows through ``jit``, ``vmap``, ``scan``,
    ``tree_map``, stacking and pickling like any pytree.
    """

    __slots__ = ("packed", "absmax", "shape", "block_size", "dtype")

    def __init__(self, packed: Any, absmax: Any, shape: tuple[int, int], block_size: int,
                 dtype: Any = np.float32):
        n, k = (int(d) for d in shape)
        block_size = int(block_size)
        if block_size <= 0:
            raise ValueError(f"NF4Weight: block_size must be positive, got {block_size}")
        if n < 0 or k < 0 or n % 2 or k % block_size:
            raise ValueError(
                f"NF4Weight: shape (N, K) = {(n, k)} needs N >= 0 even and K >= 0 a multiple "
                f"of block_size = {block_size}")
        if tuple(packed.shape[-2:]) != (n // 2, k):
            raise ValueError(f"NF4Weight: packed must be [..., {n // 2}, {k}] for shape {(n, k)}, "
                             f"got {tuple(packed.shape)}")
        if tuple(absmax.shape[-2:]) != (n, k // block_size):
            raise ValueError(f"NF4Weight: absmax must be [..., {n}, {k // block_size}] for shape "
                             f"{(n, k)} and block_size {block_size}, got {tuple(absmax.shape)}")
        if np.dtype(packed.dtype) != np.uint8 or np.dtype(absmax.dtype) != np.float32:
            raise TypeError(f"NF4Weight: packed must be uint8 and absmax float32, got "
                            f"{packed.dtype} and {absmax.dtype}")
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
    def nbytes(self) -> int:
        """Bytes of codes plus scales."""
        return int(self.packed.size) + 4 * int(self.absmax.size)

    def tree_flatten(self):
        return (self.packed, self.absmax), (self.shape, self.block_size, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation: transformations rebuild the tree with tracers, None or other objects.
        obj = object.__new__(cls)
        obj.packed, obj.absmax = children
        obj.shape, obj.block_size, obj.dtype = aux
        return obj

    def __getstate__(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        stack = f"stack={self.stack_shape}, " if self.stack_shape else ""
        return (f"NF4Weight(shape={self.shape}, {stack}block_size={self.block_size}, "
                f"dtype={self.dtype.name})")
