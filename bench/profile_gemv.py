"""A few calls of the fused matmul on one shape, for Nsight Compute:
ncu --clock-control none -k regex:'Gemv|GemmTile|GemmWgmma' --launch-skip 2 --launch-count 1 \
    python3 bench/profile_gemv.py --shape 28672x8192 --rows 64 [--double-quant]
"""

import argparse

import jax
import jax.numpy as jnp

import jax_nf4

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="28672x8192")
parser.add_argument("--rows", type=int, default=1)
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--double-quant", action="store_true", help="double-quantized scales")
args = parser.parse_args()
n, k = (int(d) for d in args.shape.split("x"))
w = jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32) / k**0.5
q = jax_nf4.quantize(w.astype(args.dtype), double_quant=args.double_quant)
x = jax.random.normal(jax.random.PRNGKey(1), (args.rows, k), args.dtype)
f = jax.jit(jax_nf4.matmul)
for _ in range(4):
    y = f(x, q).block_until_ready()
print(y.shape, float(jnp.abs(y.astype(jnp.float32)).mean()))
