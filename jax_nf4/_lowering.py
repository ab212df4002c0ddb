"""FFI target registration and per-platform lowerings of the NF4 primitives.

The CPU module is always built; the CUDA module only where CUDA was found at build time
(``jax_nf4.cuda_available()`` tells). On CUDA, ``nf4_matmul`` runs the fused dequant + GEMV
kernel for M (activation rows) up to :func:`cuda_fused_max_rows` and the dequantize kernel
followed by an XLA dot above it:

- bfloat16 / float16 activations with a power-of-two ``block_size >= 64``: fused tensor-core GEMV
  (mma.m16n8k16, float32 accumulation) up to M = 32;
- other block sizes and float32 activations: fused SIMT GEMV up to M = 8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import mlir

from jax_nf4 import _nf4_cpu
from jax_nf4._primitives import nf4_dequantize_p, nf4_matmul_p, nf4_quantize_p

try:
    from jax_nf4 import _nf4_cuda
except ImportError:  # built without CUDA
    _nf4_cuda = None



def cuda_fused_max_rows(dtype, block_size: int) -> int:
    """Largest M (activation rows) that the CUDA lowering sends to the fused GEMV kernel."""
    power_of_two = block_size & (block_size - 1) == 0
    tensor_cores = np.dtype(dtype) != np.float32 and block_size % 64 == 0 and power_of_two
    return 32 if tensor_cores else 8

_TARGETS = {"nf4_quantize": nf4_quantize_p, "nf4_dequantize": nf4_dequantize_p,
            "nf4_matmul": nf4_matmul_p}


def _ffi_rule(target: str, attributes: tuple[str, ...] = ("block_size",)):
    """An FFI lowering that passes only the named primitive params on as attributes."""
    rule = jax.ffi.ffi_lowering(f"jax_nf4_{target}")

    def lowering(ctx, *args, **params):
        return rule(ctx, *args, **{name: params[name] for name in attributes})

    return lowering


def _dequantize_then_dot(x, packed, absmax, *, block_size):
    """Large-M matmul: dequantize to x.dtype with the kernel, then an XLA dot (f32 accumulate)."""
    w = nf4_dequantize_p.bind(packed, absmax, block_size=block_size, dtype=np.dtype(x.dtype))
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    out = jnp.einsum("gmk,gnk->gmn", x, w, precision=precision,
                     preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def _cuda_matmul_rule():
    fused = _ffi_rule("nf4_matmul")
    dense = mlir.lower_fun(_dequantize_then_dot, multiple_results=False)

    def lowering(ctx, x, packed, absmax, *, block_size):
        x_aval = ctx.avals_in[0]
        rows = x_aval.shape[1]
        rule = fused if rows <= cuda_fused_max_rows(x_aval.dtype, block_size) else dense
        return rule(ctx, x, packed, absmax, block_size=block_size)

    return lowering


def _register(module, platform: str) -> None:
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(f"jax_nf4_{name}", capsule, platform=platform)


_register(_nf4_cpu, "cpu")
for _name, _prim in _TARGETS.items():
    mlir.register_lowering(_prim, _ffi_rule(_name), platform="cpu")

if _nf4_cuda is not None:
    _register(_nf4_cuda, "CUDA")
    mlir.register_lowering(nf4_quantize_p, _ffi_rule("nf4_quantize"), platform="cuda")
    mlir.register_lowering(nf4_dequantize_p, _ffi_rule("nf4_dequantize"), platform="cuda")
    mlir.register_lowering(nf4_matmul_p, _cuda_matmul_rule(), platform="cuda")


def cuda_available() -> bool:
    """True when the CUDA kernels were built and their lowerings are registered."""
    return _nf4_cuda is not None
