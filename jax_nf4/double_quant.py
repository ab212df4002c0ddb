"""Double quantization of the NF4 block scales: bitsandbytes' ``compress_statistics`` scheme.

A double-quantized weight stores, instead of the float32 ``absmax`` of its blocks:

* ``codes``: ``uint8[..., N, K/block_size]``, one 8-bit code per block, indices into ``table``;
* ``nested_absmax``: ``float32[..., ceil(N*K/block_size / 256)]``, one scale per 256 consecutive
  blocks in flat row-major block order (block ``n*(K/block_size) + b``, the order bitsandbytes
  uses when K is a multiple of the block size);
* ``table``: ``float32[..., 256]``, bitsandbytes' signed dynamic 8-bit map (:data:`DYNAMIC_MAP`);
* ``offset``: ``float32[...]``, the mean of the float32 absmax that was subtracted before coding.

Decoding (as bitsandbytes does it: a float32 product, then a float32 sum, each rounded once)::

    absmax[i] = table[codes[i]] * nested_absmax[i // 256] + offset

Encoding follows the **CPU backend of bitsandbytes 0.50.2** (``cquantize_blockwise_cpu_fp32``,
checked bit for bit against the installed library): per block of 256 values ``x = absmax -
offset``, ``am = max |x|`` (NaN ignored) is stored as the nested absmax; each value is normalized
by a float32 reciprocal multiply ``v = clamp(x * (1/am), -1, 1)`` (NaN -> -1), mapped to one of
65536 evenly spaced bins ``i = trunc((v + 1) * 0.5 * 65535 + 0.5)`` (float32, rounded after
each operation), and coded with the table entry nearest to the bin's centre ``-1 + 2i/65535``
(a centre exactly on a midpoint between two entries takes the lower one). A block whose values
are all zero stores ``am = 0`` and codes 0. The CUDA kernel of bitsandbytes (``dQuantize``)
instead binary-searches the sorted table for the entry nearest to the normalized value itself,
then picks the nearer neighbour; its ties went to the last probed entry in older releases and
to the upper entry in newer ones. The two backends differ only for normalized values within
half a bin (1.5e-5) of a midpoint between two table entries (about 0.1% of random scales).

The offset is the float32 mean of the absmax of one matrix. bitsandbytes takes ``torch.mean``,
whose summation order is PyTorch's own; here the sum is a fixed pairwise tree (zero-padded to a
power of two, ``a[:h] + a[h:]`` at each level) times the float32 reciprocal of the count, so
that the NumPy reference and the JAX implementation agree bit for bit. Given the same offset,
the codes and nested absmax are bit-identical to bitsandbytes'; the offset itself may differ
from ``torch.mean`` in its last bits.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["DYNAMIC_MAP", "NESTED_BLOCK_SIZE", "DoubleQuantScales", "quantize_scales",
           "dequantize_scales", "reference_offset", "reference_quantize_scales",
           "reference_dequantize_scales"]

#: bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``:
#: 256 sorted float32 values in [-0.99297, 1.0], index = 8-bit code (little-endian float32 bytes).
DYNAMIC_MAP = np.frombuffer(base64.b64decode(
    "MzN+v5qZer8AAHe/ZmZzv83Mb78zM2y/mplovwAAZb9mZmG/zcxdvzMzWr+amVa/AABTv2ZmT7/NzEu/MzNIv5qZ"
    "RL8AAEG/ZmY9v83MOb80Mza/mpkyvwAAL79mZiu/zcwnvzQzJL+amSC/AAAdv2ZmGb/NzBW/NDMSv5qZDr8AAAu/"
    "ZmYHv8zMA78zMwC/MjP5vgAA8r7MzOq+mpnjvmZm3L4zM9W+AADOvszMxr6amb++Zma4vjMzsb4AAKq+zMyivpqZ"
    "m75mZpS+NDONvgAAhr6ZmX2+MzNvvs3MYL5mZlK+AABEvpqZNb4zMye+zcwYvmZmCr4AAPi9NDPbvYXryb33KMS9"
    "Z2a+vdejuL1I4bK9uB6tvSpcp72amaG9CtebvXsUlr3rUZC9XY+Kvc3MhL17FH69XY9yvT0KZ70fhVu9AABQveF6"
    "RL3D9Ti9o3AtvYXrIb1nZha9SOEKvVK4/rwVrue816PQvJqZubxdj6K8H4WLvMP1aLxI4Tq8ZDsfvBgEFrzNzAy8"
    "gZUDvGq89LvTTeK7O9/Pu6RwvbsNAqu7dJOYu90khruKbGe7XI9Cuy2yHbv8qfG6ne+nuv9ld7o+6Fm6gGo8usHs"
    "HroBbwG6g+LHuQXnjLkL1yO5Sx+6uLPvirg0gDe4BkKyt/8FAreUGlq2t6MTtQAAAAC3oxM1lBpaNv8FAjcGQrI3"
    "NIA3OLPvijhLH7o4C9cjOQXnjDmD4sc5AW8BOsHsHjqAajw6PuhZOv9ldzqd76c6/KnxOi2yHTtcj0I7imxnO90k"
    "hjt0k5g7DQKrO6RwvTs73887003iO2q89DuBlQM8zcwMPBgEFjxkOx88SOE6PMP1aDwfhYs8XY+iPJqZuTzXo9A8"
    "Fa7nPFK4/jxI4Qo9Z2YWPYXrIT2jcC09w/U4PeF6RD0AAFA9H4VbPT0KZz1dj3I9exR+Pc3MhD1dj4o961GQPXsU"
    "lj0K15s9mpmhPSpcpz24Hq09SOGyPdejuD1nZr499yjEPYXryT00M9s9AAD4PWZmCj7NzBg+MzMnPpqZNT4AAEQ+"
    "ZmZSPs3MYD4zM28+mZl9PgAAhj40M40+ZmaUPpqZmz7MzKI+AACqPjMzsT5mZrg+mpm/PszMxj4AAM4+MzPVPmZm"
    "3D6ameM+zMzqPgAA8j4yM/k+MzMAP8zMAz9mZgc/AAALP5qZDj80MxI/zcwVP2ZmGT8AAB0/mpkgPzQzJD/NzCc/"
    "ZmYrPwAALz+amTI/NDM2P83MOT9mZj0/AABBP5qZRD8zM0g/zcxLP2ZmTz8AAFM/mplWPzMzWj/NzF0/ZmZhPwAA"
    "ZT+amWg/MzNsP83Mbz9mZnM/AAB3P5qZej8zM34/AACAPw=="
), dtype="<f4").astype(np.float32)
DYNAMIC_MAP.setflags(write=False)

#: Blocks of NF4 scales that share one nested absmax (fixed at 256 by bitsandbytes).
NESTED_BLOCK_SIZE = 256

_LUT_SIZE = 65536


@functools.lru_cache(maxsize=8)
def _lut_from_bytes(table_bytes: bytes) -> np.ndarray:
    table = np.frombuffer(table_bytes, np.float32)
    mid = (np.float32(0.5) * (table[:-1] + table[1:])).astype(np.float32)
    i = np.arange(_LUT_SIZE).astype(np.float32)
    centre = (np.float32(-1) + (np.float32(2) * i) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    lut = np.searchsorted(mid, centre, side="left").astype(np.uint8)  # midpoints strictly below
    lut.setflags(write=False)
    return lut


def quantization_lut(table: np.ndarray = DYNAMIC_MAP) -> np.ndarray:
    """The 65536-bin lookup table of bitsandbytes' CPU 8-bit quantizer for a sorted ``table``."""
    table = np.ascontiguousarray(table, np.float32).reshape(256)
    return _lut_from_bytes(table.tobytes())


# ----------------------------------------------------------------------------- the pytree

def _shape(a: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in a.shape)


@jax.tree_util.register_pytree_node_class
class DoubleQuantScales:
    """Double-quantized NF4 block scales (see the module docstring for the scheme).

    Leaves: ``codes uint8[..., R, C]`` (R*C blocks of one matrix, row-major), ``nested_absmax
    float32[..., ceil(R*C / nested_block_size)]``, ``table float32[..., 256]``, ``offset
    float32[...]``; the leading dims (stacked weights) are the same for all four. Static:
    ``nested_block_size`` (256 in every bitsandbytes checkpoint).
    """

    __slots__ = ("codes", "nested_absmax", "table", "offset", "nested_block_size")

    def __init__(self, codes: Any, nested_absmax: Any, table: Any, offset: Any,
                 nested_block_size: int = NESTED_BLOCK_SIZE):
        if isinstance(nested_block_size, bool) or not isinstance(nested_block_size,
                                                                  (int, np.integer)):
            raise TypeError(f"DoubleQuantScales: nested_block_size must be an int, got "
                            f"{type(nested_block_size).__name__}")
        if nested_block_size <= 0:
            raise ValueError(f"DoubleQuantScales: nested_block_size must be positive, got "
                             f"{nested_block_size}")
        for name, a, dtype in (("codes", codes, np.uint8), ("nested_absmax", nested_absmax,
                               np.float32), ("table", table, np.float32),
                               ("offset", offset, np.float32)):
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise TypeError(f"DoubleQuantScales: {name} must be an array, got "
                                f"{type(a).__name__}")
            if np.dtype(a.dtype) != dtype:
                raise TypeError(f"DoubleQuantScales: {name} must be {np.dtype(dtype).name}, got "
                                f"{np.dtype(a.dtype).name}")
        if len(codes.shape) < 2:
            raise ValueError(f"DoubleQuantScales: codes must be [..., N, K/block_size], got shape "
                             f"{_shape(codes)}")
        stack = _shape(codes)[:-2]
        r, c = _shape(codes)[-2:]
        want = {"nested_absmax": stack + (-(-(r * c) // int(nested_block_size)),),
                "table": stack + (256,), "offset": stack}
        for name, a in (("nested_absmax", nested_absmax), ("table", table), ("offset", offset)):
            if _shape(a) != want[name]:
                raise ValueError(f"DoubleQuantScales: {name} must have shape {list(want[name])} "
                                 f"for codes of shape {list(_shape(codes))} and nested_block_size "
                                 f"{nested_block_size}, got {list(_shape(a))}")
        self.codes = codes
        self.nested_absmax = nested_absmax
        self.table = table
        self.offset = offset
        self.nested_block_size = int(nested_block_size)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return _shape(self.codes)[:-2]

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, nested absmax, table and offset."""
        return (int(self.codes.size) + 4 * (int(self.nested_absmax.size) + int(self.table.size)
                                            + int(self.offset.size)))

    def decode(self) -> jax.Array:
        """The float32 absmax ``[..., N, K/block_size]`` (see :func:`dequantize_scales`)."""
        return dequantize_scales(self)

    def tree_flatten(self):
        return (self.codes, self.nested_absmax, self.table, self.offset), (self.nested_block_size,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.codes, obj.nested_absmax, obj.table, obj.offset = children
        (obj.nested_block_size,) = aux
        return obj

    def __repr__(self) -> str:
        return (f"DoubleQuantScales(blocks={_shape(self.codes)[-2:]}, stack={self.stack_shape}, "
                f"nested_block_size={self.nested_block_size})")


# ----------------------------------------------------------------------------- JAX

def _tree_sum(x: jax.Array) -> jax.Array:
    """Float32 sum over the last axis in a fixed pairwise order (see the module docstring)."""
    n = x.shape[-1]
    if n == 0:
        return jnp.zeros(x.shape[:-1], jnp.float32)
    size = 1 << (n - 1).bit_length()
    if size != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)])
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def _inv_count(n: int) -> np.float32:
    return np.float32(np.float32(1) / np.float32(max(n, 1)))


def _mean(x: jax.Array) -> jax.Array:
    # A product with the float32 reciprocal, written out: XLA rewrites a division by a constant
    # into exactly this, so spelling it out keeps NumPy and every backend identical.
    return _tree_sum(x) * _inv_count(x.shape[-1])


def quantize_scales(absmax: Any, nested_block_size: int = NESTED_BLOCK_SIZE) -> DoubleQuantScales:
    """Double-quantizes float32 block scales ``absmax[..., N, K/block_size]`` (jnp; works under
    ``jit`` and ``vmap``; leading dims are independent matrices, each with its own offset)."""
    absmax = jnp.asarray(absmax, jnp.float32)
    if absmax.ndim < 2:
        raise ValueError(f"absmax must be [..., N, K/block_size], got shape {absmax.shape}")
    *lead, r, c = absmax.shape
    total = r * c
    nbs = int(nested_block_size)
    flat = absmax.reshape(*lead, total)
    offset = _mean(flat)
    x = flat - offset[..., None]
    n_nested = -(-total // nbs)
    if n_nested * nbs != total:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, n_nested * nbs - total)])
    blocks = x.reshape(*lead, n_nested, nbs)
    mag = jnp.abs(blocks)
    am = jnp.max(jnp.where(jnp.isnan(mag), jnp.float32(0), mag), axis=-1, initial=0.0)
    inv = jnp.float32(1) / am
    v = blocks * inv[..., None]
    v = jnp.where(jnp.isnan(v), jnp.float32(-1), jnp.clip(v, -1.0, 1.0))
    u = (v + jnp.float32(1)) * jnp.float32(0.5)
    # fl(u * 65535) computed as u*65536 (exact) - u (one rounding): the same value whether or not
    # the compiler fuses the multiply and the subtraction into an FMA.
    s = u * jnp.float32(_LUT_SIZE) - u
    idx = (s + jnp.float32(0.5)).astype(jnp.int32)
    codes = jnp.asarray(quantization_lut())[jnp.clip(idx, 0, _LUT_SIZE - 1)]
    codes = jnp.where((am == 0)[..., None], jnp.uint8(0), codes)
    codes = codes.reshape(*lead, n_nested * nbs)[..., :total].reshape(*lead, r, c)
    table = jnp.broadcast_to(jnp.asarray(DYNAMIC_MAP), (*lead, 256))
    return DoubleQuantScales(codes, am.astype(jnp.float32), table, offset.astype(jnp.float32),
                             nbs)


def _no_contract(p: jax.Array, nonneg: jax.Array) -> jax.Array:
    """``p`` unchanged, through a bit mask that depends on the sign of ``nonneg`` (>= 0 here), so
    that XLA cannot fuse the product ``p`` and the following addition into one FMA (CPU and GPU
    backends contract ``a*b + c``; bitsandbytes rounds the product and the sum separately)."""
    bits = lax.bitcast_convert_type(nonneg, jnp.int32)
    mask = ~(bits >> 31) | jnp.int32(0x7FFFFFFF)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(p, jnp.int32) & mask, jnp.float32)


def dequantize_scales(dq: DoubleQuantScales) -> jax.Array:
    """Float32 block scales ``[..., N, K/block_size]``: ``table[codes] * nested_absmax[i // 256]``
    rounded to float32, plus ``offset`` rounded to float32 (bit-identical to bitsandbytes)."""
    codes = jnp.asarray(dq.codes)
    *lead, r, c = codes.shape
    total = r * c
    table = jnp.asarray(dq.table, jnp.float32)
    vals = jnp.take_along_axis(table, codes.reshape(*lead, total).astype(jnp.int32), axis=-1)
    nested = jnp.repeat(jnp.asarray(dq.nested_absmax, jnp.float32), dq.nested_block_size,
                        axis=-1, total_repeat_length=dq.nested_absmax.shape[-1]
                        * dq.nested_block_size)[..., :total]
    p = _no_contract(vals * nested, nested)
    out = p + jnp.asarray(dq.offset, jnp.float32)[..., None]
    return out.reshape(*lead, r, c)


# ----------------------------------------------------------------------------- NumPy reference

def _np_tree_sum(x: np.ndarray) -> np.float32:
    x = np.asarray(x, np.float32).reshape(-1)
    n = x.size
    if n == 0:
        return np.float32(0)
    size = 1 << (n - 1).bit_length()
    x = np.concatenate([x, np.zeros(size - n, np.float32)])
    while x.size > 1:
        h = x.size // 2
        x = (x[:h] + x[h:]).astype(np.float32)
    return np.float32(x[0])


def reference_offset(absmax: np.ndarray) -> np.float32:
    """Float32 mean of one matrix's absmax: the fixed pairwise sum times float32 ``1/count``."""
    a = np.asarray(absmax, np.float32).reshape(-1)
    return np.float32(_np_tree_sum(a) * _inv_count(a.size))


def reference_quantize_scales(absmax: np.ndarray, offset: Any = None, *,
                              nested_block_size: int = NESTED_BLOCK_SIZE,
                              table: np.ndarray = DYNAMIC_MAP
                              ) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """NumPy double quantizer of one matrix's scales (bitsandbytes 0.50.2 CPU rule).

    Args:
      absmax: float32 block scales of one matrix, any shape (flattened row-major).
      offset: the offset to subtract (default :func:`reference_offset`); pass bitsandbytes'
        own offset to reproduce its codes exactly.
    Returns:
      ``(codes uint8[absmax.shape], nested_absmax float32[ceil(size/nbs)], offset float32)``.
    """
    a = np.asarray(absmax, np.float32)
    shape = a.shape
    a = a.reshape(-1)
    off = reference_offset(a) if offset is None else np.float32(offset)
    nbs = int(nested_block_size)
    n = a.size
    nn = -(-n // nbs)
    x = np.zeros(nn * nbs, np.float32)
    x[:n] = (a - off).astype(np.float32)
    blocks = x.reshape(nn, nbs)
    mag = np.abs(blocks)
    am = np.where(np.isnan(mag), np.float32(0), mag).max(axis=-1, initial=np.float32(0))
    am = am.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1) / am).astype(np.float32)
        v = (blocks * inv[:, None]).astype(np.float32)
    v = np.where(np.isnan(v), np.float32(-1), np.clip(v, np.float32(-1), np.float32(1)))
    u = ((v + np.float32(1)) * np.float32(0.5)).astype(np.float32)
    s = (u * np.float32(_LUT_SIZE - 1)).astype(np.float32)
    idx = (s + np.float32(0.5)).astype(np.float32).astype(np.int64)
    codes = quantization_lut(table)[np.clip(idx, 0, _LUT_SIZE - 1)]
    codes = np.where((am == 0)[:, None], np.uint8(0), codes).astype(np.uint8)
    return codes.reshape(-1)[:n].reshape(shape), am, off


def reference_dequantize_scales(codes: np.ndarray, nested_absmax: np.ndarray, offset: Any,
                                table: np.ndarray = DYNAMIC_MAP,
                                nested_block_size: int = NESTED_BLOCK_SIZE) -> np.ndarray:
    """NumPy decode of one matrix's scales: ``fl(fl(table[q] * nested[i // nbs]) + offset)``."""
    q = np.asarray(codes, np.uint8)
    flat = q.reshape(-1)
    nested = np.asarray(nested_absmax, np.float32).reshape(-1)
    scale = nested[np.arange(flat.size) // int(nested_block_size)]
    p = (np.asarray(table, np.float32)[flat] * scale).astype(np.float32)
    return (p + np.float32(offset)).astype(np.float32).reshape(q.shape)
