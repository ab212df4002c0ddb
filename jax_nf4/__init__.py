"""jax_nf4: NF4 (QLoRA 4-bit NormalFloat) weights for JAX, with fused CPU and CUDA kernels."""

from jax_nf4 import reference
from jax_nf4 import _autodiff  # noqa: F401  (registers the JVP / transpose rules)
from jax_nf4._lowering import cuda_available
from jax_nf4._weight import NF4Weight
from jax_nf4.ops import dequantize, linear, matmul, quantize
from jax_nf4.reference import CODEBOOK

__version__ = "0.1.0"

__all__ = ["CODEBOOK", "NF4Weight", "cuda_available", "dequantize", "linear", "matmul",
           "quantize", "reference"]
