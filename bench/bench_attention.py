"""Time of one decode-attention step: `jax_nf4.decode_attention` (rotary, cache write and
attention in one kernel) against the same step in XLA (the jnp attention of
`jax_nf4.models.llama`: rotary, `dynamic_update_slice` into the caches, two einsums and a
softmax), on the decode shapes of bench_decode.py: llama3-8b at batch 1 and 8 (8 KV heads of 4
queries, a 144-slot cache), llama3-70b's one-GPU and tp = 4 shards (8 and 2 KV heads of 8
queries, 80 slots), and a 4096-slot cache. bf16, the step at the cache's last slot.

Both run STEPS steps chained under one jit (the caches carried, each step's output the next
step's queries), after checking that their first step's outputs agree. On a GPU the time is
the device busy time per step from one traced run (jax_nf4.benchmark.traced_device_ms), with
each variant's longest kernels per step on stderr (and in the JSON rows); on a CPU the wall time
per step.

    python bench/bench_attention.py [--json PATH] [--quick] [--only LABEL_TEXT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jax_nf4
from jax_nf4.benchmark import traced_device_ms
from jax_nf4.models.llama import rope

# (label, B, H_kv, G, D, T)
SHAPES = [("llama3-8b b1", 1, 8, 4, 128, 144), ("llama3-8b b8", 8, 8, 4, 128, 144),
          ("llama3-70b b1", 1, 8, 8, 128, 80), ("llama3-70b tp4 b1", 1, 2, 8, 128, 80),
          ("llama3-8b b1 T=4096", 1, 8, 4, 128, 4096)]
QUICK_SHAPES = [("tiny", 1, 2, 2, 16, 8), ("tiny b2", 2, 1, 3, 8, 40)]
THETA = 500000.0
KERNELS = 8  # the longest kernels of a step listed per variant (GPU)


def xla_step(qkv, k_cache, v_cache, pos, *, rope_theta: float = THETA):
    """decode_attention's step in jnp, as the Llama model's XLA path computes it."""
    b, h, g2, d = qkv.shape
    g = g2 - 2
    positions = jnp.reshape(pos, (1,))
    q = rope(qkv[:, :, :g].reshape(b, 1, h * g, d), positions, rope_theta).reshape(b, h, g, d)
    k = rope(qkv[:, None, :, g], positions, rope_theta)          # [B, 1, H, D]
    v = qkv[:, None, :, g + 1]
    slot = jnp.clip(pos, 0, k_cache.shape[1] - 1)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, slot, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, slot, 0, 0))
    scores = jnp.einsum("bkgd,btkd->bkgt", q, k_cache,
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(jnp.arange(k_cache.shape[1]) <= slot, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(qkv.dtype)
    out = jnp.einsum("bkgt,btkd->bkgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.astype(qkv.dtype), k_cache, v_cache


def fused_step(qkv, k_cache, v_cache, pos):
    return jax_nf4.decode_attention(qkv, k_cache, v_cache, pos, rope_theta=THETA)


def chained(step: Callable, steps: int, groups: int) -> Callable:
    """jit of ``steps`` chained steps at position ``pos``: the caches carried, each step's
    output written over the next step's queries."""
    @jax.jit
    def run(qkv, k_cache, v_cache, pos):
        def body(_, carry):
            x, k, v = carry
            out, k, v = step(x, k, v, pos)
            return x.at[:, :, :groups].set(out), k, v
        return jax.lax.fori_loop(0, steps, body, (qkv, k_cache, v_cache))
    return run


def time_us(run: Callable, args: Sequence, steps: int) -> tuple[float, list | None]:
    """Device busy µs per step and the step's kernels ``[name, µs, calls]`` per step, longest
    first (GPU), or wall µs per step (CPU, best of 3) and None."""
    jax.block_until_ready(run(*args))
    kinds, top = traced_device_ms(run, *args, per=steps, top=KERNELS)
    if kinds is not None:
        return 1e3 * kinds["busy"], [[name, 1e3 * ms, calls] for name, ms, calls in top]
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / steps, None


def measure(b: int, h: int, g: int, d: int, t: int, steps: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    qkv = jax.random.normal(keys[0], (b, h, g + 2, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, h, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, h, d), jnp.bfloat16)
    pos = jnp.int32(t - 1)
    got, want = jax.jit(fused_step)(qkv, k, v, pos), jax.jit(xla_step)(qkv, k, v, pos)
    # The caches alike to the bit; the bf16 outputs of the same float32 math summed in another
    # order within a few units in the last place.
    for name, x, y in zip(("k_cache", "v_cache"), got[1:], want[1:]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                               rtol=2e-2, atol=2e-2)
    result = {}
    for name, step in (("fused", fused_step), ("xla", xla_step)):
        result[f"{name}_us"], result[f"{name}_kernels"] = time_us(
            chained(step, steps, g), (qkv, k, v, pos), steps)
    return result


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench_attention.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    p.add_argument("--quick", action="store_true", help="two tiny shapes (CPU, seconds)")
    p.add_argument("--only", default=None, metavar="TEXT",
                   help="only the shapes whose label contains TEXT")
    args = p.parse_args(argv)
    shapes, steps = (QUICK_SHAPES, 4) if args.quick else (SHAPES, 64)
    shapes = [s for s in shapes if args.only is None or args.only in s[0]]
    device = jax.devices()[0]
    unit = "device µs" if device.platform == "gpu" else "wall µs"
    print(f"{device.device_kind}, jax {jax.__version__}, {steps} chained steps, {unit} per step")
    print(f"| shape | B | H_kv | G | D | T | jax_nf4 {unit} | XLA {unit} | XLA / jax_nf4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for label, *shape in shapes:
        r = {"label": label, "shape": shape, **measure(*shape, steps=steps)}
        rows.append(r)
        print(f"| {label} | " + " | ".join(map(str, shape)) + f" | {r['fused_us']:.2f} | "
              f"{r['xla_us']:.2f} | {r['xla_us'] / r['fused_us']:.2f}x |", flush=True)
        for name in ("fused", "xla"):
            for kernel, us, calls in r[f"{name}_kernels"] or []:
                print(f"    {name}: {us:7.2f} µs {calls:5.2f} calls  {kernel[:100]}",
                      file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
