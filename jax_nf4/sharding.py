"""NF4 matmul / dequantize on sharded operands, without all-gathering the packed weight, and
the fused decode-attention step on sharded KV caches (:func:`decode_attention`, at the end).

Mechanism: :func:`jax.experimental.custom_partitioning` with a Shardy ``sharding_rule`` (the
default partitioner of jax 0.7+). :func:`matmul`, :func:`linear` and :func:`dequantize` here are
drop-in variants of the ops in :mod:`jax_nf4.ops`; under ``jax.jit`` with ``NamedSharding``
inputs XLA partitions them (plain :func:`jax_nf4.matmul` on sharded operands is correct but
all-gathers the operands around the custom call). On one device they are the plain ops.

Supported layouts (``W[N, K]``: ``packed u8[N/2, K]``, ``absmax f32[N, K/block_size]``):

* **column-parallel**: the weight sharded along N (``packed`` dim 0 and ``absmax`` dim 0 on the
  same mesh axes): every device multiplies its rows, the output is sharded along N, no
  collective. Bit-identical to the unsharded op when the per-device problem takes the same
  kernel path (see below).
* **row-parallel**: the weight (``packed`` dim 1, ``absmax`` dim 1) and the activations (last
  dim) sharded along K, on whole scale blocks: every device computes a float32 partial product
  (its activations cast to float32 first, so a bfloat16 ``x`` takes the float32 kernel path),
  one ``psum`` (all-reduce) adds them and the sum is cast to ``x``'s dtype. Equal to the
  unsharded op up to float32 rounding (a different summation order).
* **data-parallel**: the activations' rows (any leading dim of ``x``, folded into M) sharded,
  the weight replicated: bit-identical per row.

and their combinations on a multi-axis mesh (e.g. ``x`` on ``P("data", None)`` and the weight on
``P("model", None)`` gives an output on ``P("data", "model")``). The sharding rule is

    x: m (kb bs), packed: n2 (kb bs), absmax: (n2 two) kb -> out: m (n2 two)

with ``bs`` (= block_size) and ``two`` (the row pair of a packed byte) never sharded, so the
packed byte pairs and the scale blocks stay whole. Where Shardy's propagation leaves the operands
disagreeing, the partition callback picks one plan (the weight's sharding first, then the
activations') and XLA moves the *activations or scales* to match; a validly sharded packed
weight is never all-gathered.

Errors: a sharding of the **weight** that would split a scale block (``q.packed`` or
``q.absmax`` with a K shard that is not a multiple of ``block_size``) or a packed row pair (an
odd N shard) raises a ``ValueError`` naming the argument and its sharding. It is raised at trace
time when the sharding is known then (concrete ``jax.Array`` arguments, or meshes with
``AxisType.Explicit`` axes, the default of ``jax.make_mesh``); with ``AxisType.Auto`` axes the
sharding is only known to XLA's partitioner, and the same message arrives inside the
``JaxRuntimeError`` that ``jit``'s compilation raises. There, since Shardy's propagation may
carry an activation's sharding over onto the weight (or back), a bad weight sharding that the
activations / output share along that dim is taken for propagation and re-sharded (correct, at
the cost of moving the weight) rather than reported; place activations explicitly (e.g.
replicated) to get the error.

A sharding of the **activations** (or the output) that does not fit is not an error — it often
comes from propagation, e.g. the N-sharded output of the previous layer feeding K — it is just
not followed: XLA re-shards the activations (an all-gather of ``x``). One wasteful case remains:
with ``AxisType.Auto`` axes, activations sharded on K finer than a block can make Shardy slice a
*replicated* packed weight, which is then gathered back (correct, but shard K on whole blocks).

Outside ``jit`` (eager calls on sharded arrays) the op runs unpartitioned, like the plain op.

Kernel path: on CPU the op uses the fused kernel for M <= 8 rows and dequantize + XLA dot above
(``jax_nf4._lowering.fused_max_rows``); the choice is made per device, on the local M. Results
are bit-identical to the unsharded op when both take the same path (and, for the dot path, when
XLA's dot sums in the same order for the local shape, which it usually but not always does).

Double-quantized weights (:class:`~jax_nf4.double_quant.DoubleQuantScales`): their nested
blocks of 256 scales run across rows, so they are **decoded to float32 absmax first** (an XLA
computation on the small uint8 codes, bit-identical to the kernels' own decoding); the
partitioned op then runs on the plain scales. XLA may move the codes (not the packed weight) to
decode them.

Limitations: unstacked weights only (``q.stack_shape == ()``; map stacks with ``lax.scan``);
these variants have no autodiff or ``vmap`` rules (``custom_partitioning`` defines none; ``grad``
raises ``NotImplementedError``). For gradients of a sharded NF4 layer, call :mod:`jax_nf4.ops`
inside ``jax.shard_map``: the primitives carry the varying-manual-axes type, so gradients are
right with ``check_vma=True`` (the default) as well as ``False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike, DTypeLike

from jax_nf4 import _shapes, ops
from jax_nf4._primitives import decode_attention_p, nf4_dequantize_p, nf4_matmul_p
from jax_nf4._weight import NF4Weight

__all__ = ["decode_attention", "dequantize", "linear", "matmul"]


# ----------------------------------------------------------------------------- the plan

def _entry_axes(spec: Any, dim: int) -> tuple[str, ...]:
    """Mesh axes that shard dim ``dim`` of a PartitionSpec (``()`` when unsharded)."""
    if spec is None or dim >= len(spec):
        return ()
    entry = spec[dim]
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _axes_size(mesh_shape: dict, axes: Sequence[str]) -> int:
    return math.prod(int(mesh_shape[a]) for a in axes)


def _spec_entry(axes: Sequence[str]) -> Any:
    axes = tuple(axes)
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _fmt(spec: Any) -> str:
    return repr(spec) if spec is not None else "P()"


_WEIGHT_OPERANDS = ("q.packed", "q.absmax")


def _plan(op: str, mesh_shape: dict, specs: dict[str, Any], *, n: int, k: int,
          block_size: int, m: int | None = None,
          shown: dict[str, Any] | None = None,
          propagated: bool = False) -> tuple[tuple, tuple, tuple]:
    """Consistent mesh axes ``(m_axes, n_axes, k_axes)`` for the operands' specs, or a
    ValueError when a sharding would split a packed row pair or a scale block.

    ``specs`` maps ``"x"``, ``"q.packed"``, ``"q.absmax"`` and ``"out"`` (any may be absent) to
    the PartitionSpec that XLA or the caller chose for that operand; dims: ``x [M, K]``,
    ``packed [N/2, K]``, ``absmax [N, K/bs]``, ``out [M, N]`` (matmul) or ``[N, K]``
    (dequantize).

    ``propagated``: the specs come from XLA's propagation (the partition callback), which may
    carry an activation's or the output's sharding over onto the weight; a bad weight sharding
    whose axes the activations / output also have on that dim is then taken for propagated and
    dropped instead of raising."""
    n_dims = {"q.packed": 0, "q.absmax": 0, "out": 1 if m is not None else 0}
    k_dims = {"q.packed": 1, "q.absmax": 1, "x": 1}
    if m is None:
        k_dims["out"] = 1

    def check(name: str, dim_kind: str, axes: tuple) -> None:
        size = _axes_size(mesh_shape, axes)
        if size <= 1:
            return
        if propagated:
            dims = n_dims if dim_kind == "n" else k_dims
            others = {a for other in ("x", "out") if other in dims and other in specs
                      for a in _entry_axes(specs[other], dims[other])}
            if set(axes) & others:
                return
        spec = _fmt((shown or {}).get(name, specs.get(name)))
        if dim_kind == "n" and n % (2 * size):
            shard = n / size
            raise ValueError(
                f"jax_nf4.sharding.{op}: {name} has sharding {spec}, which splits N = {n} over "
                f"{size} devices ({shard:g} rows each): an N shard must be an even number of rows "
                f"(a packed byte holds a row pair), so N must be a multiple of {2 * size}; shard "
                f"N over a mesh axis of size dividing N/2 = {n // 2}")
        if dim_kind == "k" and k % (block_size * size):
            shard = k / size
            raise ValueError(
                f"jax_nf4.sharding.{op}: {name} has sharding {spec}, which splits K = {k} over "
                f"{size} devices ({shard:g} columns each): a K shard must be a multiple of "
                f"block_size = {block_size} (a scale block cannot be split); shard K over a mesh "
                f"axis of size dividing K/block_size = {k // block_size}")

    # The weight's own sharding is the caller's choice: one that splits a pair or a block is an
    # error. The activations' and the output's come from the caller or from propagation (the
    # previous layer's output): where they do not fit, they are simply not followed (XLA
    # re-shards the activations; the packed weight is never gathered along a sharded dim).
    for name in _WEIGHT_OPERANDS:
        if name in specs:
            check(name, "n", _entry_axes(specs[name], n_dims[name]))
            check(name, "k", _entry_axes(specs[name], k_dims[name]))

    def fits(dim_kind: str, axes: tuple) -> bool:
        size = _axes_size(mesh_shape, axes)
        return not (n % (2 * size) if dim_kind == "n" else k % (block_size * size))

    def first(dims: dict, dim_kind: str, exclude: tuple = ()) -> tuple:
        for name in _WEIGHT_OPERANDS + ("x", "out"):
            if name in dims and name in specs:
                axes = tuple(a for a in _entry_axes(specs[name], dims[name]) if a not in exclude)
                if axes and fits(dim_kind, axes):
                    return axes
        return ()

    n_axes = first(n_dims, "n")
    k_axes = first(k_dims, "k", exclude=n_axes)
    m_axes: tuple = ()
    if m is not None:
        used = set(n_axes) | set(k_axes)
        for name in ("x", "out"):
            if name in specs:
                m_axes = tuple(a for a in _entry_axes(specs[name], 0) if a not in used)
                if m_axes:
                    break
        if m_axes and m % _axes_size(mesh_shape, m_axes):
            m_axes = ()  # rows that do not divide evenly: keep x's rows whole
    return m_axes, n_axes, k_axes


def _spec_of(a: Any) -> Any:
    """The PartitionSpec of an argument when known now (concrete NamedSharding arrays, Explicit
    mesh axes), else None."""
    sharding = None
    if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
        sharding = a.sharding
    else:
        try:
            sharding = jax.typeof(a).sharding
        except Exception:  # noqa: BLE001 - no type-level sharding on this jax
            return None
    if not isinstance(sharding, NamedSharding):
        return None
    return sharding.spec, dict(sharding.mesh.shape)


def _check_now(op: str, args: dict[str, Any], **dims: Any) -> None:
    """_plan's errors at trace time, for the operands whose sharding is known now."""
    specs, shown, mesh_shape = {}, {}, None
    for name, a in args.items():
        got = _spec_of(a)
        if got is None:
            continue
        spec, shape = got
        shown[name] = spec
        if any(_entry_axes(spec, d) for d in range(len(spec))):
            specs[name] = spec
            mesh_shape = shape
    if specs:
        _plan(op, mesh_shape, specs, shown=shown, **dims)


def _sharding_spec(s: Any) -> Any:
    return s.spec if isinstance(s, NamedSharding) else None


# ----------------------------------------------------------------------------- matmul

def _local_matmul(block_size: int, x, packed, absmax):
    return nf4_matmul_p.bind(x[None], packed[None], absmax[None], block_size=block_size)[0]


_matmul_cp = custom_partitioning(_local_matmul, static_argnums=(0,))


def _matmul_rule(block_size, mesh, value_types, result_types):
    return ("m (kb bs), n2 (kb bs), (n2 two) kb -> m (n2 two)",
            {"reduction_factors": ("kb",), "need_replication_factors": ("bs", "two"),
             "bs": int(block_size), "two": 2})


def _matmul_partition(block_size, mesh, arg_shapes, result_shape):
    x, packed, absmax = arg_shapes
    m, k = x.shape
    n = absmax.shape[0]
    specs = {"x": _sharding_spec(x.sharding), "q.packed": _sharding_spec(packed.sharding),
             "q.absmax": _sharding_spec(absmax.sharding),
             "out": _sharding_spec(result_shape.sharding)}
    specs = {name: s for name, s in specs.items() if s is not None}
    m_axes, n_axes, k_axes = _plan("matmul", dict(mesh.shape), specs, n=n, k=k,
                                   block_size=block_size, m=m, propagated=True)
    ms, ns, ks = _spec_entry(m_axes), _spec_entry(n_axes), _spec_entry(k_axes)
    out_dtype = x.dtype

    def lower(x, packed, absmax):
        if not k_axes:
            return _local_matmul(block_size, x, packed, absmax)
        # Row-parallel: float32 partial products, one all-reduce, one rounding to x's dtype.
        part = _local_matmul(block_size, x.astype(jnp.float32), packed, absmax)
        return jax.lax.psum(part, k_axes).astype(out_dtype)

    arg_shardings = (NamedSharding(mesh, P(ms, ks)), NamedSharding(mesh, P(ns, ks)),
                     NamedSharding(mesh, P(ns, ks)))
    return mesh, lower, NamedSharding(mesh, P(ms, ns)), arg_shardings


_matmul_cp.def_partition(_matmul_partition, sharding_rule=_matmul_rule)


def _plain_scales(q: NF4Weight) -> jax.Array:
    return q.scales()  # DoubleQuantScales are decoded to float32 here (see the module doc)


def matmul(x: ArrayLike, q: NF4Weight) -> jax.Array:
    """:func:`jax_nf4.matmul` (``x @ dequantize(q).T``) that XLA partitions over sharded
    operands under ``jit``: column-parallel, row-parallel (one all-reduce) and data-parallel,
    never all-gathering ``q.packed`` (see the module docstring). Same arguments and result.

    Raises:
      ValueError: a sharding of ``x``, ``q.packed`` or ``q.absmax`` splits a scale block (K shard
        not a multiple of ``block_size``) or a packed row pair (odd N shard).
    """
    x, q = ops._check_matmul_args(x, q, "jax_nf4.sharding.matmul", map_with="lax.scan")
    n, k = q.shape
    lead = x.shape[:-1]
    mrows = math.prod(lead)
    if mrows == 0 or n == 0 or k == 0:
        return ops.matmul(x, q)
    absmax = _plain_scales(q)
    _check_now("matmul", {"q.packed": q.packed, "q.absmax": absmax}, n=n, k=k,
               block_size=q.block_size)
    out = _matmul_cp(q.block_size, x.reshape(mrows, k), q.packed, absmax)
    return out.reshape(*lead, n)


def linear(x: ArrayLike, q: NF4Weight, bias: ArrayLike | None = None) -> jax.Array:
    """:func:`jax_nf4.linear` on top of the partitioned :func:`matmul` (``bias [N]`` is added
    in float32; shard it like the output's last dim)."""
    return ops._add_bias(matmul(x, q), q, bias)


# ----------------------------------------------------------------------------- dequantize

def _local_dequantize(block_size: int, dtype: Any, packed, absmax):
    return nf4_dequantize_p.bind(packed[None], absmax[None], block_size=block_size,
                                 dtype=np.dtype(dtype))[0]


_dequantize_cp = custom_partitioning(_local_dequantize, static_argnums=(0, 1))


def _dequantize_rule(block_size, dtype, mesh, value_types, result_types):
    return ("n2 (kb bs), (n2 two) kb -> (n2 two) (kb bs)",
            {"need_replication_factors": ("bs", "two"), "bs": int(block_size), "two": 2})


def _dequantize_partition(block_size, dtype, mesh, arg_shapes, result_shape):
    packed, absmax = arg_shapes
    n, k = result_shape.shape
    specs = {"q.packed": _sharding_spec(packed.sharding),
             "q.absmax": _sharding_spec(absmax.sharding),
             "out": _sharding_spec(result_shape.sharding)}
    specs = {name: s for name, s in specs.items() if s is not None}
    _, n_axes, k_axes = _plan("dequantize", dict(mesh.shape), specs, n=n, k=k,
                              block_size=block_size, propagated=True)
    ns, ks = _spec_entry(n_axes), _spec_entry(k_axes)

    def lower(packed, absmax):
        return _local_dequantize(block_size, dtype, packed, absmax)

    sharding = NamedSharding(mesh, P(ns, ks))
    return mesh, lower, sharding, (sharding, sharding)


_dequantize_cp.def_partition(_dequantize_partition, sharding_rule=_dequantize_rule)


def dequantize(q: NF4Weight, dtype: DTypeLike | None = None) -> jax.Array:
    """:func:`jax_nf4.dequantize` that XLA partitions under ``jit``: the dense ``[N, K]`` weight
    comes out sharded like ``q`` (N with ``packed``'s dim 0, K with its dim 1), each device
    decoding only its own bytes. Bit-identical to the unsharded op.

    Raises:
      ValueError: a sharding of ``q.packed`` or ``q.absmax`` splits a scale block or a packed
        row pair (see :func:`matmul`).
    """
    q = ops._check_weight(q)
    dtype = _shapes.check_activation_dtype(q.dtype if dtype is None else dtype, "dtype")
    n, k = q.shape
    if q.stack_shape:
        raise ValueError(f"q is a stack of weights (stack dims {q.stack_shape}, shape {q.shape}); "
                         "jax_nf4.sharding.dequantize takes one weight: map over the stack with "
                         "lax.scan")
    if n == 0 or k == 0:
        return ops.dequantize(q, dtype)
    absmax = _plain_scales(q)
    _check_now("dequantize", {"q.packed": q.packed, "q.absmax": absmax}, n=n, k=k,
               block_size=q.block_size)
    return _dequantize_cp(q.block_size, np.dtype(dtype), q.packed, absmax)


# ----------------------------------------------------------------------------- decode_attention

def _local_decode_attention(rope_theta: float, qkv, k_cache, v_cache, pos):
    return tuple(decode_attention_p.bind(qkv, k_cache, v_cache, pos, rope_theta=rope_theta))


_decode_attention_cp = custom_partitioning(_local_decode_attention, static_argnums=(0,))


def _decode_attention_rule(rope_theta, mesh, value_types, result_types):
    # (qkv's rows q are the G query heads and the new key and value: a factor apart from g.)
    return ("b h q d, b t h d, b t h d, -> b h g d, b t h d, b t h d",
            {"need_replication_factors": ("q", "d", "t", "g")})  # in order of appearance


def _decode_attention_partition(rope_theta, mesh, arg_shapes, result_shape):
    qkv, k_cache, v_cache, _ = arg_shapes
    b, h = qkv.shape[:2]
    mesh_shape = dict(mesh.shape)
    # Where each operand has the batch and the KV heads: the caches first (the operands worth
    # keeping where they are), then qkv and the results.
    batch_dims = [(k_cache, 0), (v_cache, 0), (qkv, 0)] + [(r, 0) for r in result_shape]
    head_dims = [(k_cache, 2), (v_cache, 2), (qkv, 1)] + [
        (r, 1 if i == 0 else 2) for i, r in enumerate(result_shape)]

    def first_fitting(dims: list, size: int, exclude: tuple = ()) -> tuple:
        """The first operand's mesh axes on its dim that split ``size`` evenly."""
        for operand, dim in dims:
            axes = tuple(a for a in _entry_axes(_sharding_spec(operand.sharding), dim)
                         if a not in exclude)
            if axes and size % _axes_size(mesh_shape, axes) == 0:
                return axes
        return ()

    b_axes = first_fitting(batch_dims, b)
    h_axes = first_fitting(head_dims, h, exclude=b_axes)
    bs, hs = _spec_entry(b_axes), _spec_entry(h_axes)

    def lower(qkv, k_cache, v_cache, pos):
        return _local_decode_attention(rope_theta, qkv, k_cache, v_cache, pos)

    qkv_sharding = NamedSharding(mesh, P(bs, hs, None, None))
    cache_sharding = NamedSharding(mesh, P(bs, None, hs, None))
    return (mesh, lower, (qkv_sharding, cache_sharding, cache_sharding),
            (qkv_sharding, cache_sharding, cache_sharding, NamedSharding(mesh, P())))


_decode_attention_cp.def_partition(_decode_attention_partition,
                                   sharding_rule=_decode_attention_rule)


def decode_attention(qkv: ArrayLike, k_cache: ArrayLike, v_cache: ArrayLike, pos: ArrayLike, *,
                     rope_theta: float = 500000.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`jax_nf4.decode_attention` that XLA partitions under ``jit``: the batch (dim 0 of
    ``qkv`` and the caches) and the KV heads (``qkv`` dim 1, the caches' dim 2) may be sharded,
    each device attending its own sequences and heads over its own cache blocks, with no
    collective; the cache length, the heads of a group and the head dim stay whole (a sharding
    there is not followed: XLA gathers that operand first). ``pos`` is replicated. Same
    arguments and results as :func:`jax_nf4.decode_attention`, bit-identical to it; the results
    come out sharded like the caches (the caches' batch / head axes, else ``qkv``'s).
    """
    return _decode_attention_cp(float(rope_theta),
                                *ops._decode_attention_operands(qkv, k_cache, v_cache, pos))
