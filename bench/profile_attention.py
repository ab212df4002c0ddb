"""A few calls of decode_attention on one shape, for Nsight Compute:
ncu --clock-control none -k regex:Attention --launch-skip 2 --launch-count 1 \
    python3 bench/profile_attention.py --shape 1,8,4,128,4096
(--shape B,H_kv,G,D,T; bf16, the step at the cache's last slot.)
"""

import argparse

import jax
import jax.numpy as jnp

import jax_nf4

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="1,8,4,128,4096", help="B,H_kv,G,D,T")
parser.add_argument("--dtype", default="bfloat16")
args = parser.parse_args()
b, h, g, d, t = (int(v) for v in args.shape.split(","))
keys = jax.random.split(jax.random.PRNGKey(0), 3)
qkv = jax.random.normal(keys[0], (b, h, g + 2, d), args.dtype)
k = jax.random.normal(keys[1], (b, t, h, d), args.dtype)
v = jax.random.normal(keys[2], (b, t, h, d), args.dtype)
f = jax.jit(jax_nf4.decode_attention)
for _ in range(4):
    out, k, v = f(qkv, k, v, jnp.int32(t - 1))
print(out.shape, float(jnp.abs(out.astype(jnp.float32)).mean()))
