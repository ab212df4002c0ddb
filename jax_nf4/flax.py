"""Flax integration: NF4 dense layers for linen and NNX, model conversion, and QLoRA adapters.

Requires ``flax`` (linen and NNX, tested with flax 0.12). Everything here is built on the public
ops :func:`jax_nf4.quantize` / :func:`jax_nf4.linear` and the :class:`jax_nf4.NF4Weight` pytree,
so it works under ``jax.jit``, ``nnx.jit``, ``jax.lax.scan`` / ``nn.scan`` / ``nnx.scan`` over
stacked layers, ``vmap``, and with optax.

Layers
------
:class:`NF4Dense` (linen) and :class:`NF4Linear` (NNX) mirror ``nn.Dense`` and ``nnx.Linear``
(``features`` / ``in_features, out_features``, ``use_bias``, ``dtype``, ``param_dtype``,
``precision``, ``kernel_init``, ``bias_init``) plus ``block_size`` and optional LoRA adapters
(``lora_rank``, ``lora_alpha``)::

    y = linear(x, W_nf4, bias) + (lora_alpha / lora_rank) * (x @ lora_a) @ lora_b

* **The base layer is frozen state.** The NF4 weight (an ``NF4Weight`` of shape ``(out, in)``,
  i.e. the transpose of a Flax ``[in, out]`` kernel) *and the bias* are not trainable
  parameters: in linen they live in the variable collection ``"nf4"`` (:data:`NF4_COLLECTION`),
  in NNX they are :class:`NF4State` variables (an ``nnx.Variable`` subclass, not ``nnx.Param``).
  So ``jax.grad`` over linen ``"params"`` / ``nnx.grad`` / ``nnx.Optimizer(..., wrt=nnx.Param)``
  never touch them, and the LoRA adapters (``"params"`` ``lora_a [in, r]`` / ``lora_b [r, out]``
  in linen, ``nnx.LoRAParam`` in NNX) are the only trainable parameters of these layers. A
  layer without LoRA has no trainable parameters at all (an inference layer).
* ``lora_a`` is initialised like ``nnx.LoRA`` (``he_uniform``), ``lora_b`` with zeros, so the
  adapted layer starts equal to the frozen one. No dropout. ``lora_alpha=None`` means
  ``alpha = rank`` (scale 1).
* ``kernel_init`` draws a dense ``[in, out]`` kernel in ``param_dtype`` that is quantized at
  init (it may also return an ``NF4Weight`` of shape ``(out, in)`` to be used as is).
* ``dtype`` is the computation dtype; ``None`` promotes the input with the parameters, as
  Flax does. The NF4 product itself always accumulates in float32 (the kernels do) whatever
  ``precision`` says; ``precision`` applies to the LoRA products. The result is in ``dtype``,
  which must be float32, bfloat16 or float16.
* Both need ``in_features % block_size == 0`` and ``out_features`` even (NF4 layout).

Converting an existing model
----------------------------
* linen: :func:`quantize_params` turns a params tree of a model built from ``nn.Dense`` into
  NF4 variables ``{"params": ..., "nf4": ...}``. Run the *unchanged* model with them inside
  :func:`intercept_dense` (it routes each ``nn.Dense`` that has NF4 state to the NF4 product),
  or run a model that uses :class:`NF4Dense` with the same layer names (note that linen names
  unnamed layers after their class: ``Dense_0`` vs ``NF4Dense_0``; pass ``name=``).
* NNX: :func:`quantize_module` replaces the ``nnx.Linear`` submodules of a module by
  :class:`NF4Linear` in place.

Default selection (both): kernels whose both dims are ``>= min_dim`` (128); linen only looks at
2-D leaves named ``kernel`` (so ``nn.Embed``'s ``embedding``, norm ``scale`` / ``bias``, conv and
``DenseGeneral`` kernels stay), NNX only at ``nnx.Linear`` modules (stacked ones, e.g. from
``nnx.vmap``, included). A kernel that cannot be stored as NF4 (``in`` not a multiple of
``block_size`` or ``out`` odd) is left dense, with a warning, even when the predicate selects it.

Training only the adapters
--------------------------
NNX: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and ``nnx.grad(..., argnums=nnx.DiffState(0,
nnx.LoRAParam))``. linen: in a model made only of NF4 layers ``"params"`` holds just the adapters;
in a converted model that keeps embeddings / norms in ``"params"`` use
``optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, lora_labels(params))``.

Saving and restoring
--------------------
``NF4Weight`` is a pytree, so ``nnx.split`` / ``nnx.merge`` / ``nnx.state`` / ``nnx.update``,
pickling and orbax work on it as they are; importing this module also registers it with
``flax.serialization`` (``to_bytes`` / ``from_bytes`` / ``to_state_dict`` store ``packed`` and
``absmax``; the shape, block size and dtype come from the restore target).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx, serialization, traverse_util

from jax_nf4 import _shapes
from jax_nf4._weight import NF4Weight
from jax_nf4.double_quant import DoubleQuantScales
from jax_nf4.ops import linear, quantize

__all__ = ["NF4_COLLECTION", "NF4Dense", "NF4Linear", "NF4State", "intercept_dense",
           "lora_labels", "quantize_module", "quantize_params"]

#: The linen variable collection that holds the frozen NF4 kernels and biases.
NF4_COLLECTION = "nf4"

Array = jax.Array
Initializer = Callable[..., Any]
Predicate = Callable[[tuple, Any], bool]

default_kernel_init = nn.initializers.lecun_normal()
default_bias_init = nn.initializers.zeros_init()
default_lora_a_init = nn.initializers.he_uniform()
default_lora_b_init = nn.initializers.zeros_init()
LoRAParam = nnx.LoRAParam


# ----------------------------------------------------------------------------- shared math

def _lora_scale(rank: int, alpha: float | None) -> float:
    return 1.0 if alpha is None else float(alpha) / float(rank)


def _nf4_dense(x: Array, kernel: NF4Weight, bias: Array | None, lora_a: Array | None,
               lora_b: Array | None, *, lora_alpha: float | None, dtype: Any,
               precision: Any) -> Array:
    """``linear(x, kernel, bias) + (alpha / r) * (x @ lora_a) @ lora_b`` in ``dtype``."""
    x = jnp.asarray(x)
    if dtype is None:
        dtype = jnp.result_type(x.dtype, kernel.dtype,
                                *(p.dtype for p in (bias, lora_a, lora_b) if p is not None))
    dtype = _shapes.check_activation_dtype(dtype, "the computation dtype")
    x = x.astype(dtype)
    y = linear(x, kernel, bias)  # NF4 product with float32 accumulation; bias added in float32
    if lora_a is not None:
        a = jnp.asarray(lora_a).astype(dtype)
        b = jnp.asarray(lora_b).astype(dtype)
        delta = jnp.matmul(jnp.matmul(x, a, precision=precision), b, precision=precision)
        y = y + (delta * _lora_scale(a.shape[-1], lora_alpha)).astype(dtype)
    return y


def _as_nf4(w: Any, in_features: int, out_features: int, block_size: int, where: str
            ) -> NF4Weight:
    """A dense ``[..., in, out]`` kernel (Flax layout) quantized to NF4 ``(out, in)``, or an
    ``NF4Weight`` checked and passed through."""
    if not isinstance(w, NF4Weight):
        w = jnp.asarray(w)
        if w.shape[-2:] != (in_features, out_features):
            raise ValueError(f"{where}: kernel_init gave shape {tuple(w.shape)}, expected "
                             f"[..., {in_features}, {out_features}]")
        _check_quantizable(in_features, out_features, block_size, where)
        w = quantize(jnp.swapaxes(w, -1, -2), block_size=block_size)
    if w.shape != (out_features, in_features):
        raise ValueError(f"{where}: NF4 kernel has shape (out, in) = {w.shape}, expected "
                         f"{(out_features, in_features)}")
    return w


def _check_quantizable(in_features: int, out_features: int, block_size: int, where: str):
    if not _quantizable(in_features, out_features, block_size):
        raise ValueError(f"{where}: an NF4 layer needs in_features % block_size == 0 and "
                         f"out_features even, got in_features={in_features}, "
                         f"out_features={out_features}, block_size={block_size}")


def _quantizable(in_features: int, out_features: int, block_size: int) -> bool:
    return in_features % block_size == 0 and out_features % 2 == 0


# ----------------------------------------------------------------------------- linen

class NF4Dense(nn.Module):
    """A linen ``nn.Dense`` whose kernel is a frozen NF4 weight, with optional LoRA adapters.

    Variables: ``"nf4"`` (:data:`NF4_COLLECTION`, frozen): ``kernel`` (an ``NF4Weight`` of shape
    ``(features, in_features)``) and ``bias`` ``[features]`` if ``use_bias``; ``"params"``
    (trainable, only if ``lora_rank > 0``): ``lora_a [in_features, lora_rank]``,
    ``lora_b [lora_rank, features]``. See the module docstring for the semantics of
    ``dtype`` / ``precision`` and the LoRA scale ``lora_alpha / lora_rank``.

    Attributes:
      features: output features (even).
      use_bias: whether to add a (frozen) bias.
      dtype: computation dtype (default: promoted from the input and parameters).
      param_dtype: dtype of the kernel before quantization, of the bias and of the adapters.
      precision: ``lax.Precision`` of the LoRA products (the NF4 product accumulates in f32).
      kernel_init: initializer of the dense ``[in, out]`` kernel quantized at init.
      bias_init: initializer of the bias.
      block_size: NF4 block size (``in_features`` must be a multiple).
      lora_rank: rank of the LoRA adapters; 0 disables them.
      lora_alpha: LoRA alpha; the update is scaled by ``lora_alpha / lora_rank`` (None: 1).
      lora_a_init / lora_b_init: initializers of the adapters (B = 0 by default).
    """

    features: int
    use_bias: bool = True
    dtype: Any | None = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = default_bias_init
    block_size: int = 64
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_a_init: Initializer = default_lora_a_init
    lora_b_init: Initializer = default_lora_b_init

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        in_features = jnp.shape(inputs)[-1]
        where = f"NF4Dense {self.name or ''}".rstrip()

        def init_kernel():
            w = self.kernel_init(self.make_rng("params"), (in_features, self.features),
                                 self.param_dtype)
            return _as_nf4(w, in_features, self.features, self.block_size, where)

        kernel = self.variable(NF4_COLLECTION, "kernel", init_kernel).value
        if not isinstance(kernel, NF4Weight) or kernel.shape != (self.features, in_features):
            raise ValueError(f"{where}: the '{NF4_COLLECTION}' kernel must be an NF4Weight of "
                             f"shape {(self.features, in_features)}, got {kernel!r}")
        bias = None
        if self.use_bias:
            bias = self.variable(NF4_COLLECTION, "bias", lambda: self.bias_init(
                self.make_rng("params"), (self.features,), self.param_dtype)).value
        lora_a = lora_b = None
        if self.lora_rank:
            lora_a = self.param("lora_a", self.lora_a_init, (in_features, self.lora_rank),
                                self.param_dtype)
            lora_b = self.param("lora_b", self.lora_b_init, (self.lora_rank, self.features),
                                self.param_dtype)
        return _nf4_dense(inputs, kernel, bias, lora_a, lora_b, lora_alpha=self.lora_alpha,
                          dtype=self.dtype, precision=self.precision)


def _dense_interceptor(lora_alpha: float | None):
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
                or not module.has_variable(NF4_COLLECTION, "kernel")):
            return next_fun(*args, **kwargs)
        (inputs,) = args  # nn.Dense.__call__(self, inputs)
        kernel = module.get_variable(NF4_COLLECTION, "kernel")
        in_features = jnp.shape(inputs)[-1]
        if kernel.shape != (module.features, in_features):
            raise ValueError(f"nn.Dense {module.name}: its NF4 kernel has shape {kernel.shape}, "
                             f"expected (features, in) = {(module.features, in_features)}")
        bias = None
        if module.use_bias:
            for col in (NF4_COLLECTION, "params"):
                if module.has_variable(col, "bias"):
                    bias = module.get_variable(col, "bias")
                    break
            else:
                raise ValueError(f"nn.Dense {module.name}: use_bias=True but no bias in the "
                                 f"'{NF4_COLLECTION}' or 'params' collections")
        lora_a = lora_b = None
        if module.has_variable("params", "lora_a"):
            lora_a = module.get_variable("params", "lora_a")
            lora_b = module.get_variable("params", "lora_b")
        return _nf4_dense(inputs, kernel, bias, lora_a, lora_b, lora_alpha=lora_alpha,
                          dtype=module.dtype, precision=module.precision)

    return interceptor


@contextlib.contextmanager
def intercept_dense(lora_alpha: float | None = None) -> Iterator[None]:
    """Runs unchanged linen models on NF4 variables from :func:`quantize_params`.

    Inside the context, every ``nn.Dense`` (or subclass) call whose module has a ``"kernel"``
    in the ``"nf4"`` collection computes ``linear(x, kernel, bias)`` plus its LoRA update
    (``params`` ``lora_a`` / ``lora_b`` if present, scaled by ``lora_alpha / rank``, 1 if
    ``lora_alpha`` is None) instead of the dense product; other modules and dense layers
    that were not quantized run as usual. Enter it inside the function you ``jax.jit``
    (tracing is what it affects)::

        @jax.jit
        def forward(variables, x):
            with jax_nf4.flax.intercept_dense():
                return model.apply(variables, x)
    """
    with nn.intercept_methods(_dense_interceptor(lora_alpha)):
        yield


def _default_linen_predicate(min_dim: int) -> Predicate:
    def predicate(path: tuple, kernel: Any) -> bool:
        return (bool(path) and path[-1] == "kernel" and jnp.ndim(kernel) == 2
                and min(jnp.shape(kernel)) >= min_dim)
    return predicate


def _is_variables(tree: Any) -> bool:
    return isinstance(tree, dict) and isinstance(tree.get("params"), dict)


def quantize_params(params: Any, predicate: Predicate | None = None, *, block_size: int = 64,
                    min_dim: int = 128, lora_rank: int = 0, rng: Array | None = None,
                    lora_param_dtype: Any = jnp.float32,
                    lora_a_init: Initializer = default_lora_a_init,
                    lora_b_init: Initializer = default_lora_b_init) -> dict:
    """Quantizes the Dense kernels of a linen params tree to NF4.

    Args:
      params: the ``"params"`` collection of a linen model (``variables["params"]``), or the
        whole variables dict (other collections, e.g. ``batch_stats``, are copied through).
        FrozenDicts are accepted.
      predicate: ``predicate(path, kernel) -> bool`` choosing the kernels to quantize; ``path``
        is the tuple of keys down to the leaf (``("Dense_0", "kernel")``). Default: leaves named
        ``kernel`` that are 2-D with both dims ``>= min_dim``. A selected kernel is treated as
        ``[..., in, out]`` (leading dims give stacked layers, e.g. from ``nn.scan``).
      block_size: NF4 block size. Kernels with ``in % block_size != 0`` or an odd ``out`` stay
        dense (a warning lists them).
      min_dim: threshold of the default predicate.
      lora_rank: if > 0, adds LoRA adapters ``lora_a [..., in, r]`` (``lora_a_init``) and
        ``lora_b [..., r, out]`` (zeros) in ``params`` next to each quantized kernel; needs
        ``rng``.
      rng: PRNG key for the adapters.
      lora_param_dtype: dtype of the adapters.

    Returns:
      A variables dict ``{"params": ..., "nf4": ..., <other collections>}``: for each quantized
      layer, ``nf4/<path>/kernel`` is an ``NF4Weight`` of shape ``(out, in)`` (the transposed
      kernel) and its bias moves to ``nf4/<path>/bias`` (frozen); everything else stays in
      ``params``. Use it with :func:`intercept_dense` on the original model, or with a model
      built from :class:`NF4Dense` layers of the same names (``lora_rank`` equal).
    """
    from flax.core import unfreeze

    tree = unfreeze(params)  # a (deep) copy as plain dicts; the input is not modified
    if _is_variables(tree):
        others = {k: v for k, v in tree.items() if k not in ("params", NF4_COLLECTION)}
        nf4_in = tree.get(NF4_COLLECTION, {})
        tree = tree["params"]
    else:
        others, nf4_in = {}, {}
    if lora_rank and rng is None:
        raise ValueError("quantize_params: lora_rank > 0 needs rng (a PRNG key) for lora_a")
    predicate = predicate or _default_linen_predicate(min_dim)

    flat = traverse_util.flatten_dict(tree)
    nf4 = dict(traverse_util.flatten_dict(nf4_in)) if nf4_in else {}
    out = dict(flat)
    skipped = []
    for index, (path, leaf) in enumerate(sorted(flat.items(), key=lambda kv: kv[0])):
        if not predicate(path, leaf):
            continue
        if jnp.ndim(leaf) < 2 or path[-1] != "kernel":
            skipped.append(f"{'/'.join(map(str, path))} (not a [..., in, out] kernel)")
            continue
        *lead, k, n = jnp.shape(leaf)
        dtype = np.dtype(jnp.asarray(leaf).dtype)
        if not _quantizable(k, n, block_size) or dtype.kind != "f":
            skipped.append(f"{'/'.join(map(str, path))} {tuple(jnp.shape(leaf))} {dtype.name}")
            continue
        prefix = path[:-1]
        nf4[prefix + ("kernel",)] = quantize(jnp.swapaxes(jnp.asarray(leaf), -1, -2),
                                             block_size=block_size)
        del out[path]
        if prefix + ("bias",) in out:
            nf4[prefix + ("bias",)] = out.pop(prefix + ("bias",))
        if lora_rank:
            key = jax.random.fold_in(rng, index)
            out[prefix + ("lora_a",)] = lora_a_init(key, (*lead, k, lora_rank), lora_param_dtype)
            out[prefix + ("lora_b",)] = lora_b_init(key, (*lead, lora_rank, n), lora_param_dtype)
    if skipped:
        warnings.warn("jax_nf4.flax.quantize_params: left dense (NF4 needs in % block_size == 0 "
                      f"and out even, block_size={block_size}): " + ", ".join(skipped),
                      stacklevel=2)
    result = {"params": traverse_util.unflatten_dict(out) if out else {},
              NF4_COLLECTION: traverse_util.unflatten_dict(nf4) if nf4 else {}}
    result.update(others)
    return result


def lora_labels(params: Any) -> Any:
    """The params tree with each leaf replaced by ``"lora"`` (leaves named ``lora_a`` /
    ``lora_b``) or ``"frozen"``, for ``optax.multi_transform({"lora": tx, "frozen":
    optax.set_to_zero()}, lora_labels(params))``."""
    def label(path, _):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
        return "lora" if name in ("lora_a", "lora_b") else "frozen"
    return jax.tree_util.tree_map_with_path(label, params)


# ----------------------------------------------------------------------------- NNX

class NF4State(nnx.Variable):
    """Frozen, non-trainable state of NF4 layers: the ``NF4Weight`` kernel and the bias.

    Not an ``nnx.Param``: ``nnx.grad`` and ``nnx.Optimizer`` (``wrt=nnx.Param`` or
    ``nnx.LoRAParam``) leave it alone; ``nnx.state(model, NF4State)`` selects it.
    """


class NF4Linear(nnx.Module):
    """An ``nnx.Linear`` whose kernel is a frozen NF4 weight, with optional LoRA adapters.

    State: ``kernel`` (:class:`NF4State` holding an ``NF4Weight`` of shape
    ``(out_features, in_features)``), ``bias`` (:class:`NF4State` ``[out_features]`` or None),
    ``lora_a`` / ``lora_b`` (``nnx.LoRAParam`` ``[in, r]`` / ``[r, out]``, or None): the adapters
    are the only trainable parameters. See the module docstring for ``dtype`` / ``precision``
    and the LoRA scale ``lora_alpha / lora_rank``.

    Args mirror ``nnx.Linear`` (``in_features``, ``out_features``, ``use_bias``, ``dtype``,
    ``param_dtype``, ``precision``, ``kernel_init``, ``bias_init``, ``rngs``) plus
    ``block_size``, ``lora_rank`` (0: no adapters), ``lora_alpha``, ``lora_a_init``,
    ``lora_b_init``. ``kernel_init`` may return an ``NF4Weight`` of shape ``(out, in)``
    (used as is; with leading stack dims for stacked layers).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Any | None = None, param_dtype: Any = jnp.float32,
                 precision: Any = None, kernel_init: Initializer = default_kernel_init,
                 bias_init: Initializer = default_bias_init, block_size: int = 64,
                 lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_a_init: Initializer = default_lora_a_init,
                 lora_b_init: Initializer = default_lora_b_init, rngs: nnx.Rngs):
        where = f"NF4Linear({in_features}, {out_features})"
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.block_size = block_size
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        kernel = _as_nf4(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                         in_features, out_features, block_size, where)
        lead = kernel.stack_shape
        self.kernel = NF4State(kernel)
        self.bias = (NF4State(jnp.asarray(bias_init(rngs.params(), (*lead, out_features),
                                                    param_dtype)))
                     if use_bias else None)
        if lora_rank:
            self.lora_a = LoRAParam(lora_a_init(rngs.params(), (*lead, in_features, lora_rank),
                                                param_dtype))
            self.lora_b = LoRAParam(lora_b_init(rngs.params(), (*lead, lora_rank, out_features),
                                                param_dtype))
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, inputs: Array) -> Array:
        bias = self.bias.get_value() if self.bias is not None else None
        lora_a = self.lora_a.get_value() if self.lora_a is not None else None
        lora_b = self.lora_b.get_value() if self.lora_b is not None else None
        return _nf4_dense(inputs, self.kernel.get_value(), bias, lora_a, lora_b,
                          lora_alpha=self.lora_alpha, dtype=self.dtype,
                          precision=self.precision)


def _default_nnx_predicate(min_dim: int) -> Predicate:
    def predicate(path: tuple, kernel: Any) -> bool:
        return min(jnp.shape(kernel)[-2:]) >= min_dim
    return predicate


def _get_child(node: Any, key: Any) -> Any:
    if isinstance(key, str) and hasattr(node, key):
        return getattr(node, key)
    return node[key]


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(key, str) and hasattr(node, key):
        setattr(node, key, value)
    else:
        node[key] = value


def quantize_module(module: nnx.Module, predicate: Predicate | None = None, *,
                    block_size: int = 64, min_dim: int = 128, lora_rank: int = 0,
                    lora_alpha: float | None = None, rngs: nnx.Rngs | None = None,
                    lora_param_dtype: Any | None = None) -> nnx.Module:
    """Replaces the ``nnx.Linear`` submodules of ``module`` by :class:`NF4Linear`, in place.

    Args:
      module: an NNX module (modified in place and returned; if ``module`` itself is an
        ``nnx.Linear``, the new ``NF4Linear`` is returned).
      predicate: ``predicate(path, kernel) -> bool``; ``path`` is the module path plus
        ``"kernel"``, ``kernel`` the dense ``[..., in, out]`` array. Default: both of the last
        two dims ``>= min_dim`` (stacked layers from ``nnx.vmap`` are quantized as stacks).
        Only exact ``nnx.Linear`` instances are considered (not subclasses such as
        ``nnx.LoRALinear``).
      block_size: NF4 block size; layers with ``in % block_size != 0`` or an odd ``out`` stay
        ``nnx.Linear`` (a warning lists them).
      lora_rank, lora_alpha: add LoRA adapters (``nnx.LoRAParam``) to every converted layer;
        needs ``rngs``.
      lora_param_dtype: dtype of the adapters (default: the layer's ``param_dtype``).

    The converted layer keeps ``use_bias``, ``dtype``, ``param_dtype`` and ``precision``; its
    kernel is the NF4 quantization of ``kernel.T`` (in the kernel's dtype), its bias the old
    bias as frozen :class:`NF4State`.
    """
    if lora_rank and rngs is None:
        raise ValueError("quantize_module: lora_rank > 0 needs rngs (nnx.Rngs) for lora_a")
    predicate = predicate or _default_nnx_predicate(min_dim)
    targets = [(tuple(path), m) for path, m in nnx.iter_modules(module)
               if type(m) is nnx.Linear]
    skipped = []
    for path, lin in targets:
        kernel = lin.kernel.get_value()
        if not predicate(path + ("kernel",), kernel):
            continue
        k, n = jnp.shape(kernel)[-2:]
        if not _quantizable(k, n, block_size):
            skipped.append(f"{'/'.join(map(str, path))} {tuple(jnp.shape(kernel))}")
            continue
        q = quantize(jnp.swapaxes(kernel, -1, -2), block_size=block_size)
        bias = lin.bias.get_value() if lin.bias is not None else None
        new = NF4Linear(
            k, n, use_bias=bias is not None, dtype=lin.dtype, param_dtype=(
                lora_param_dtype if lora_param_dtype is not None else lin.param_dtype),
            precision=lin.precision, kernel_init=lambda *_, q=q: q,
            bias_init=lambda *_, b=bias: b, block_size=block_size, lora_rank=lora_rank,
            lora_alpha=lora_alpha, rngs=rngs if rngs is not None else nnx.Rngs(0))
        if not path:
            module = new
            continue
        parent = module
        for key in path[:-1]:
            parent = _get_child(parent, key)
        _set_child(parent, path[-1], new)
    if skipped:
        warnings.warn("jax_nf4.flax.quantize_module: left nnx.Linear (NF4 needs "
                      f"in % block_size == 0 and out even, block_size={block_size}): "
                      + ", ".join(skipped), stacklevel=2)
    return module


# ----------------------------------------------------------------------------- serialization

_DQ_FIELDS = ("codes", "nested_absmax", "table", "offset")


def _nf4_to_state_dict(q: NF4Weight) -> dict:
    if isinstance(q.absmax, DoubleQuantScales):
        absmax = {f: serialization.to_state_dict(getattr(q.absmax, f)) for f in _DQ_FIELDS}
    else:
        absmax = serialization.to_state_dict(q.absmax)
    return {"packed": serialization.to_state_dict(q.packed), "absmax": absmax}


def _nf4_from_state_dict(target: NF4Weight, state: dict) -> NF4Weight:
    missing = {"packed", "absmax"} - set(state)
    if missing:
        raise ValueError(f"cannot restore an NF4Weight: the state dict lacks {sorted(missing)}")
    packed = jnp.asarray(serialization.from_state_dict(target.packed, state["packed"]))
    if isinstance(target.absmax, DoubleQuantScales):
        stored = state["absmax"]
        if not isinstance(stored, dict) or set(stored) != set(_DQ_FIELDS):
            raise ValueError(f"cannot restore {target!r}: its double-quantized scales need the "
                             f"keys {list(_DQ_FIELDS)}")
        absmax = DoubleQuantScales(
            *(jnp.asarray(serialization.from_state_dict(getattr(target.absmax, f), stored[f]))
              for f in _DQ_FIELDS), target.absmax.nested_block_size)
    else:
        absmax = jnp.asarray(serialization.from_state_dict(target.absmax, state["absmax"]))
    restored = NF4Weight(packed, absmax, target.shape, target.block_size, target.dtype)
    if restored.stack_shape != target.stack_shape:
        raise ValueError(f"cannot restore {target!r}: stored stack dims {restored.stack_shape}")
    return restored


serialization.register_serialization_state(NF4Weight, _nf4_to_state_dict, _nf4_from_state_dict,
                                           override=True)
