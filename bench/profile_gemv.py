"""A few calls of the fused matmul on one shape, for Nsight Compute:
ncu --clock-control none -k regex:'Gemv|GemmTile|GemmWgmma' --launch-skip 2 --launch-count 1 \
    python3 bench/profile_gemv.py --shape 28672x8192 --rows 64 [--double-quant]
With --copies C the calls are chained over C weight copies as in the benchmark (each output
the next input, copies rotated so that L2 does not serve them); profile such a chain's steady
state with `ncu --cache-control none --launch-skip C ...`.
"""

import argparse

import jax
import jax.numpy as jnp

import jax_nf4
from jax_nf4 import benchmark

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="28672x8192")
parser.add_argument("--rows", type=int, default=1)
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--double-quant", action="store_true", help="double-quantized scales")
parser.add_argument("--copies", type=int, default=1, help="weight copies the calls rotate over")
args = parser.parse_args()
n, k = (int(d) for d in args.shape.split("x"))
w = jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32) / k**0.5
x = jax.random.normal(jax.random.PRNGKey(1), (args.rows, k), args.dtype)
if args.copies == 1:
    q = jax_nf4.quantize(w.astype(args.dtype), double_quant=args.double_quant)
    f = jax.jit(jax_nf4.matmul)
    for _ in range(4):
        y = f(x, q).block_until_ready()
else:  # square shapes: y [M, N] is the next x [M, K]
    qs = [jax_nf4.quantize((w * (1 + i / 64)).astype(args.dtype), double_quant=args.double_quant)
          for i in range(args.copies)]
    y = benchmark._chained(jax_nf4.matmul, 2)(x, qs).block_until_ready()
print(y.shape, float(jnp.abs(y.astype(jnp.float32)).mean()))
