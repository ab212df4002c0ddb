"""Jitted NF4 inference with Flax: quantize a dense model, run it, check it against the dense one.

Builds a small residual-MLP language model (embedding, ``--layers`` blocks of
LayerNorm -> Dense(d_ff) -> gelu -> Dense(d_model), a final norm and a vocabulary head) in Flax
linen and/or NNX, converts every large Dense / Linear kernel to NF4 with ``jax_nf4.flax``
(``quantize_params`` + ``intercept_dense`` for linen, ``quantize_module`` for NNX), and runs the
jitted forward pass. It prints:

* the difference to the dense model evaluated on the *dequantized* kernels (rounding level: this
  checks the NF4 kernels; the script exits with status 1 if it is not small),
* the difference to the original dense model (the NF4 quantization error) and how often the
  predicted next token agrees,
* weight memory and the time of one jitted forward pass, dense vs NF4.

Runs on the GPU when JAX has one and jax_nf4 was built with CUDA, on the CPU otherwise::

    python examples/inference.py                      # CPU-friendly defaults, both APIs
    python examples/inference.py --api nnx --d-model 1024 --d-ff 4096 --layers 8 --batch 1
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_nf4
from jax_nf4.flax import NF4Linear, intercept_dense, quantize_module, quantize_params
from models import LinenLM, NnxLM, pick_device

# ----------------------------------------------------------------------------- helpers

def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def time_call(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def report(api, y_nf4, y_deq, y_dense, dense_bytes, nf4_bytes, t_dense, t_nf4, tol) -> bool:
    y_nf4, y_deq, y_dense = (np.asarray(y, np.float64) for y in (y_nf4, y_deq, y_dense))
    scale = np.abs(y_dense).max()
    kernel_err = np.abs(y_nf4 - y_deq).max() / scale
    quant_err = np.abs(y_nf4 - y_dense).max() / scale
    rel_rms = np.sqrt(np.mean((y_nf4 - y_dense) ** 2) / np.mean(y_dense ** 2))
    agree = np.mean(y_nf4.argmax(-1) == y_dense.argmax(-1))
    ok = kernel_err <= tol
    print(f"[{api}] vs dense model on the dequantized weights: max rel err {kernel_err:.2e} "
          f"({'OK' if ok else 'FAIL'}, tol {tol:.0e})")
    print(f"[{api}] vs original dense model (NF4 quantization error): max rel err "
          f"{quant_err:.3f}, rms rel err {rel_rms:.3f}, next-token agreement {agree:.1%}")
    print(f"[{api}] weights {dense_bytes / 2**20:.2f} MiB dense -> {nf4_bytes / 2**20:.2f} MiB "
          f"NF4 ({dense_bytes / nf4_bytes:.1f}x smaller); forward {t_dense * 1e3:.2f} ms dense, "
          f"{t_nf4 * 1e3:.2f} ms NF4")
    return ok


# ----------------------------------------------------------------------------- linen

def run_linen(args, tokens, dtype, tol) -> bool:
    model = LinenLM(args.vocab, args.d_model, args.d_ff, args.layers, dtype)
    params = jax.jit(model.init)(jax.random.key(args.seed), tokens)["params"]
    variables = quantize_params(params, block_size=args.block_size, min_dim=args.min_dim)
    print(f"[linen] quantized {len(variables['nf4'])} Dense kernels to NF4: "
          f"{', '.join(sorted(variables['nf4']))}")

    @jax.jit
    def forward_nf4(variables, tokens):
        with intercept_dense():  # routes nn.Dense layers with NF4 state to jax_nf4.linear
            return model.apply(variables, tokens)

    forward_dense = jax.jit(model.apply)
    # The dense model on the dequantized kernels: what the NF4 model computes, up to rounding.
    deq = {**params}
    for name, layer in variables["nf4"].items():
        deq[name] = {**params[name],
                     "kernel": jax_nf4.dequantize(layer["kernel"], jnp.float32).T}
    y_nf4 = forward_nf4(variables, tokens)
    y_deq = forward_dense({"params": deq}, tokens)
    y_dense = forward_dense({"params": params}, tokens)
    t_dense = time_call(forward_dense, {"params": params}, tokens, iters=args.iters)
    t_nf4 = time_call(forward_nf4, variables, tokens, iters=args.iters)
    return report("linen", y_nf4, y_deq, y_dense, tree_bytes(params), tree_bytes(variables),
                  t_dense, t_nf4, tol)


# ----------------------------------------------------------------------------- NNX

def run_nnx(args, tokens, dtype, tol) -> bool:
    model = NnxLM(args.vocab, args.d_model, args.d_ff, args.layers, dtype,
                  nnx.Rngs(args.seed))
    dense = nnx.clone(model)
    quantize_module(model, block_size=args.block_size, min_dim=args.min_dim)
    converted = [("/".join(map(str, path))) for path, m in nnx.iter_modules(model)
                 if isinstance(m, NF4Linear)]
    print(f"[nnx] converted {len(converted)} nnx.Linear layers to NF4Linear")

    forward = nnx.jit(lambda m, tokens: m(tokens))
    deq = nnx.clone(dense)  # the dense model with the dequantized kernels
    for path, m in nnx.iter_modules(model):
        if isinstance(m, NF4Linear):
            target = deq
            for key in path:
                target = getattr(target, key) if isinstance(key, str) else target[key]
            target.kernel.set_value(jax_nf4.dequantize(m.kernel.get_value(), jnp.float32).T)
    y_nf4 = forward(model, tokens)
    y_deq = forward(deq, tokens)
    y_dense = forward(dense, tokens)
    t_dense = time_call(forward, dense, tokens, iters=args.iters)
    t_nf4 = time_call(forward, model, tokens, iters=args.iters)
    return report("nnx", y_nf4, y_deq, y_dense, tree_bytes(nnx.state(dense)),
                  tree_bytes(nnx.state(model)), t_dense, t_nf4, tol)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api", choices=("linen", "nnx", "both"), default="both")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--min-dim", type=int, default=128,
                   help="quantize kernels whose dims are both >= this")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--iters", type=int, default=5, help="timed forward passes")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = pick_device(args.device)
    dtype = jnp.dtype(args.dtype)
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    print(f"jax {jax.__version__} on {device} (jax_nf4 CUDA kernels: "
          f"{jax_nf4.cuda_available()}); model: vocab {args.vocab}, d_model {args.d_model}, "
          f"d_ff {args.d_ff}, {args.layers} layers, {args.dtype}; tokens {args.batch}x{args.seq}")
    ok = True
    # Float32 dots at full precision: GPUs default to TF32, which would blur the check against
    # the dense model by ~1e-3.
    with jax.default_device(device), jax.default_matmul_precision("highest"):
        tokens = jax.random.randint(jax.random.key(args.seed + 1), (args.batch, args.seq), 0,
                                    args.vocab)
        if args.api in ("linen", "both"):
            ok &= run_linen(args, tokens, dtype, tol)
        if args.api in ("nnx", "both"):
            ok &= run_nnx(args, tokens, dtype, tol)
    print("all checks passed" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
