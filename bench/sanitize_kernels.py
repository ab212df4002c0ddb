"""A small run of every CUDA kernel path, for compute-sanitizer (memcheck, racecheck).

Exits non-zero if any result disagrees with the NumPy reference. Covers the byte-pair, SIMT and
byte-wise GEMV paths (the byte-pair one also over more units than CTAs, from one stacked weight
into the next, and with CTAs of 16 spans, where double-quantized scales take its lane-replicated
table), the tiled kernel (M > 8: M tails, several M tiles, split-K across CTAs with its
sum kernel), on H100 / H200 the wgmma kernel (M > 64: both CTA shapes, M tails, partial row
blocks, split-K), one and two stacked groups (the byte-pair kernel stages the double-quant table
only for one), dequantize and quantize, each dtype, plain and double-quantized scales; and the
decode-attention kernels (the tensor-core split kernel with 8 and 4 warps, its chunks as a
cluster, with empty chunks, and with the combine kernel; the SIMT kernel for float32, a head
dim without 16-byte rows, and several chunks with the combine kernel) against the same op on
the CPU. `python3 bench/sanitize_kernels.py attention` runs only the latter, `... matmul` only
the former.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_nf4
from jax_nf4 import reference

CASES = [  # (G, N, K, block_size, M): G stacked weights under vmap
    (2, 6, 64, 64, 1), (2, 34, 256, 32, 3), (2, 2, 48, 48, 8), (2, 130, 4096, 64, 13),
    (2, 64, 96, 24, 2), (2, 512, 8192, 128, 1), (1, 1030, 4160, 64, 5), (1, 96, 8192, 64, 1),
    (2, 258, 4160, 64, 70), (1, 34, 448, 64, 9), (1, 66, 1024, 64, 24), (1, 200, 2048, 64, 40),
    (1, 520, 2048, 64, 150), (2, 40000, 192, 64, 1), (2, 258, 1024, 64, 300),
    (1, 2304, 2048, 64, 300), (1, 96, 16384, 64, 1), (1, 96, 12800, 64, 6)]


ATTENTION_CASES = [  # (B, H_kv, G, D, T, pos)
    (1, 2, 4, 128, 144, 100), (2, 1, 8, 64, 600, 599), (1, 1, 16, 128, 300, 10),
    (1, 3, 2, 30, 7, 3), (2, 2, 1, 128, 520, 700), (1, 2, 2, 128, 2000, 1999),
    (1, 1, 4, 128, 3000, 2500), (1, 1, 2, 32, 2100, 2000)]


def attention_cases(rng: np.random.Generator) -> int:
    failures = 0
    cpu = jax.devices("cpu")[0]
    for b, h, g, d, t, pos in ATTENTION_CASES:
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            qkv = rng.standard_normal((b, h, g + 2, d)).astype(dtype)
            caches = [rng.standard_normal((b, t, h, d)).astype(dtype) for _ in "kv"]
            step = jax.jit(jax_nf4.decode_attention, static_argnames="rope_theta")
            got = [np.asarray(o, np.float32) for o in step(qkv, *caches, pos, rope_theta=1e4)]
            want = [np.asarray(o, np.float32) for o in step(
                *jax.device_put((qkv, *caches), cpu), pos, rope_theta=1e4)]
            err = np.abs(got[0] - want[0]).max() / np.abs(want[0]).max()
            ok = err < 1e-2 and all(np.allclose(x, y, rtol=1e-2, atol=1e-2)
                                    for x, y in zip(got[1:], want[1:]))
            print(f"decode_attention B={b} H={h} G={g} D={d} T={t} pos={pos} "
                  f"{np.dtype(dtype).name}: {'ok' if ok else 'FAIL'} (out max err {err:.2e})")
            failures += not ok
    return failures


def main() -> int:
    rng = np.random.default_rng(0)
    failures = 0 if sys.argv[1:] == ["matmul"] else attention_cases(rng)
    if sys.argv[1:] == ["attention"]:
        return 1 if failures else 0
    for groups, n, k, bs, m in CASES:
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            w = rng.standard_normal((groups, n, k)).astype(np.float32)
            wd = jnp.asarray(w, dtype)
            q = jax.jit(jax_nf4.quantize, static_argnums=1)(wd, bs)
            p, a = reference.quantize(np.asarray(wd), bs)
            ok = np.array_equal(np.asarray(q.packed), p) and np.array_equal(np.asarray(q.absmax), a)
            deq = jax.jit(jax_nf4.dequantize, static_argnums=1)(q, dtype)
            ok &= np.array_equal(np.asarray(deq, np.float32),
                                 reference.dequantize(p, a, bs, dtype).astype(np.float32))
            x = jnp.asarray(rng.standard_normal((groups, m, k)), dtype)
            y = jax.jit(jax.vmap(jax_nf4.matmul))(x, q)
            want = np.stack([reference.matmul(np.asarray(x[i], np.float32), p[i], a[i], bs)
                             for i in range(groups)])
            err = np.linalg.norm(np.asarray(y, np.float64) - want) / np.linalg.norm(want)
            ok &= err < 1e-2
            # double-quantized scales, decoded inside the kernels
            qd = jax_nf4.quantize(wd, bs, double_quant=True)
            twin = jax_nf4.NF4Weight(qd.packed, qd.scales(), qd.shape, qd.block_size, qd.dtype)
            ok &= np.array_equal(np.asarray(jax_nf4.dequantize(qd), np.float32),
                                 np.asarray(jax_nf4.dequantize(twin), np.float32))
            ok &= np.array_equal(np.asarray(jax.vmap(jax_nf4.matmul)(x, qd), np.float32),
                                 np.asarray(jax.vmap(jax_nf4.matmul)(x, twin), np.float32))
            print(f"G={groups} N={n} K={k} bs={bs} M={m} {np.dtype(dtype).name}: "
                  f"{'ok' if ok else 'FAIL'} (matmul rel err {err:.2e})")
            failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
