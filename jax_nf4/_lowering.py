"""FFI target registration and per-platform lowerings of the NF4 primitives.

The CPU module is always built; the CUDA module only where CUDA was found at build time
(``jax_nf4.cuda_available()`` tells). ``nf4_matmul`` runs the fused dequant + GEMV kernel for
M (activation rows) up to :func:`fused_max_rows` and, above it, the dequantize kernel followed
by an XLA dot (tensor cores on GPU, XLA's threaded dot on CPU):

- CUDA, bfloat16 / float16 activations with a power-of-two ``block_size >= 64``: fused
  tensor-core kernels (float32 accumulation) up to M = 256, and for every M on H100 / H200
  (:func:`cuda_wgmma_available`), where M > 64 runs the wgmma kernel.
  M <= 8 runs the byte-pair GEMV (one table lookup per code byte, a persistent grid; on GPUs
  that give a CTA 145 KB of shared memory: sm_80, sm_90; elsewhere the 16-row-tile GEMV): the
  weight enters the product as codebook values in the activation dtype, scaled in float32 per
  64 elements. M > 8 runs the tiled kernel (activations and weights staged in shared memory,
  256 weight rows x up to 128 activation rows per CTA, 95 - 200 KB of shared memory by M tile:
  smaller tiles where a CTA gets less): there the weight enters scaled, rounded to the
  activation dtype as dequantize + dot rounds it (float16 activations need weights within
  float16 range, as dequantize to float16 does). The wgmma kernel (sm_90a) streams the weights
  and activations of each 64-element stage into shared memory by TMA (128 or, for small grids,
  64 row pairs x 128 activation rows per CTA up to M = 128, 64 x 256 above), decodes the weights
  into registers as the tiled kernel does, and multiplies with Hopper's warpgroup MMA. Without
  it, above M = 256 the weight is dequantized to the activation dtype and multiplied by an XLA
  dot.
- CUDA otherwise (float32 activations, other block sizes): fused SIMT GEMV up to M = 8.
- CPU: fused loop up to M = 8; above it the weight is dequantized to float32 and multiplied
  in float32, so CPU results follow the float32 contract for every M.

``decode_attention`` (rotary, cache write and attention of one decode step) is one FFI call on
each platform, its cache operands aliased to its cache results so that XLA updates the cache
in place (where it can donate the buffer: a jit argument donated, or a loop carry).
"""

from __future__ import annotations

import sys
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import mlir

from jax_nf4 import _nf4_cpu
from jax_nf4._primitives import (decode_attention_p, nf4_dequantize_p, nf4_matmul_p,
                                 nf4_quantize_p)

try:
    from jax_nf4 import _nf4_cuda
except ImportError:  # built without CUDA
    _nf4_cuda = None


CUDA_TILED_MAX_ROWS = 256  # the tiled kernel's M range on CUDA (dequantize + dot above)


@cache
def cuda_wgmma_available() -> bool:
    """True when the CUDA module has the sm_90a wgmma kernel and every local GPU is compute
    capability 9.0 (H100 / H200): CUDA lowerings then send every M to the fused kernels."""
    if _nf4_cuda is None or not _nf4_cuda.has_wgmma():
        return False
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend
        return False
    return all(getattr(d, "compute_capability", None) == "9.0" for d in gpus)


def fused_max_rows(platform: str, dtype, block_size: int) -> int:
    """Largest M (activation rows) that ``platform``'s lowering sends to the fused kernel."""
    power_of_two = block_size & (block_size - 1) == 0
    tensor_cores = np.dtype(dtype) != np.float32 and block_size % 64 == 0 and power_of_two
    if platform != "cuda" or not tensor_cores:
        return 8
    return sys.maxsize if cuda_wgmma_available() else CUDA_TILED_MAX_ROWS


def _ffi_rule(target: str, plain_operands: int | None = None):
    """An FFI lowering that passes block_size on as the only attribute (dequantize's dtype
    param is carried by its result type). With ``plain_operands`` given, a call with more
    operands (double-quantized scales: four instead of one absmax) goes to the ``_dq`` target."""
    plain = jax.ffi.ffi_lowering(f"jax_nf4_{target}")
    double_quant = jax.ffi.ffi_lowering(f"jax_nf4_{target}_dq")

    def lowering(ctx, *args, block_size, **_):
        dq = plain_operands is not None and len(args) > plain_operands
        return (double_quant if dq else plain)(ctx, *args, block_size=block_size)

    return lowering


def _dequantize_then_dot(x, packed, *scales, block_size, weight_dtype):
    """Large-M matmul: dequantize with the kernel, then an XLA dot (float32 accumulation)."""
    w = nf4_dequantize_p.bind(packed, *scales, block_size=block_size, dtype=weight_dtype)
    lhs = x.astype(weight_dtype)
    precision = lax.Precision.HIGHEST if weight_dtype == np.float32 else None
    out = jnp.einsum("gmk,gnk->gmn", lhs, w, precision=precision,
                     preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def _matmul_rule(platform: str):
    """Fused kernel up to fused_max_rows, dequantize + dot above (float32 weights on CPU)."""
    fused = _ffi_rule("nf4_matmul", plain_operands=3)

    def lowering(ctx, x, packed, *scales, block_size):
        x_aval = ctx.avals_in[0]
        if x_aval.shape[1] <= fused_max_rows(platform, x_aval.dtype, block_size):
            return fused(ctx, x, packed, *scales, block_size=block_size)
        weight_dtype = np.dtype(np.float32 if platform == "cpu" else x_aval.dtype)
        dense = partial(_dequantize_then_dot, block_size=block_size, weight_dtype=weight_dtype)
        return mlir.lower_fun(dense, multiple_results=False)(ctx, x, packed, *scales)

    return lowering


def _decode_attention_rule():
    """qkv, k_cache, v_cache, pos -> out, k_cache, v_cache, the caches aliased in place;
    rope_theta is the one (float32) attribute."""
    call = jax.ffi.ffi_lowering("jax_nf4_decode_attention", operand_output_aliases={1: 1, 2: 2})

    def lowering(ctx, qkv, k_cache, v_cache, pos, *, rope_theta):
        return call(ctx, qkv, k_cache, v_cache, pos, rope_theta=np.float32(rope_theta))

    return lowering


def _register(module, platform: str, xla_platform: str) -> None:
    """``module``'s FFI targets (XLA's platform name) and every primitive's lowering on
    ``platform`` (JAX's)."""
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(f"jax_nf4_{name}", capsule, platform=xla_platform)
    mlir.register_lowering(nf4_quantize_p, _ffi_rule("nf4_quantize"), platform=platform)
    mlir.register_lowering(nf4_dequantize_p, _ffi_rule("nf4_dequantize", plain_operands=2),
                           platform=platform)
    mlir.register_lowering(nf4_matmul_p, _matmul_rule(platform), platform=platform)
    mlir.register_lowering(decode_attention_p, _decode_attention_rule(), platform=platform)


_register(_nf4_cpu, "cpu", "cpu")
if _nf4_cuda is not None:
    _register(_nf4_cuda, "cuda", "CUDA")


def cuda_available() -> bool:
    """True when the CUDA kernels were built and their lowerings are registered."""
    return _nf4_cuda is not None
