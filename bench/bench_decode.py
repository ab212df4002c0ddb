"""Decode benchmark of the Llama-style model (jax_nf4.models.llama), for one GPU.

(a) llama3-8b greedy decoding at batch 1 and 8 with NF4 and with bf16 weights (same shapes,
    same prompt): tokens/s (prefill of --prompt-len tokens included, default 16; compile
    excluded), the ratio, weight bytes and the device's peak memory; on a GPU also the device
    time per token of one traced run by kernel class (jax_nf4's kernels, GEMMs, the rest) and
    the idle time. The runs go from the smallest memory use to the largest (NF4 b1, NF4 b8,
    bf16 b1, bf16 b8) because the peak is process-wide; the last runs quantize lm_head too
    ("nf4+lm_head", batch 1; bitsandbytes keeps it dense). NF4 decodes with
    jax_nf4.decode_attention (rotary, cache write and attention in one kernel), bf16 with the
    jnp attention (the baseline: the same model in XLA); the last run is NF4 + lm_head with the
    jnp attention, so the kernel's share is measured in the same run.
(b) llama3-70b shapes: the decode time of one decoder layer (batch 1, one token, a KV cache of
    512 slots, attention over all of them) at full width and at the 1/2 and 1/4 shard a GPU
    holds under tensor parallelism tp: q/k/v/gate/up column-parallel (N / tp), o_proj / down
    row-parallel (K / tp), query and KV heads / tp, d_model and head_dim kept. NF4 weights,
    ``steps`` tokens chained through ``copies`` layers under one jit (``lax.scan``), copies
    chosen so that a step reads >= 400 MB of the arrays L2 would keep: all but the packed
    codes, which the GEMV streams with an evict-first hint (the scales, norms).
(c) Tensor parallelism without the communication, then with a model of it. Each row-parallel
    layer (o_proj, down_proj) ends in an all-reduce of its partial sums, ``batch * d_model``
    bf16 values: 2 all-reduces of ``2 * batch * d_model`` bytes per layer per token. A ring
    all-reduce sends (and receives) ``2 * (tp - 1) / tp`` of the buffer per GPU, so

        t_allreduce = latency + 2 * (tp - 1) / tp * 2 * batch * d_model / bandwidth
        scaling (no communication) = t(full) / (tp * t(1/tp))
        scaling (with it)          = t(full) / (tp * (t(1/tp) + 2 * t_allreduce))

    with the bandwidth of H100 SXM NVLink, 450 GB/s per direction per GPU, and an ASSUMED
    latency of 10 us per all-reduce (--nvlink-gbps, --allreduce-latency-us). Per model: times
    n_layers (embedding and lm_head left out).

(d) Measured tensor parallelism, when the machine has several GPUs: greedy decoding of the
    llama3-70b shape (NF4, ``--tp-batch`` sequences (default 1), 16-token prompt,
    ``--tp-tokens`` new tokens) on one GPU,
    then tensor-parallel over the first tp GPUs (``llama.shard_model``: jax.shard_map, one
    float32 all-reduce after each row-parallel layer, an all-gather of the logits) for
    tp = 2, 4, ... up to the device count: tokens/s, scaling = tokens/s(tp) / (tp *
    tokens/s(1)), each GPU's peak memory, and the share of tokens equal to the one-GPU run's
    (bf16 partial sums may round differently). The model is built once on GPU 0; the last
    placement donates its arrays so the peak stays near one model. On a GPU one more run per
    tp is traced: GPU 0's device time per token by kernel class (collectives apart) and its
    12 longest kernels. ``--tps`` picks the sizes (default 1, 2, 4, 8 up to the device count).

Every result is printed (flushed) as soon as it is known and the JSON file (--json) is
rewritten, so a timeout keeps what was done. Stages go to stderr. --quick runs the tiny
preset (one layer in (a)) in place of the models (seconds on a CPU; a test runs it).

    python bench/bench_decode.py --json decode.json [--skip-8b] [--skip-70b] [--skip-tp] [--quick]
        [--prompt-len N] [--new-tokens N] [--iters N] [--tps 1,2,4] [--tp-batch B]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_nf4.benchmark import traced_device_ms
from jax_nf4.models import llama

BF16 = jnp.bfloat16


@functools.partial(jax.jit, static_argnums=(0, 5))
def _chained_decode(graphdef, state, x, k, v, steps: int):
    """``steps`` decode steps of one token through every block of ``state`` in turn, each
    writing its keys / values into slot ``pos`` (the last ``steps`` slots) of its cache
    (``k``, ``v``: one ``[B, slots, kv, D]`` array per block)."""
    blocks = nnx.merge(graphdef, state)
    slots = k[0].shape[1]

    def step(carry, pos):
        x, k, v = carry
        k, v = list(k), list(v)
        for i, block in enumerate(blocks):
            x, (k[i], v[i]) = block(x, pos[None], (k[i], v[i]))
        return (x, tuple(k), tuple(v)), None

    (x, _, _), _ = jax.lax.scan(step, (x, k, v), jnp.arange(slots - steps, slots))
    return x


def time_layer(config: llama.LlamaConfig, *, batch: int = 1, cache_len: int = 512,
               min_bytes: float = 4e8, steps: int = 16, reps: int = 5, seed: int = 0) -> dict:
    """Seconds per decoder layer per token (best of ``reps``) of an NF4 ``llama.Block`` of
    ``config``, with a KV cache of ``cache_len`` slots; ``layer_bytes`` are its weights."""
    blocks = [llama.Block(config, True, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(seed))]
    leaves = jax.tree.leaves(nnx.state(blocks[0]))
    layer_bytes = sum(a.nbytes for a in leaves)
    # L2 keeps what is read with the default cache policy (all but the packed uint8 codes,
    # streamed evict-first), as it kept the matmul benchmark's scales (bench/NOTES.md,
    # session 28): the copies are as many as make those arrays alone exceed min_bytes.
    cached_bytes = sum(a.nbytes for a in leaves if a.dtype != jnp.uint8)
    copies = max(1, math.ceil(min_bytes / cached_bytes))
    blocks += [llama.Block(config, True, dtype=BF16, param_dtype=BF16,
                           rngs=nnx.Rngs(seed + i)) for i in range(1, copies)]
    graphdef, state = nnx.split(nnx.List(blocks))
    cache = tuple(jnp.zeros((batch, cache_len, config.n_kv_heads, config.head_dim), BF16)
                  for _ in range(copies))
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, 1, config.d_model), BF16)
    jax.block_until_ready(_chained_decode(graphdef, state, x, cache, cache, steps))  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(_chained_decode(graphdef, state, x, cache, cache, steps))
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times) / (steps * copies), "layer_bytes": layer_bytes,
            "copies": copies, "steps": steps, "cache_len": cache_len, "batch": batch}


def tensor_parallel_estimate(t_full: float, t_shard: float, tp: int, *, batch: int,
                             d_model: int, n_layers: int, gbps: float, latency_us: float
                             ) -> dict:
    """Scaling of one layer under tensor parallelism ``tp`` from the measured full-width and
    1/tp layer times, without and with 2 ring all-reduces of ``batch * d_model`` bf16 values
    per layer (see the module docstring for the formulas)."""
    buffer = 2 * batch * d_model  # bytes of one all-reduce (bf16)
    allreduce_s = latency_us * 1e-6 + 2 * (tp - 1) / tp * buffer / (gbps * 1e9)
    layer_s = t_shard + 2 * allreduce_s
    return {"tp": tp, "allreduce_bytes": buffer, "allreduce_bytes_per_layer": 2 * buffer,
            "allreduce_bytes_per_model": 2 * buffer * n_layers,
            "ring_bytes_sent_per_gpu_per_layer": 2 * 2 * (tp - 1) / tp * buffer,
            "scaling_no_comm": t_full / (tp * t_shard), "speedup_no_comm": t_full / t_shard,
            "allreduce_s": allreduce_s, "layer_s_with_comm": layer_s,
            "scaling_with_comm": t_full / (tp * layer_s), "speedup_with_comm": t_full / layer_s,
            "model_ms_per_token_with_comm": 1e3 * n_layers * layer_s}


def decode_tensor_parallel(config: llama.LlamaConfig, tps: Sequence[int], *, batch: int = 1,
                           prompt_len: int = 16, new_tokens: int = 64, iters: int = 2,
                           seed: int = 0, profile: bool = False) -> Iterator[dict]:
    """Tokens/s of NF4 greedy decoding of ``config`` on one device (``tps[0] == 1``, plain
    :func:`llama.generate`) and tensor-parallel over the first ``tp`` devices for each later
    ``tp`` (:func:`llama.shard_model`), best of ``iters`` timed runs after a compiling one;
    one row per tp, yielded as soon as it is measured.
    With ``profile``, one more run is traced: ``device_ms_per_token`` holds GPU 0's device time
    per token by kernel class (:func:`jax_nf4.benchmark.traced_device_ms`) and
    ``top_kernels`` its 12 longest kernels per token ``(name, ms, calls)``; None on a CPU."""
    if list(tps) != sorted(set(tps)) or tps[0] != 1 or tps[-1] > len(jax.devices()):
        raise ValueError(f"tps must ascend from 1 to at most {len(jax.devices())}, got {tps}")
    cfg = dataclasses.replace(config, max_len=prompt_len + new_tokens)
    t0 = time.perf_counter()
    model = llama.Llama(cfg, nf4=True, dtype=BF16, rngs=nnx.Rngs(seed))
    jax.block_until_ready(nnx.state(model))
    build_s = time.perf_counter() - t0
    prompt = jax.random.randint(jax.random.PRNGKey(seed), (batch, prompt_len), 0,
                                cfg.vocab_size, jnp.int32)
    first, tokens_per_s_1 = None, None
    for i, tp in enumerate(tps):
        print(f"  {config.n_layers}-layer model, tp={tp}: place, compile, time", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        if tp == 1:
            target = model
        else:
            mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])
            target = llama.shard_model(model, mesh, donate=i == len(tps) - 1)
        jax.block_until_ready(target.leaves if tp > 1 else nnx.state(model))
        place_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = np.asarray(llama.generate(target, prompt, new_tokens))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(llama.generate(target, prompt, new_tokens))
            times.append(time.perf_counter() - t0)
        first = tokens if first is None else first
        kinds, top = (traced_device_ms(llama.generate, target, prompt, new_tokens,
                                       per=new_tokens, device=0, top=12)
                      if profile else (None, None))
        peaks = [llama.peak_device_bytes(d) for d in jax.devices()[:tp]]
        row = {"tp": tp, "batch": batch, "new_tokens": new_tokens,
               "device_ms_per_token": kinds, "top_kernels": top,
               "seconds": min(times), "tokens_per_s": batch * new_tokens / min(times),
               "build_s": build_s, "place_s": place_s, "compile_s": compile_s,
               "tokens_equal_to_tp1": float((tokens == first).mean()),
               "peak_bytes_per_device": peaks}
        tokens_per_s_1 = tokens_per_s_1 or row["tokens_per_s"]
        row["scaling"] = row["tokens_per_s"] / (tp * tokens_per_s_1)
        del target
        yield row


def _shardable(name: str, tp: int) -> bool:
    try:
        llama.shard_config(llama.get_config(name), tp)
    except ValueError:
        return False
    return True


def _stage(label: str, done: int, total: int, what: str) -> None:
    print(f"  {label}: {what}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns the results (also written to --json)."""
    p = argparse.ArgumentParser(prog="bench_decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    p.add_argument("--quick", action="store_true", help="the tiny preset only (CPU, seconds)")
    p.add_argument("--skip-8b", action="store_true", help="skip (a), the 8B decoding")
    p.add_argument("--skip-70b", action="store_true", help="skip (b) and (c), the 70B layers")
    p.add_argument("--skip-tp", action="store_true", help="skip (d), tensor-parallel decoding")
    p.add_argument("--tp-tokens", type=int, default=None, metavar="N",
                   help="tokens per sequence in (d) (default 64; --quick 4)")
    p.add_argument("--tp-batch", type=int, default=1, metavar="B",
                   help="sequences decoded together in (d) (default 1)")
    p.add_argument("--tps", default=None, metavar="1,2,...",
                   help="tensor-parallel sizes in (d), ascending from 1 (default 1, 2, 4, 8 up "
                        "to the device count)")
    p.add_argument("--new-tokens", type=int, default=None, metavar="N",
                   help="tokens per sequence in (a) (default 128; --quick 4)")
    p.add_argument("--iters", type=int, default=3, metavar="N", help="timed runs in (a)")
    p.add_argument("--prompt-len", type=int, default=None, metavar="N",
                   help="prompt tokens per sequence in (a), i.e. the cache position decoding "
                        "starts from (default 16; --quick 4)")
    p.add_argument("--nvlink-gbps", type=float, default=450.0,
                   help="NVLink bandwidth per direction per GPU, GB/s (default 450, H100 SXM)")
    p.add_argument("--allreduce-latency-us", type=float, default=10.0,
                   help="assumed fixed cost of one all-reduce, microseconds (default 10)")
    args = p.parse_args(argv)
    try:
        tps_wanted = [1, 2, 4, 8] if args.tps is None else [int(t) for t in args.tps.split(",")]
    except ValueError:
        p.error(f"--tps must be comma-separated integers, got {args.tps!r}")
    if tps_wanted[0] != 1 or tps_wanted != sorted(set(tps_wanted)):
        p.error(f"--tps must ascend from 1, got {args.tps!r}")
    for name in ("new_tokens", "iters", "tp_tokens", "tp_batch", "prompt_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    results: dict[str, Any] = {
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        "assumptions": {"nvlink_gbps_per_direction": args.nvlink_gbps,
                        "allreduce_latency_us": args.allreduce_latency_us,
                        "allreduce": "ring, 2*(tp-1)/tp of the buffer sent per GPU; 2 per "
                                     "layer (o_proj, down_proj) of batch*d_model bf16 values"},
        "decode": [], "decode_ratio": [], "layers": [], "tensor_parallel": [],
        "tensor_parallel_decode": []}

    def emit(line: str) -> None:
        print(line, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    emit(f"device: {results['device']}, jax {jax.__version__}")
    if not args.skip_8b:
        name = "tiny" if args.quick else "llama3-8b"
        new_tokens = args.new_tokens or (4 if args.quick else 128)
        base = llama.get_config(name)
        if args.quick:
            base = dataclasses.replace(base, n_layers=1)
        kw = {"prompt_len": args.prompt_len or (4 if args.quick else 16), "iters": args.iters}
        if kw["prompt_len"] + new_tokens > base.max_len:
            p.error(f"--prompt-len + --new-tokens must fit the {base.max_len}-position context "
                    f"of {name}, got {kw['prompt_len']} + {new_tokens}")
        rows = {}
        # The last rows quantize lm_head too (bitsandbytes keeps it dense, as the others do).
        # NF4 decodes with jax_nf4.decode_attention, bf16 (the baseline: the same model in XLA)
        # with the jnp attention; the last row is NF4 with the jnp attention, for the A/B.
        for nf4, batch, head, attn in ((True, 1, False, True), (True, 8, False, True),
                                       (False, 1, False, False), (False, 8, False, False),
                                       (True, 1, True, True), (True, 1, True, False)):
            config = dataclasses.replace(base, nf4_lm_head=head, decode_attention=attn)
            r = llama.benchmark_decode(name, batch, new_tokens, nf4, **kw, config=config,
                                       profile=True,
                                       progress=functools.partial(_stage, f"{name} b{batch}"))
            r = {k: v for k, v in r.items() if k != "tokens"}
            r["attention"] = "jax_nf4" if attn else "xla"
            rows[r["weights"], batch, attn] = r
            results["decode"].append(r)
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"
            emit(f"(a) {name} {r['weights']:<11} {r['attention']:<7} attention, batch {batch}: "
                 f"{r['tokens_per_s']:9.1f} tokens/s "
                 f"({1e3 * r['seconds'] / new_tokens:.2f} ms/step), weights "
                 f"{r['weight_bytes'] / 2**30:.2f} GiB, peak {peak}, build {r['build_s']:.1f} "
                 f"s, compile {r['compile_s']:.1f} s")
            if r["device_ms_per_token"] is not None:
                d, wall = r["device_ms_per_token"], 1e3 * r["seconds"] / new_tokens
                emit(f"    per token (one traced run): {d['nf4']:.2f} ms jax_nf4 kernels, "
                     f"{d['gemm']:.2f} ms GEMMs, {d['other']:.2f} ms other kernels; device "
                     f"busy {d['busy']:.2f} ms of {wall:.2f} ms (idle {wall - d['busy']:.2f})")
                for kname, ms, calls in r["top_kernels"]:
                    emit(f"      {1e3 * ms:8.1f} us/token {calls:6.1f} calls/token  {kname[:110]}")
        for weights, batch, attn in (("nf4", 1, True), ("nf4", 8, True),
                                     ("nf4+lm_head", 1, True), ("nf4+lm_head", 1, False)):
            nf4, dense = rows[weights, batch, attn], rows["bfloat16", batch, False]
            ratio = {"batch": batch, "nf4_weights": weights, "nf4_attention": nf4["attention"],
                     "tokens_per_s_nf4_over_bf16": nf4["tokens_per_s"] / dense["tokens_per_s"],
                     "weight_bytes_nf4_over_bf16": nf4["weight_bytes"] / dense["weight_bytes"]}
            results["decode_ratio"].append(ratio)
            emit(f"(a) batch {batch}: {weights} ({nf4['attention']} attention) / bf16 (xla) = "
                 f"{ratio['tokens_per_s_nf4_over_bf16']:.2f}x tokens/s, "
                 f"{ratio['weight_bytes_nf4_over_bf16']:.2f}x weight bytes")

    if not args.skip_70b:
        name = "tiny" if args.quick else "llama3-70b"
        config = llama.get_config(name)
        tps = (1, 2) if args.quick else (1, 2, 4)
        layer_kw = ({"cache_len": 16, "min_bytes": 0, "steps": 2, "reps": 1} if args.quick
                    else {})
        times = {}
        for tp in tps:
            print(f"  {name} layer 1/{tp}: build, compile, time", file=sys.stderr, flush=True)
            shard = llama.shard_config(config, tp)
            r = {"config": name, "tp": tp, "n_heads": shard.n_heads,
                 "n_kv_heads": shard.n_kv_heads, "d_ff": shard.d_ff,
                 **time_layer(shard, **layer_kw)}
            r["model_ms_per_token_no_comm"] = 1e3 * config.n_layers * r["seconds"]
            times[tp] = r["seconds"]
            results["layers"].append(r)
            emit(f"(b) {name} layer 1/{tp} width (heads {shard.n_heads}/{shard.n_kv_heads}, "
                 f"d_ff {shard.d_ff}): {1e6 * r['seconds']:.1f} us/token (x {config.n_layers} "
                 f"layers: {r['model_ms_per_token_no_comm']:.2f} ms), weights "
                 f"{r['layer_bytes'] / 2**20:.1f} MiB ({r['copies']} copies chained)")
        for tp in tps[1:]:
            e = tensor_parallel_estimate(times[1], times[tp], tp, batch=1,
                                         d_model=config.d_model, n_layers=config.n_layers,
                                         gbps=args.nvlink_gbps,
                                         latency_us=args.allreduce_latency_us)
            results["tensor_parallel"].append(e)
            emit(f"(c) tp={tp}: all-reduce {e['allreduce_bytes']} B x 2 per layer, "
                 f"{e['allreduce_bytes_per_model'] / 2**20:.2f} MiB per token per model; "
                 f"scaling t(full)/(tp*t(1/tp)) = {e['scaling_no_comm']:.2f} "
                 f"(speedup {e['speedup_no_comm']:.2f}x); with communication "
                 f"({args.nvlink_gbps:g} GB/s, {args.allreduce_latency_us:g} us per "
                 f"all-reduce, assumed): {e['scaling_with_comm']:.2f} (speedup "
                 f"{e['speedup_with_comm']:.2f}x, {e['model_ms_per_token_with_comm']:.2f} "
                 f"ms/token for {config.n_layers} layers)")

    name = "tiny" if args.quick else "llama3-70b"
    tps = [tp for tp in tps_wanted if tp <= len(jax.devices()) and _shardable(name, tp)]
    if not args.skip_tp and len(tps) > 1:
        rows = decode_tensor_parallel(llama.get_config(name), tps, batch=args.tp_batch,
                                      new_tokens=args.tp_tokens or (4 if args.quick else 64),
                                      prompt_len=4 if args.quick else 16,
                                      iters=1 if args.quick else 2, profile=True)
        for r in rows:
            results["tensor_parallel_decode"].append(r)
            peaks = ", ".join("-" if b is None else f"{b / 2**30:.1f}"
                              for b in r["peak_bytes_per_device"])
            emit(f"(d) {name} NF4 batch {r['batch']}, tp={r['tp']}: {r['tokens_per_s']:8.2f} "
                 f"tokens/s ({1e3 * r['seconds'] / r['new_tokens']:.2f} ms/token), scaling "
                 f"{r['scaling']:.2f}, tokens equal to tp=1: {100 * r['tokens_equal_to_tp1']:.0f}"
                 f"%, peak GiB per GPU [{peaks}], build {r['build_s']:.0f} s, place "
                 f"{r['place_s']:.1f} s, compile {r['compile_s']:.1f} s")
            if r["device_ms_per_token"] is not None:
                d, wall = r["device_ms_per_token"], 1e3 * r["seconds"] / r["new_tokens"]
                emit(f"    GPU 0 per token (one traced run): {d['nf4']:.2f} ms jax_nf4 kernels, "
                     f"{d['gemm']:.2f} ms GEMMs, {d['collective']:.2f} ms collectives, "
                     f"{d['other']:.2f} ms other; busy {d['busy']:.2f} of {wall:.2f} ms")
                for kname, ms, calls in r["top_kernels"]:
                    emit(f"      {1e3 * ms:8.1f} us/token {calls:6.1f} calls/token  {kname[:110]}")
    elif not args.skip_tp:
        emit(f"(d) skipped: {len(jax.devices())} device (tensor parallelism needs 2 or more)")
    return results


if __name__ == "__main__":
    main()
