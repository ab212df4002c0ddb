"""The small language model and the device choice shared by the examples."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

import jax_nf4


class LinenLM(nn.Module):
    vocab: int
    d_model: int
    d_ff: int
    layers: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, self.d_model, dtype=self.dtype, name="embed")(tokens)
        for i in range(self.layers):
            u = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(h)
            u = nn.gelu(nn.Dense(self.d_ff, dtype=self.dtype, name=f"up_{i}")(u))
            h = h + nn.Dense(self.d_model, dtype=self.dtype, name=f"down_{i}")(u)
        h = nn.LayerNorm(dtype=self.dtype, name="norm_out")(h)
        return nn.Dense(self.vocab, use_bias=False, dtype=self.dtype, name="head")(h)


class Block(nnx.Module):
    def __init__(self, d_model, d_ff, dtype, rngs):
        self.norm = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(d_model, d_ff, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, dtype=dtype, rngs=rngs)

    def __call__(self, h):
        return h + self.down(nnx.gelu(self.up(self.norm(h))))


class NnxLM(nnx.Module):
    def __init__(self, vocab, d_model, d_ff, layers, dtype, rngs):
        self.embed = nnx.Embed(vocab, d_model, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(d_model, d_ff, dtype, rngs) for _ in range(layers)])
        self.norm_out = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm_out(h))


def pick_device(choice: str):
    gpus = [d for d in jax.devices() if d.platform == "gpu"] if choice != "cpu" else []
    if gpus and jax_nf4.cuda_available():
        return gpus[0]
    if choice == "gpu":
        sys.exit("--device gpu: no GPU visible to JAX, or jax_nf4 was built without CUDA")
    if gpus:
        print("note: JAX sees a GPU but jax_nf4 was built without CUDA kernels; using the CPU")
    return jax.devices("cpu")[0]
