"""A small, readable Llama-style decoder in Flax NNX with NF4 (or dense) linear layers.

RMSNorm, rotary attention with grouped-query heads (``n_heads`` query heads sharing ``n_kv_heads``
key/value heads) and a static KV cache, a SwiGLU MLP. Every projection is a
:class:`jax_nf4.flax.NF4Linear` (``nf4=True``) or an ``nnx.Linear`` (``nf4=False``, the dense
baseline); the rest of the code is shared. Each layer has 4 projections, so 4 NF4 matmuls:
``qkv_proj`` (q, k and v in one layer whose output features are grouped by KV head: the KV head's
query heads, then its k, then its v; :func:`qkv_rows`), ``o_proj``, ``gate_up_proj`` (gate and up
interleaved: feature ``2 i`` is gate's ``i``, ``2 i + 1`` up's) and ``down_proj``. A contiguous
split of the output features (tensor parallelism) keeps whole KV-head groups and gate / up pairs
together. The embedding, the norms and (by default) ``lm_head`` stay dense, as in bitsandbytes /
``jax-nf4 quantize`` checkpoints. Weights are random (no downloads; with the same
``rngs`` seed the NF4 model's kernels are the quantization of the dense model's) or those of a
Hugging Face checkpoint folder (:func:`from_checkpoint`).
Tensor parallelism: :func:`shard_model`.

Decoding (:func:`generate`) is greedy and jitted as one program: the prompt fills the cache in
one forward pass (prefill), then ``lax.scan`` runs one token per step against the static cache
(``max_len`` slots per layer; a step attends to all slots with a position mask, or with
``config.decode_attention`` runs :func:`jax_nf4.decode_attention`: rotary, cache write and
attention over slots ``0 .. pos`` in one kernel). The model goes through ``jax.jit`` as
``nnx.split`` state, so NF4 weights are ordinary pytree arguments.

Presets (:data:`CONFIGS`): ``"tiny"`` (CPU, tests), ``"llama3-8b"`` and ``"llama3-70b"`` (Llama 3
shapes; build them only on a GPU: the 8B model holds about 5.6 GiB of weights in NF4 and 15 GiB
in bf16, the 70B one about 40 GiB in NF4, and its bf16 weights do not fit one 80 GiB card).
Construction draws each projection's random weight on the device and quantizes it right away,
one projection at a time, so the dense weights never exist all at once.
:func:`benchmark_decode` / :func:`compare_decode` time greedy decoding with NF4 and bf16 weights;
``jax-nf4 generate`` and ``jax-nf4 bench --model`` are the command-line front ends.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_nf4._weight import NF4Weight
from jax_nf4.flax import NF4Linear
from jax_nf4.ops import decode_attention, dequantize

__all__ = ["CONFIGS", "KVCache", "Llama", "LlamaConfig", "ShardedLlama", "benchmark_decode",
           "compare_decode", "dequantized_copy", "from_checkpoint", "gate_up_rows", "generate",
           "get_config", "hf_config", "peak_device_bytes", "qkv_rows", "shard_config",
           "shard_model"]

Array = jax.Array


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes of a Llama-style decoder.

    ``n_heads`` must be a multiple of ``n_kv_heads``, and the inputs of the NF4 layers
    (``d_model``, ``n_heads * head_dim``, ``d_ff``) multiples of ``block_size``. ``head_dim``
    defaults to ``d_model // n_heads`` (then ``d_model`` must be a multiple of ``n_heads``);
    the resolved value is stored, so ``dataclasses.replace`` keeps it. Setting it explicitly
    describes, e.g., the shard of a layer that one GPU holds under tensor parallelism
    (``n_heads``, ``n_kv_heads`` and ``d_ff`` divided, ``d_model`` and ``head_dim`` kept).
    ``max_len`` is the number of KV cache slots (prompt + generated tokens). ``tp`` and
    ``tp_axis`` describe one tensor-parallel shard; :func:`shard_config` sets them.
    ``decode_attention``: single-token decode steps with a cache use
    :func:`jax_nf4.decode_attention` (rotary, cache write and attention in one kernel; the
    cache must have the activation dtype); ``False`` keeps the jnp attention, e.g. for a
    plain-XLA baseline.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_len: int
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    block_size: int = 64
    nf4_lm_head: bool = False  # quantize lm_head too (bitsandbytes keeps it dense)
    head_dim: int | None = None  # None: d_model // n_heads
    tp: int = 1  # tensor-parallel shards: lm_head holds vocab_size / tp columns (shard_config)
    tp_axis: str | None = None  # mesh axis of the collectives of a shard (shard_config)
    decode_attention: bool = True  # fused decode-attention kernel for cached 1-token steps

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: need n_heads % n_kv_heads == 0, got {self.n_heads}, "
                             f"{self.n_kv_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"LlamaConfig: without head_dim, need d_model % n_heads == 0, "
                                 f"got {self.d_model}, {self.n_heads}")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: rotary embeddings need an even head_dim, got "
                             f"{self.head_dim}")
        if self.tp < 1 or self.vocab_size % self.tp:
            raise ValueError(f"LlamaConfig: tp must be >= 1 and divide vocab_size "
                             f"{self.vocab_size}, got {self.tp}")


CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=256, max_len=64, rope_theta=10_000.0),
    "llama3-8b": LlamaConfig(vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32,
                             n_kv_heads=8, d_ff=14_336, max_len=8192),
    "llama3-70b": LlamaConfig(vocab_size=128_256, d_model=8192, n_layers=80, n_heads=64,
                              n_kv_heads=8, d_ff=28_672, max_len=8192),
}


def get_config(name: str, **overrides: Any) -> LlamaConfig:
    """A preset of :data:`CONFIGS` with some fields replaced (e.g. ``max_len=``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)


def shard_config(config: LlamaConfig, tp: int, axis: str | None = None) -> LlamaConfig:
    """The shard of ``config`` that one of ``tp`` devices holds under tensor parallelism.

    Megatron-style: qkv_proj, gate_up_proj and lm_head column-parallel (their outputs split
    ``tp`` ways: whole KV-head groups of :func:`qkv_rows`, whole gate / up pairs), o_proj and
    down_proj row-parallel (their inputs split), so ``n_heads``, ``n_kv_heads``, ``d_ff`` and
    lm_head's ``vocab_size`` columns are divided by ``tp`` while ``d_model``, ``head_dim``, the
    embedding and the norms stay whole. With ``axis`` (a mesh axis name) the shard's forward
    pass adds its collectives: a psum of the o_proj and down_proj partial outputs (in float32)
    and an all-gather of the logits, so it must run inside ``jax.shard_map`` over that axis
    (:func:`shard_model` does that). Without ``axis`` it is what one device computes, without
    communication (for timing).
    """
    c = config
    if c.tp != 1:
        raise ValueError(f"shard_config: config is already a 1/{c.tp} shard")
    if tp < 1 or c.n_kv_heads % tp or c.d_ff % tp or c.vocab_size % tp:
        raise ValueError(f"shard_config: tp={tp} must divide n_kv_heads ({c.n_kv_heads}), "
                         f"d_ff ({c.d_ff}) and vocab_size ({c.vocab_size})")
    n_heads, n_kv_heads, d_ff = c.n_heads // tp, c.n_kv_heads // tp, c.d_ff // tp
    for name, k in (("n_heads * head_dim / tp", n_heads * c.head_dim), ("d_ff / tp", d_ff)):
        if k % c.block_size:
            raise ValueError(f"shard_config: tp={tp}: the row-parallel input {name} = {k} is "
                             f"not a multiple of block_size {c.block_size}")
    return dataclasses.replace(c, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff,
                               head_dim=c.head_dim, tp=tp, tp_axis=axis)


def _reduce_shards(x: Array, config: LlamaConfig) -> Array:
    """The sum over the tensor-parallel shards of a row-parallel layer's partial output."""
    if config.tp_axis is None:
        return x
    return jax.lax.psum(x.astype(jnp.float32), config.tp_axis).astype(x.dtype)


# ----------------------------------------------------------------------------- layers

def _linear(config: LlamaConfig, nf4: bool, in_features: int, out_features: int, *,
            dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    """The one switch between NF4 and dense weights (no bias, as in Llama)."""
    if nf4:
        return NF4Linear(in_features, out_features, use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, block_size=config.block_size, rngs=rngs)
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale``, computed in float32, returned in ``dtype``."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale.get_value().astype(jnp.float32)).astype(self.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding of ``x [B, S, heads, D]`` at ``positions [S]`` (Llama's half-split
    layout: dims ``i`` and ``i + D/2`` form a pair), in float32, returned in ``x``'s dtype."""
    d = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)      # [D/2]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [S, D/2]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class KVCache(NamedTuple):
    """Static KV cache: ``k`` and ``v`` hold one ``[batch, max_len, n_kv_heads, head_dim]``
    array per layer; slot ``t`` holds the keys / values of position ``t``. (Separate buffers,
    not one stacked array: a decode step then writes each layer's new slot in place and the
    attention reads the same buffer, with no copy of the layer's cache.)"""

    k: tuple[Array, ...]
    v: tuple[Array, ...]

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, dtype: Any) -> KVCache:
        shape = (batch, config.max_len, config.n_kv_heads, config.head_dim)
        return cls(*(tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
                     for _ in "kv"))


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings; q, k and v in one projection,
    ``qkv_proj`` (one matmul), its ``(n_heads + 2 n_kv_heads) * head_dim`` output features
    grouped by KV head ``h``: query heads ``h g .. h g + g - 1`` (``g = n_heads //
    n_kv_heads``), then k's head ``h``, then v's (:func:`qkv_rows`)."""

    def __init__(self, config: LlamaConfig, nf4: bool, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        c = config
        self.config = c
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.qkv_proj = _linear(c, nf4, c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim,
                                **kw)
        self.o_proj = _linear(c, nf4, c.n_heads * c.head_dim, c.d_model, **kw)

    def __call__(self, x: Array, positions: Array, kv: tuple[Array, Array] | None
                 ) -> tuple[Array, tuple[Array, Array]]:
        """``x [B, S, d_model]`` at ``positions [S]`` (consecutive). Without a cache, attends
        causally within ``x``; with this layer's cache ``(k, v)`` ``[B, max_len, kv, D]``, puts
        the new keys / values at ``positions`` and attends to every slot ``<=`` the query's.
        Returns the output and the keys and values attended to: the updated cache, or
        without one the (rotated) keys and values of ``x`` ``[B, S, kv, D]``. A one-token
        step with a cache of the activation dtype runs :func:`jax_nf4.decode_attention`
        (``config.decode_attention``)."""
        c = self.config
        b, s, _ = x.shape
        groups = c.n_heads // c.n_kv_heads
        qkv = self.qkv_proj(x)
        if (kv is not None and s == 1 and c.decode_attention
                and kv[0].dtype == qkv.dtype == kv[1].dtype):
            out, keys, values = decode_attention(
                qkv.reshape(b, c.n_kv_heads, groups + 2, c.head_dim), kv[0], kv[1],
                positions[0], rope_theta=c.rope_theta)
            out = self.o_proj(out.reshape(b, 1, c.n_heads * c.head_dim))
            return _reduce_shards(out, c), (keys, values)
        qkv = qkv.reshape(b, s, c.n_kv_heads, groups + 2, c.head_dim)
        q = rope(qkv[..., :groups, :].reshape(b, s, c.n_heads, c.head_dim), positions,
                 c.rope_theta)                       # query head h g + i: KV head h's i-th
        k = rope(qkv[..., groups, :], positions, c.rope_theta)
        v = qkv[..., groups + 1, :]
        if kv is None:
            keys, values, key_pos = k, v, positions
        else:
            start = (0, positions[0], 0, 0)
            keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            key_pos = jnp.arange(keys.shape[1])
        q = q.reshape(b, s, c.n_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("bskgd,btkd->bkgst", q, keys.astype(q.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(c.head_dim)
        mask = key_pos[None, :] <= positions[:, None]                       # [S, T]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, values.astype(q.dtype))
        out = self.o_proj(out.reshape(b, s, c.n_heads * c.head_dim))
        return _reduce_shards(out, c), (keys, values)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up interleaved in ``gate_up_proj``."""

    def __init__(self, config: LlamaConfig, nf4: bool, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        c = config
        self.config = c
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.gate_up_proj = _linear(c, nf4, c.d_model, 2 * c.d_ff, **kw)
        self.down_proj = _linear(c, nf4, c.d_ff, c.d_model, **kw)

    def __call__(self, x: Array) -> Array:
        gate_up = self.gate_up_proj(x).reshape(*x.shape[:-1], -1, 2)
        out = self.down_proj(jax.nn.silu(gate_up[..., 0]) * gate_up[..., 1])
        return _reduce_shards(out, self.config)


class Block(nnx.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, nf4: bool, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        norm = {"eps": config.norm_eps, "dtype": dtype, "param_dtype": param_dtype}
        self.attn_norm = RMSNorm(config.d_model, **norm)
        self.attn = Attention(config, nf4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, **norm)
        self.mlp = MLP(config, nf4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, kv):
        h, kv = self.attn(self.attn_norm(x), positions, kv)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


class Llama(nnx.Module):
    """The decoder. ``nf4=True``: NF4 projections (``NF4Linear``); ``False``: ``nnx.Linear``.

    ``dtype`` is the activation / computation dtype, ``param_dtype`` the dtype of the dense
    weights (and of the NF4 weights before quantization; default ``dtype``).
    """

    def __init__(self, config: LlamaConfig, *, nf4: bool = True, dtype: Any = jnp.bfloat16,
                 param_dtype: Any = None, rngs: nnx.Rngs):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = config
        self.nf4 = nf4
        self.dtype = dtype
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([Block(config, nf4, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        self.lm_head = _linear(config, nf4 and config.nf4_lm_head, config.d_model,
                               config.vocab_size // config.tp, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch: int, dtype: Any = None) -> KVCache:
        return KVCache.zeros(self.config, batch, self.dtype if dtype is None else dtype)

    def __call__(self, tokens: Array, cache: KVCache | None = None, pos: Any = 0
                 ) -> tuple[Array, KVCache | None]:
        """Logits ``[B, S, vocab]`` (float32) of ``tokens [B, S]`` placed at positions
        ``pos .. pos + S - 1``, and the updated cache. Without a cache: a plain causal forward
        pass over ``tokens`` (``pos`` still shifts the rotary positions)."""
        positions = pos + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        x = self.embed(tokens)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, positions,
                              None if cache is None else (cache.k[i], cache.v[i]))
            ks.append(k)
            vs.append(v)
        cache = None if cache is None else KVCache(tuple(ks), tuple(vs))
        logits = self.lm_head(self.norm(x)).astype(jnp.float32)
        if self.config.tp_axis is not None:   # each shard holds vocab_size / tp columns
            logits = jax.lax.all_gather(logits, self.config.tp_axis, axis=-1, tiled=True)
        return logits, cache


# ----------------------------------------------------------------------------- checkpoints

def qkv_rows(config: LlamaConfig) -> np.ndarray:
    """For each output feature of ``qkv_proj``, its row in the Hugging Face weights stacked
    ``[q_proj; k_proj; v_proj]`` (``(n_heads + 2 n_kv_heads) * head_dim`` rows):
    ``int64[(n_heads + 2 n_kv_heads) * head_dim]``. Per KV head ``h`` in order: the rows of
    query heads ``h g .. h g + g - 1`` (``g = n_heads // n_kv_heads``, the heads that attend
    with KV head ``h``), then k's head ``h``, then v's head ``h``."""
    c = config
    d, kv = c.head_dim, c.n_kv_heads
    q = np.arange(c.n_heads * d).reshape(kv, -1)          # [kv, g d]: a KV head's query heads
    k = c.n_heads * d + np.arange(kv * d).reshape(kv, d)  # [kv, d]
    return np.concatenate([q, k, k + kv * d], axis=1).reshape(-1)


def gate_up_rows(config: LlamaConfig) -> np.ndarray:
    """For each output feature of ``gate_up_proj``, its row in ``[gate_proj; up_proj]``:
    ``int64[2 d_ff]``, feature ``2 i`` from gate's row ``i`` and ``2 i + 1`` from up's."""
    return np.arange(2 * config.d_ff).reshape(2, -1).T.reshape(-1)


def _hf_layer_sources(c: LlamaConfig) -> dict[tuple[str, ...],
                                              tuple[dict[str, int], np.ndarray | None]]:
    """Per module path of one layer: the Hugging Face ``LlamaForCausalLM`` tensor names it is
    made of with their rows (output features), and for a fused projection the order of its
    rows in their concatenation (:func:`qkv_rows`, :func:`gate_up_rows`)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {
        ("attn", "qkv_proj"): ({"self_attn.q_proj": q, "self_attn.k_proj": kv,
                                "self_attn.v_proj": kv}, qkv_rows(c)),
        ("attn", "o_proj"): ({"self_attn.o_proj": c.d_model}, None),
        ("mlp", "gate_up_proj"): ({"mlp.gate_proj": c.d_ff, "mlp.up_proj": c.d_ff},
                                  gate_up_rows(c)),
        ("mlp", "down_proj"): ({"mlp.down_proj": c.d_model}, None),
        ("attn_norm",): ({"input_layernorm": c.d_model}, None),
        ("mlp_norm",): ({"post_attention_layernorm": c.d_model}, None)}


def _gather_rows(weights: list[NF4Weight], rows: Any, names: tuple[str, ...] | None = None
                 ) -> NF4Weight:
    """The NF4 weight ``(len(rows), K)`` whose row ``i`` is row ``rows[i]`` of the weights
    ``(N_j, K)`` stacked ``[weights[0]; weights[1]; ...]``: the same 4-bit codes and the same
    float32 scales. Double-quantized scales are decoded to float32 first (exactly the values
    they encode): their nested groups of 256 blocks run across rows and each weight has its
    own ``offset``, so gathered rows cannot keep them. Row pairs that stay together (rows
    ``2 j`` and ``2 j + 1`` from one packed row) are copied as packed bytes, others repacked.
    Raises ``ValueError`` (naming the weights by ``names``) for weights that do not stack
    (stacked dims, different ``K`` or ``block_size``) or for ``rows`` that are not an even
    number of valid row indices."""
    names = tuple(names) if names is not None else tuple(f"weights[{i}]"
                                                         for i in range(len(weights)))
    if not weights or len(names) != len(weights):
        raise ValueError(f"_gather_rows: need one or more weights and one name each, got "
                         f"{len(weights)} weights and {len(names)} names")
    first = weights[0]
    for w, name in zip(weights, names):
        if w.stack_shape:
            raise ValueError(f"_gather_rows: {name} is a stack of weights "
                             f"{w.stack_shape}; rows can only be gathered from single matrices")
        if w.shape[1] != first.shape[1] or w.block_size != first.block_size:
            raise ValueError(
                f"_gather_rows: {names[0]} (shape {first.shape}, block_size "
                f"{first.block_size}) and {name} (shape {w.shape}, block_size {w.block_size}) "
                "must have the same K and block_size to share one NF4 weight")
    total = sum(w.shape[0] for w in weights)
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.dtype.kind not in "iu" or rows.size % 2 or (
            rows.size and (rows.min() < 0 or rows.max() >= total)):
        raise ValueError(f"_gather_rows: rows must be an even number of row indices in "
                         f"[0, {total}) (the rows of {', '.join(names)}), got "
                         f"{rows.dtype} {rows.shape} in [{rows.min() if rows.size else '-'}, "
                         f"{rows.max() if rows.size else '-'}]")
    # every weight has an even number of rows, so stacked rows 2 j, 2 j + 1 share a packed row
    lo, hi = rows[0::2], rows[1::2]
    if (lo % 2 == 0).all() and (hi == lo + 1).all():
        packed = jnp.concatenate([jnp.asarray(w.packed) for w in weights])[lo // 2]
    else:
        codes = jnp.concatenate([w.codes() for w in weights])
        packed = (codes[lo] | (codes[hi] << 4)).astype(jnp.uint8)
    absmax = jnp.concatenate([jnp.asarray(w.scales(), jnp.float32) for w in weights])[rows]
    return NF4Weight(packed, absmax, (rows.size, first.shape[1]), first.block_size, first.dtype)


def hf_config(hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face Llama ``config.json`` (``max_len`` defaults to
    ``max_position_embeddings``). Raises ``ValueError`` for what this model does not implement:
    another ``model_type``, ``rope_scaling``, attention or MLP biases, an activation other
    than SiLU."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json: model_type {hf['model_type']!r} is not supported "
                         "(llama only)")
    for key, ok in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False),
                    ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise ValueError(f"config.json: {key} = {hf[key]!r} is not supported (only {ok!r})")
    try:
        kw = {"vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
              "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
              "d_ff": hf["intermediate_size"]}
    except KeyError as e:
        raise ValueError(f"config.json: missing {e.args[0]!r}") from None
    kw.update(n_kv_heads=hf.get("num_key_value_heads") or kw["n_heads"],
              max_len=hf.get("max_position_embeddings", 2048),
              rope_theta=float(hf.get("rope_theta", 10_000.0)),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)), head_dim=hf.get("head_dim"))
    return LlamaConfig(**{**kw, **overrides})


def from_checkpoint(path: Any, *, nf4: bool = True, dtype: Any = jnp.bfloat16,
                    param_dtype: Any = None, max_len: int | None = None) -> Llama:
    """A :class:`Llama` with the weights of a Hugging Face Llama checkpoint folder.

    The folder holds ``config.json`` (:func:`hf_config`) and safetensors shards, dense or
    bitsandbytes NF4 (``jax-nf4 quantize`` output, ``*-bnb-4bit`` models), read with
    :class:`jax_nf4.checkpoint.Checkpoint` one tensor at a time (host memory bounded by the
    largest tensor). With ``nf4=True`` NF4 weights are used as they are (plain or
    double-quantized, any block size) and dense projections are quantized with block 64;
    ``lm_head`` is NF4 when the checkpoint's is. With ``nf4=False`` NF4 weights are
    dequantized to ``param_dtype`` (default ``dtype``). With ``tie_word_embeddings`` and no
    ``lm_head.weight``, lm_head is the embedding. q, k and v go into ``qkv_proj`` in the
    order of :func:`qkv_rows`, gate and up into ``gate_up_proj`` (:func:`gate_up_rows`), with
    the same codes and scales (:func:`_gather_rows`; double-quantized scales decoded).
    Raises :class:`jax_nf4.checkpoint.CheckpointError` (a ``ValueError``) naming the tensor
    for a missing key, a shape that does not fit ``config.json`` or NF4 weights that cannot
    share one layer (different block sizes).
    """
    from jax_nf4 import quantize
    from jax_nf4.checkpoint import Checkpoint, CheckpointError

    ck = Checkpoint(path)
    if ck.config is None:
        raise CheckpointError("a model folder with config.json is needed", path=ck.path)
    entries = {e.name: e for e in ck.entries()}
    tied = "lm_head.weight" not in entries and ck.config.get("tie_word_embeddings", False)
    head_key = "model.embed_tokens.weight" if tied else "lm_head.weight"
    param_dtype = dtype if param_dtype is None else param_dtype
    config = hf_config(ck.config, **({} if max_len is None else {"max_len": max_len}),
                       nf4_lm_head=nf4 and head_key in entries and
                       entries[head_key].kind != "dense")
    model = nnx.eval_shape(lambda: Llama(config, nf4=nf4, dtype=dtype, param_dtype=param_dtype,
                                         rngs=nnx.Rngs(0)))
    # (checkpoint keys with their rows, None: all of the variable's; the variable; whether it
    # is a Linear weight: HF stores (out, in); a fused projection's row order (_gather_rows))
    targets = [({"model.embed_tokens.weight": None}, model.embed.embedding, False, None),
               ({"model.norm.weight": None}, model.norm.scale, False, None),
               ({head_key: None}, model.lm_head.kernel, True, None)]
    layer_sources = _hf_layer_sources(config)  # the same for every layer
    for i, layer in enumerate(model.layers):
        for where, (names, rows) in layer_sources.items():
            module = functools.reduce(getattr, where, layer)
            var = module.scale if len(where) == 1 else module.kernel
            targets.append(({f"model.layers.{i}.{n}.weight": k for n, k in names.items()}, var,
                            len(where) == 2, rows))
    for sources, var, linear, rows in targets:
        want = var.get_value()
        nf4_target = isinstance(want, NF4Weight)
        # the module's matrix and each checkpoint tensor as the checkpoint holds them: (out, in)
        full = tuple(want.shape if nf4_target or not linear else want.shape[::-1])
        keys = tuple(sources)
        values = []
        for key, n in sources.items():
            expected = (full[0] if n is None else n, *full[1:])
            if key not in entries:
                raise CheckpointError("missing key", path=ck.source_of(key), key=key)
            value = ck.load_entry(entries[key])
            if tuple(value.shape) != expected:
                raise CheckpointError(f"shape {tuple(value.shape)} does not fit config.json "
                                      f"(expected {expected})", path=ck.source_of(key), key=key)
            if isinstance(value, NF4Weight):
                value = jax.tree.map(jnp.asarray, value)
                if not nf4_target:
                    value = dequantize(value, param_dtype)
            elif nf4_target:
                value = quantize(jnp.asarray(value, param_dtype), block_size=config.block_size)
            values.append(value if nf4_target else jnp.asarray(value, param_dtype))
        if rows is None:
            value = values[0]
        elif nf4_target:
            try:
                value = _gather_rows(values, rows, keys)
            except ValueError as e:
                raise CheckpointError(str(e), path=ck.source_of(keys[0]), key=keys[0]) from None
        else:
            value = jnp.concatenate(values)[rows]
        var.set_value(value.T if linear and not nf4_target else value)  # Linear: (in, out)
    return model


# ----------------------------------------------------------------------------- decoding

def _decode(graphdef, state, prompt: Array, new_tokens: int) -> Array:
    """The greedy decoding of :func:`generate` (traced inside ``jit`` / ``shard_map``)."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    logits, cache = model(prompt, model.init_cache(batch), 0)      # prefill
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, cache, pos = carry
        logits, cache = model(token[:, None], cache, pos)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, cache, pos + 1), nxt

    init = (first, cache, jnp.asarray(prompt_len, jnp.int32))
    _, rest = jax.lax.scan(step, init, None, length=new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


_generate = jax.jit(_decode, static_argnums=(0, 3))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 6))
def _generate_sharded(graphdef, treedef, mesh, specs, leaves, prompt, new_tokens):
    def shard(leaves, prompt):
        return _decode(graphdef, jax.tree.unflatten(treedef, leaves), prompt, new_tokens)

    # Unchecked: the tokens come from all-gathered logits, the same on every shard.
    return jax.shard_map(shard, mesh=mesh, in_specs=(list(specs), P()), out_specs=P(),
                         check_vma=False)(list(leaves), prompt)


class ShardedLlama(NamedTuple):
    """A :class:`Llama` placed on a mesh for tensor parallelism (made by :func:`shard_model`).

    ``leaves`` are the model's arrays (global shapes) with their ``NamedSharding``; ``graphdef``
    and ``treedef`` describe one shard (:func:`shard_config` ``config``), whose layers run
    inside ``jax.shard_map`` on the local blocks ``specs`` cut out.
    """

    config: LlamaConfig
    mesh: Mesh
    graphdef: Any
    treedef: Any
    specs: tuple[P, ...]
    leaves: tuple[Array, ...]


def shard_model(model: Llama, mesh: Mesh, axis: str = "tp", *, donate: bool = False
                ) -> ShardedLlama:
    """Places ``model``'s weights on ``mesh`` for tensor parallelism over mesh axis ``axis``.

    Each NF4 or dense projection is split along its output (qkv_proj, gate_up_proj, lm_head)
    or input (o_proj, down_proj) features into ``mesh.shape[axis]`` contiguous shards (whole
    KV-head groups of query heads, k and v, whole gate / up pairs, whole scale blocks and
    packed row pairs; :func:`shard_config` checks the sizes); the embedding and norms are
    replicated. :func:`generate` then runs one shard per device with a float32 all-reduce after
    each row-parallel layer and an all-gather of the logits: per token and layer, two
    all-reduces of ``batch * d_model`` values. ``donate=True`` frees each of ``model``'s split
    arrays as soon as its shards exist (``model`` is unusable afterwards), which keeps the peak
    memory of a model built on one device near its size. Double-quantized scales are decoded
    to float32 first (their nested blocks run across the rows of a shard): the same weights,
    3 more bytes per block.
    """
    if axis not in mesh.shape:
        raise ValueError(f"shard_model: mesh has no axis {axis!r} (axes {tuple(mesh.shape)})")
    tp = mesh.shape[axis]
    config = shard_config(model.config, tp, axis)
    param_dtype = model.norm.scale.get_value().dtype
    local = nnx.eval_shape(lambda: Llama(config, nf4=model.nf4, dtype=model.dtype,
                                         param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, local_state = nnx.split(local)
    plain = jax.tree.map(  # double-quantized scales decoded (before donation frees them)
        lambda q: NF4Weight(q.packed, q.scales(), q.shape, q.block_size, q.dtype)
        if isinstance(q, NF4Weight) and q.double_quant else q, nnx.state(model),
        is_leaf=lambda x: isinstance(x, NF4Weight))
    paths_leaves, _ = jax.tree_util.tree_flatten_with_path(plain)
    local_leaves, local_treedef = jax.tree.flatten(local_state)
    if len(local_leaves) != len(paths_leaves):
        raise ValueError("shard_model: the model's weights do not have the structure of a "
                         f"Llama({'NF4' if model.nf4 else 'dense'}) of its config")
    specs = []
    for (path, x), part in zip(paths_leaves, local_leaves):
        split = [d for d, (g, loc) in enumerate(zip(x.shape, part.shape)) if g != loc]
        if len(x.shape) != len(part.shape) or len(split) > 1 or (
                split and x.shape[split[0]] != tp * part.shape[split[0]]):
            raise ValueError(f"shard_model: {jax.tree_util.keystr(path)} has shape {x.shape}, "
                             f"which does not split into {tp} shards of {part.shape}")
        specs.append(P(*(axis if d in split else None for d in range(x.ndim))))
    leaves = []
    for (_, x), spec in zip(paths_leaves, specs):
        leaves.append(jax.device_put(x, NamedSharding(mesh, spec), donate=donate))
        if donate and axis in spec and not x.is_deleted():
            x.delete()  # split into fresh shards; a replicated copy may share x's buffer
    return ShardedLlama(config, mesh, graphdef, local_treedef, tuple(specs), tuple(leaves))


def generate(model: Llama | ShardedLlama, prompt: Array, new_tokens: int) -> Array:
    """Greedy decoding: ``new_tokens`` token ids ``[B, new_tokens]`` (int32) following
    ``prompt [B, P]``. One jitted program (recompiled per model structure, prompt shape and
    ``new_tokens``); needs ``P + new_tokens - 1 <= config.max_len``. A :class:`ShardedLlama`
    decodes tensor-parallel on its mesh (the same tokens up to rounding)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got {prompt.shape}")
    if new_tokens < 1:
        return jnp.zeros((prompt.shape[0], 0), jnp.int32)
    needed = prompt.shape[1] + new_tokens - 1
    if needed > model.config.max_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + {new_tokens} new tokens need "
                         f"{needed} cache slots, config.max_len is {model.config.max_len}")
    if isinstance(model, ShardedLlama):
        return _generate_sharded(model.graphdef, model.treedef, model.mesh, model.specs,
                                 model.leaves, prompt, int(new_tokens))
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, int(new_tokens))


def dequantized_copy(model: Llama) -> Llama:
    """A dense (``nf4=False``) copy of an NF4 model whose kernels are the dequantized NF4
    weights (in the model's param dtype) and whose other weights are the same arrays."""
    c = model.config
    norm_scale = model.norm.scale.get_value()
    dense = Llama(c, nf4=False, dtype=model.dtype, param_dtype=norm_scale.dtype,
                  rngs=nnx.Rngs(0))
    nnx.update(dense, nnx.state(model, nnx.Param))   # embedding, norms, a dense lm_head
    modules = dict(nnx.iter_modules(dense))
    for path, m in nnx.iter_modules(model):
        if isinstance(m, NF4Linear):
            w = dequantize(m.kernel.get_value(), norm_scale.dtype)          # (out, in)
            modules[path].kernel.set_value(jnp.swapaxes(w, -1, -2))
    return dense


# ----------------------------------------------------------------------------- benchmark

def _weight_bytes(model: nnx.Module) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def peak_device_bytes(device: jax.Device | None = None) -> int | None:
    """The peak memory in use so far in this process on ``device`` (default: the first local
    device; its allocator's ``peak_bytes_in_use``), or None where the backend does not report
    it (the CPU)."""
    stats = (jax.local_devices()[0] if device is None else device).memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else int(
        stats["peak_bytes_in_use"])


#: ``progress(done, total, stage)`` of :func:`benchmark_decode`.
Progress = Callable[[int, int, str], None]


def benchmark_decode(config_name: str, batch: int = 1, new_tokens: int = 64, nf4: bool = True,
                     *, prompt_len: int = 16, dtype: Any = jnp.bfloat16, iters: int = 3,
                     seed: int = 0, config: LlamaConfig | None = None,
                     checkpoint: Any = None, profile: bool = False,
                     progress: Progress | None = None) -> dict:
    """Times greedy decoding of one preset with NF4 (``nf4=True``) or dense ``dtype`` weights.

    The cache gets ``max_len = prompt_len + new_tokens``. Building the model is timed as
    ``build_s``, the first call (compiling) as ``compile_s``, then ``iters`` calls are timed;
    ``seconds`` is the best of them (prefill included) and ``tokens_per_s = batch * new_tokens
    / seconds``. ``weight_bytes`` counts all weights (NF4 packed codes and scales, dense
    embedding / norms / lm_head), ``linear_bytes`` only the projections that NF4 replaces;
    ``peak_bytes`` is :func:`peak_device_bytes` after the runs (a process-wide peak: it
    describes this call when earlier calls in the process used less memory). ``progress``, if
    given, is called as ``progress(done, total, "WEIGHTS STAGE")`` when each stage (build,
    compile, each timed run) starts and once at the end (``done == total``). ``weights`` in the
    result names the weights: ``"nf4"``, ``"nf4+lm_head"`` (``config.nf4_lm_head``) or the
    dense dtype. With ``checkpoint`` (a Hugging Face Llama folder) the weights come from
    :func:`from_checkpoint` (loading timed as ``build_s``) instead of ``config_name``'s preset.
    With ``profile``, one more run is traced with ``jax.profiler`` and ``device_ms_per_token``
    holds its device time per generated token by kernel class (``nf4``, ``gemm``, ``other``,
    ``busy``; :func:`jax_nf4.benchmark.traced_device_ms`) and ``top_kernels`` its 16 longest
    kernels per token ``(name, ms, calls)``, both None on a CPU.
    """
    total = 2 + max(1, iters)
    max_len = prompt_len + new_tokens
    t0 = time.perf_counter()
    if checkpoint is not None:
        model = from_checkpoint(checkpoint, nf4=nf4, dtype=dtype, max_len=max_len)
        cfg = model.config
    else:
        base = config if config is not None else get_config(config_name)
        cfg = dataclasses.replace(base, max_len=max_len)
    weights = ("nf4+lm_head" if cfg.nf4_lm_head else "nf4") if nf4 else jnp.dtype(dtype).name

    def report(done: int, stage: str) -> None:
        if progress is not None:
            progress(done, total, f"{weights} {stage}")

    report(0, "build" if checkpoint is None else "load")
    if checkpoint is None:
        model = Llama(cfg, nf4=nf4, dtype=dtype, rngs=nnx.Rngs(seed))
    jax.block_until_ready(nnx.state(model))
    build_s = time.perf_counter() - t0
    linear_types = (NF4Linear, nnx.Linear)
    linear_bytes = sum(_weight_bytes(m) for path, m in nnx.iter_modules(model)
                       if isinstance(m, linear_types) and path[-1] != "lm_head")
    prompt = jax.random.randint(jax.random.PRNGKey(seed), (batch, prompt_len), 0,
                                cfg.vocab_size, jnp.int32)
    report(1, "compile")
    t0 = time.perf_counter()
    tokens = jax.block_until_ready(generate(model, prompt, new_tokens))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(total - 2):
        report(2 + i, f"run {i + 1}/{total - 2}")
        t0 = time.perf_counter()
        jax.block_until_ready(generate(model, prompt, new_tokens))
        times.append(time.perf_counter() - t0)
    device_ms = top = None
    if profile:
        from jax_nf4.benchmark import traced_device_ms

        device_ms, top = traced_device_ms(generate, model, prompt, new_tokens, per=new_tokens,
                                          top=16)
    report(total, "done")
    seconds = min(times)
    return {"config": config_name if checkpoint is None else str(checkpoint),
            "weights": weights, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds,
            "build_s": build_s, "compile_s": compile_s, "weight_bytes": _weight_bytes(model),
            "linear_bytes": linear_bytes, "peak_bytes": peak_device_bytes(),
            "device_ms_per_token": device_ms, "top_kernels": top, "tokens": tokens}


def compare_decode(config_name: str, batch: int = 1, new_tokens: int = 64, **kwargs: Any
                   ) -> list[dict]:
    """:func:`benchmark_decode` with NF4 then dense weights (same shapes and prompt; the NF4
    model, the smaller one, first, so that each ``peak_bytes`` describes its own run)."""
    return [benchmark_decode(config_name, batch, new_tokens, nf4, **kwargs)
            for nf4 in (True, False)]
