"""Time of one pre-norm residual step, `jax_nf4.add_rms_norm` (the residual add and the RMSNorm
in one kernel) against the same step in XLA (jnp, as `jax_nf4.models.llama.RMSNorm` computes it
without the kernels: XLA runs a reduce and an elementwise kernel), on the decode shapes of
bench_decode.py: llama3-8b at batch 1 and 8 (d_model 4096), llama3-70b at batch 1 (8192), and a
2048-row prefill. bf16 activations, float32 scale.

Both run STEPS steps chained under one jit (each step's sum and output the next step's
inputs), after checking that their first step's outputs agree. On a GPU the time is the device
busy time per step from one traced run, with each variant's kernels per step on stderr; on a
CPU the wall time per step (bench_attention.time_us).

    python bench/bench_norm.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jax_nf4
from jax_nf4.benchmark import step_us

# (label, rows, D)
SHAPES = [("llama3-8b b1", 1, 4096), ("llama3-8b b8", 8, 4096), ("llama3-70b b1", 1, 8192),
          ("llama3-8b prefill 2048", 2048, 4096)]
QUICK_SHAPES = [("tiny", 2, 128)]
EPS = 1e-5


def xla_step(x, residual, scale):
    """add_rms_norm's step in jnp (the model's path without the kernels)."""
    s = x + residual
    u = s.astype(jnp.float32)
    y = u * jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + EPS)
    return (y * scale).astype(x.dtype), s


def fused_step(x, residual, scale):
    return jax_nf4.add_rms_norm(x, residual, scale, eps=EPS)


def chained(step: Callable, steps: int) -> Callable:
    @jax.jit
    def run(x, residual, scale):
        def body(_, carry):
            y, s = step(*carry, scale)
            return s, y
        return jax.lax.fori_loop(0, steps, body, (x, residual))
    return run


def measure(rows: int, d: int, steps: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (rows, d), jnp.bfloat16)
    residual = jax.random.normal(keys[1], (rows, d), jnp.bfloat16)
    scale = 1 + 0.1 * jax.random.normal(keys[2], (d,), jnp.float32)
    got, want = jax.jit(fused_step)(x, residual, scale), jax.jit(xla_step)(x, residual, scale)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]), err_msg="sum")
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                               rtol=1e-2, atol=1e-2)
    result = {}
    for name, step in (("fused", fused_step), ("xla", xla_step)):
        result[f"{name}_us"], result[f"{name}_kernels"] = step_us(
            chained(step, steps), (x, residual, scale), steps)
    return result


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench_norm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    p.add_argument("--quick", action="store_true", help="one tiny shape (CPU, seconds)")
    args = p.parse_args(argv)
    shapes, steps = (QUICK_SHAPES, 4) if args.quick else (SHAPES, 64)
    device = jax.devices()[0]
    unit = "device µs" if device.platform == "gpu" else "wall µs"
    print(f"{device.device_kind}, jax {jax.__version__}, {steps} chained steps, {unit} per step")
    print(f"| shape | rows | D | jax_nf4 {unit} | XLA {unit} | XLA / jax_nf4 |")
    print("|---|---|---|---|---|---|")
    results = []
    for label, rows, d in shapes:
        r = {"label": label, "rows": rows, "d": d, **measure(rows, d, steps)}
        results.append(r)
        print(f"| {label} | {rows} | {d} | {r['fused_us']:.2f} | {r['xla_us']:.2f} | "
              f"{r['xla_us'] / r['fused_us']:.2f}x |", flush=True)
        for name in ("fused", "xla"):
            for kernel, us, calls in r[f"{name}_kernels"] or []:
                print(f"    {name}: {us:7.2f} µs {calls:5.2f} calls  {kernel[:100]}",
                      file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
