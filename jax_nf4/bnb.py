"""bitsandbytes / Hugging Face NF4 layers (layout B) <-> :class:`~jax_nf4.NF4Weight` (layout A).

A 4-bit layer ``<m>`` of a bitsandbytes checkpoint is a group of tensors keyed on its weight
``<m>.weight``:

==========================================  =================================================
``<m>.weight``                              packed codes, ``[(N*K+1)//2, 1]`` bytes viewed as
                                            the ``quant_storage`` dtype (uint8, bf16, ...);
                                            flat index ``2i`` in the HIGH nibble
``<m>.weight.absmax``                       float32 ``[N*K/bs]`` (plain), or uint8 codes
                                            (double-quantized, "nested")
``<m>.weight.quant_map``                    float32 ``[16]``, the NF4 codebook
``<m>.weight.nested_absmax``                float32 ``[ceil(N*K/bs/256)]`` (nested only)
``<m>.weight.nested_quant_map``             float32 ``[256]`` (nested only)
``<m>.weight.quant_state.bitsandbytes__nf4``  uint8 UTF-8 JSON: quant_type, blocksize, dtype,
                                            shape (+ nested_blocksize, nested_dtype,
                                            nested_offset)
==========================================  =================================================

Conversion is lossless both ways: the same codes and scales, another nibble order (layout A
packs rows ``2j``/``2j+1`` of one column into a byte). Layout A needs N even and K a multiple of
the blocksize (then the flat blocks of bitsandbytes are row blocks); other layers raise a
:class:`CheckpointError`, as do FP4 layers and every missing, mis-shaped or corrupted entry.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_nf4._weight import NF4Weight
from jax_nf4.double_quant import DoubleQuantScales
from jax_nf4.reference import CODEBOOK, pack_pairs, unpack_pairs
from jax_nf4.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "QUANT_STATE_SUFFIX", "AUX_SUFFIXES", "BLOCKSIZES",
           "layout_a_from_b", "layout_b_from_a", "parse_quant_state", "quant_state_json",
           "weight_from_bnb", "weight_to_bnb", "layer_keys", "to_jax"]

QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__nf4"
_FP4_SUFFIX = "quant_state.bitsandbytes__fp4"
#: Suffixes (after ``<m>.weight.``) of the tensors that belong to a 4-bit weight.
AUX_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_SUFFIX,
                _FP4_SUFFIX)
#: Blocksizes bitsandbytes supports for 4-bit weights.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: ``dtype`` strings of the quant state (PyTorch names without ``torch.``) <-> NumPy.
TORCH_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
                "float32": np.dtype(np.float32)}
_TORCH_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


# ----------------------------------------------------------------------------- nibble order

def layout_a_from_b(weight: np.ndarray, n: int, k: int) -> np.ndarray:
    """Layout-B bytes (any storage dtype; flat index ``2i`` high) of a ``[N, K]`` weight ->
    layout-A ``packed uint8[N/2, K]`` (row ``2j`` low, ``2j+1`` high)."""
    b = np.ascontiguousarray(weight).reshape(-1).view(np.uint8)
    if b.size != n * k // 2 or n % 2 or k % 2:
        raise ValueError(f"layout B bytes: need {n * k // 2} bytes for an even [{n}, {k}] "
                         f"weight, got {b.size}")
    b = b.reshape(n, k // 2)
    codes = np.empty((n, k), np.uint8)
    codes[:, 0::2] = b >> 4
    codes[:, 1::2] = b & 15
    return pack_pairs(codes)


def layout_b_from_a(packed: np.ndarray) -> np.ndarray:
    """Layout-A ``packed uint8[N/2, K]`` -> layout-B bytes ``uint8[N*K/2]`` (flat ``2i`` high)."""
    p = np.asarray(packed, np.uint8)
    if p.ndim != 2:
        raise ValueError(f"layout_b_from_a: packed must be [N/2, K], got shape {p.shape}")
    flat = unpack_pairs(p).reshape(-1)
    return ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8)


# ----------------------------------------------------------------------------- quant state

def _err(msg: str, source: Any, key: str) -> CheckpointError:
    return CheckpointError(msg, path=source, key=key)


def parse_quant_state(blob: Any, *, source: Any = None, key: str = QUANT_STATE_SUFFIX
                      ) -> dict[str, Any]:
    """Decodes and checks a ``quant_state.bitsandbytes__nf4`` tensor (uint8 UTF-8 JSON)."""
    raw = np.ascontiguousarray(blob).reshape(-1).view(np.uint8).tobytes()
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(f"corrupted quant state: the JSON blob does not parse ({e})", source,
                   key) from None
    if not isinstance(state, dict):
        raise _err("corrupted quant state: expected a JSON object", source, key)
    qt = state.get("quant_type")
    if qt != "nf4":
        raise _err(f"quant_type {qt!r} is not supported: jax_nf4 reads NF4 only (FP4 and other "
                   "4-bit types have another codebook)", source, key)
    for field in ("blocksize", "dtype", "shape"):
        if field not in state:
            raise _err(f"corrupted quant state: missing {field!r}", source, key)
    bs, shape, dtype = state["blocksize"], state["shape"], state["dtype"]
    if type(bs) is not int or bs not in BLOCKSIZES:
        raise _err(f"blocksize {bs!r} is not one of bitsandbytes' {BLOCKSIZES}", source, key)
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
        raise _err(f"corrupted quant state: bad shape {shape!r}", source, key)
    if dtype not in TORCH_DTYPES:
        raise _err(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}", source, key)
    if "nested_offset" in state or "nested_blocksize" in state:
        nbs, ndt, off = (state.get("nested_blocksize"), state.get("nested_dtype"),
                         state.get("nested_offset"))
        if type(nbs) is not int or nbs <= 0:
            raise _err(f"corrupted quant state: bad nested_blocksize {nbs!r}", source, key)
        if ndt != "float32":
            raise _err(f"nested_dtype {ndt!r} is not supported (float32 only)", source, key)
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise _err(f"corrupted quant state: bad nested_offset {off!r}", source, key)
    return state


def quant_state_json(q: NF4Weight) -> bytes:
    """The quant-state JSON bytes bitsandbytes writes for ``q`` (same keys, order, format)."""
    state: dict[str, Any] = {"quant_type": "nf4", "blocksize": q.block_size,
                             "dtype": _torch_name(q.dtype), "shape": list(q.shape)}
    if q.double_quant:
        state.update({"nested_blocksize": q.absmax.nested_block_size, "nested_dtype": "float32",
                      "nested_offset": float(np.float32(np.asarray(q.absmax.offset)))})
    return json.dumps(state).encode("utf-8")


def _torch_name(dtype: Any) -> str:
    try:
        return _TORCH_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"bitsandbytes stores weights of dtype bfloat16, float16 or float32, "
                         f"not {np.dtype(dtype).name}") from None


# ----------------------------------------------------------------------------- layers

def layer_keys(weight_key: str, nested: bool) -> list[str]:
    """The tensor names of one 4-bit weight, in bitsandbytes' state-dict order."""
    aux = ["absmax", "quant_map"] + (["nested_absmax", "nested_quant_map"] if nested else [])
    return [weight_key] + [f"{weight_key}.{s}" for s in aux + [QUANT_STATE_SUFFIX]]


def _get(tensors: Mapping[str, Any], key: str, source: Any, what: str, near: str = "") -> Any:
    """``tensors[key]``; a missing key is reported in the file of ``near`` (same layer)."""
    if key not in tensors:
        where = _source(tensors, near if near in tensors else key, source)
        raise _err(f"missing key: {what} of a bitsandbytes 4-bit weight is not in the "
                   "checkpoint", where, key)
    return tensors[key]


def _source(tensors: Mapping[str, Any], key: str, default: Any) -> Any:
    where = getattr(tensors, "source_of", None)
    return where(key) if callable(where) else getattr(tensors, "path", default)


def _check(arr: np.ndarray, key: str, dtype: Any, size: int, tensors, source) -> None:
    if np.dtype(arr.dtype) != np.dtype(dtype) or arr.size != size:
        raise _err(f"shape mismatch: expected {np.dtype(dtype).name} with {size} elements, got "
                   f"{np.dtype(arr.dtype).name}{list(arr.shape)}", _source(tensors, key, source),
                   key)


def weight_from_bnb(tensors: Mapping[str, Any], weight_key: str, *, source: Any = None
                    ) -> NF4Weight:
    """Reads the bitsandbytes NF4 weight ``weight_key`` (e.g. ``"model.layers.0.mlp.up_proj.
    weight"``) from ``tensors`` (any mapping of name -> array: a dict, a
    :class:`~jax_nf4.safetensors_io.SafetensorsFile`, a checkpoint) into a NumPy-backed
    :class:`NF4Weight` in layout A; plain or double-quantized scales are kept as they are."""
    if f"{weight_key}.{_FP4_SUFFIX}" in tensors:
        raise _err("FP4 weights are not supported: jax_nf4 reads NF4 only",
                   _source(tensors, f"{weight_key}.{_FP4_SUFFIX}", source),
                   f"{weight_key}.{_FP4_SUFFIX}")
    qs_key = f"{weight_key}.{QUANT_STATE_SUFFIX}"
    near = next((f"{weight_key}.{s}" for s in ("absmax", "quant_map", "nested_absmax")
                 if f"{weight_key}.{s}" in tensors), weight_key)
    state = parse_quant_state(_get(tensors, qs_key, source, "the quant state", near),
                              source=_source(tensors, qs_key, source), key=qs_key)
    bs, shape = state["blocksize"], state["shape"]
    if len(shape) != 2:
        raise _err(f"shape mismatch: NF4Weight holds 2-D weights, the quant state says {shape}",
                   _source(tensors, qs_key, source), qs_key)
    n, k = shape
    if n % 2 or k % bs:
        raise _err(f"shape {shape} with blocksize {bs} does not fit layout A (needs N even and K "
                   "a multiple of the blocksize)", _source(tensors, qs_key, source), qs_key)
    nb = n * k // bs
    weight = _get(tensors, weight_key, source, "the packed weight", qs_key)
    w_bytes = np.ascontiguousarray(weight).reshape(-1).view(np.uint8)
    if w_bytes.size != n * k // 2:
        raise _err(f"shape mismatch: a [{n}, {k}] weight packs into {n * k // 2} bytes, the "
                   f"tensor holds {w_bytes.size} ({np.dtype(weight.dtype).name}"
                   f"{list(weight.shape)})", _source(tensors, weight_key, source), weight_key)
    qm_key = f"{weight_key}.quant_map"
    qmap = _get(tensors, qm_key, source, "the quant map", qs_key)
    _check(qmap, qm_key, np.float32, 16, tensors, source)
    if not np.array_equal(np.asarray(qmap).reshape(-1).view(np.uint32), CODEBOOK.view(np.uint32)):
        raise _err("the quant map is not the NF4 codebook", _source(tensors, qm_key, source),
                   qm_key)
    am_key = f"{weight_key}.absmax"
    absmax = _get(tensors, am_key, source, "the absmax", qs_key)
    packed = layout_a_from_b(w_bytes, n, k)
    if "nested_offset" in state:
        nbs = state["nested_blocksize"]
        _check(absmax, am_key, np.uint8, nb, tensors, source)
        na_key, nq_key = f"{weight_key}.nested_absmax", f"{weight_key}.nested_quant_map"
        nested = _get(tensors, na_key, source, "the nested absmax", qs_key)
        _check(nested, na_key, np.float32, -(-nb // nbs), tensors, source)
        table = _get(tensors, nq_key, source, "the nested quant map", qs_key)
        _check(table, nq_key, np.float32, 256, tensors, source)
        nested = np.array(nested, np.float32).reshape(-1)
        if not np.all(nested >= 0):  # also rejects NaN
            raise _err("corrupted nested absmax: negative or NaN values",
                       _source(tensors, na_key, source), na_key)
        scales: Any = DoubleQuantScales(np.array(absmax, np.uint8).reshape(n, k // bs), nested,
                                        np.array(table, np.float32).reshape(256),
                                        np.asarray(np.float32(state["nested_offset"])), nbs)
    else:
        for extra in ("nested_absmax", "nested_quant_map"):
            if f"{weight_key}.{extra}" in tensors:
                raise _err(f"the quant state has no nested_offset but {extra} exists (a "
                           "double-quantized weight without its quant state?)",
                           _source(tensors, qs_key, source), qs_key)
        _check(absmax, am_key, np.float32, nb, tensors, source)
        scales = np.array(absmax, np.float32).reshape(n, k // bs)
    return NF4Weight(packed, scales, (n, k), bs, TORCH_DTYPES[state["dtype"]])


def weight_to_bnb(q: NF4Weight, weight_key: str, *, quant_storage: Any = np.uint8
                  ) -> dict[str, np.ndarray]:
    """The bitsandbytes tensors of ``q`` (an unstacked :class:`NF4Weight`), keyed and ordered
    as bitsandbytes saves them; ``quant_storage`` views the packed bytes as another dtype."""
    if q.stack_shape:
        raise ValueError(f"weight_to_bnb takes one weight, got a stack {q.stack_shape}")
    raw = layout_b_from_a(np.asarray(q.packed))
    storage = np.dtype(quant_storage)
    if raw.size % storage.itemsize:
        raise ValueError(f"{raw.size} packed bytes do not fill whole {storage.name} elements")
    weight = raw.view(storage).reshape(-1, 1)
    out = {weight_key: weight}
    if q.double_quant:
        dq = q.absmax
        out[f"{weight_key}.absmax"] = np.asarray(dq.codes, np.uint8).reshape(-1)
        out[f"{weight_key}.quant_map"] = CODEBOOK.copy()
        out[f"{weight_key}.nested_absmax"] = np.asarray(dq.nested_absmax, np.float32).reshape(-1)
        out[f"{weight_key}.nested_quant_map"] = np.asarray(dq.table, np.float32).reshape(-1)
    else:
        out[f"{weight_key}.absmax"] = np.asarray(q.absmax, np.float32).reshape(-1)
        out[f"{weight_key}.quant_map"] = CODEBOOK.copy()
    out[f"{weight_key}.{QUANT_STATE_SUFFIX}"] = np.frombuffer(quant_state_json(q), np.uint8).copy()
    return out


def to_jax(q: NF4Weight) -> NF4Weight:
    """``q`` with its leaves as jax arrays (on the default device)."""
    return jax.tree.map(jnp.asarray, q)
