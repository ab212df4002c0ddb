"""jax_nf4: NF4 (QLoRA 4-bit NormalFloat) weights for JAX, with fused CPU and CUDA kernels."""

from jax_nf4 import _autodiff  # noqa: F401  (registers the JVP / transpose rules)
from jax_nf4 import bnb, double_quant, reference
from jax_nf4._lowering import cuda_available
from jax_nf4._weight import NF4Weight
from jax_nf4.checkpoint import load_checkpoint
from jax_nf4.double_quant import DoubleQuantScales
from jax_nf4.ops import decode_attention, dequantize, linear, matmul, quantize
from jax_nf4.reference import CODEBOOK
from jax_nf4.safetensors_io import CheckpointError

__version__ = "0.1.0"

__all__ = ["CODEBOOK", "CheckpointError", "DoubleQuantScales", "NF4Weight", "bnb",
           "cuda_available", "decode_attention", "dequantize", "double_quant", "linear",
           "load_checkpoint", "matmul", "quantize", "reference"]
