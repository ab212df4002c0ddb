"""The Llama-style decoder of jax_nf4.models.llama on the tiny preset (CPU): NF4 vs dequantized
dense logits, KV-cache decoding vs recomputing the whole sequence, jit and determinism, cache
shapes, the fused qkv projection (its row order, tensor-parallel shards, a float64 Hugging Face
reference with separate q / k / v, exact NF4 rows from checkpoints), the benchmark helper,
`jax-nf4 generate` and bench/bench_decode.py --quick."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jax_nf4 import NF4Weight, cli, dequantize, load_checkpoint, quantize  # noqa: E402
from jax_nf4.checkpoint import CheckpointError  # noqa: E402
from jax_nf4.cli import main  # noqa: E402
from jax_nf4.convert import quantize_checkpoint  # noqa: E402
from jax_nf4.flax import NF4Linear  # noqa: E402
from jax_nf4.models import llama  # noqa: E402

TINY = llama.get_config("tiny")
PROMPT_LEN, NEW = 5, 8


@nnx.jit(static_argnums=3)
def forward(model, tokens, cache=None, pos=0):
    """``model(tokens, cache, pos)`` as one compiled program (eager NNX is slow to dispatch)."""
    return model(tokens, cache, pos)


@pytest.fixture(scope="module")
def models():
    """A float32 NF4 model and its dense copy with the dequantized kernels."""
    model = llama.Llama(TINY, nf4=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return model, llama.dequantized_copy(model)


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.PRNGKey(1), (2, PROMPT_LEN), 0, TINY.vocab_size,
                              jnp.int32)


@pytest.fixture(scope="module")
def decoded(models, prompt):
    with jax.default_matmul_precision("highest"):
        return np.asarray(llama.generate(models[0], prompt, NEW))


def test_presets():
    assert set(llama.CONFIGS) >= {"tiny", "llama3-8b", "llama3-70b"}
    assert (TINY.vocab_size, TINY.d_model, TINY.n_layers, TINY.n_heads, TINY.n_kv_heads,
            TINY.d_ff, TINY.max_len) == (256, 128, 2, 4, 2, 256, 64)
    c8, c70 = llama.CONFIGS["llama3-8b"], llama.CONFIGS["llama3-70b"]
    assert (c8.d_model, c8.n_layers, c8.n_heads, c8.n_kv_heads, c8.d_ff, c8.head_dim) == (
        4096, 32, 32, 8, 14336, 128)
    assert (c70.d_model, c70.n_layers, c70.n_heads, c70.n_kv_heads, c70.d_ff) == (
        8192, 80, 64, 8, 28672)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.d_model = 64
    assert llama.get_config("tiny", max_len=16).max_len == 16
    with pytest.raises(ValueError, match="unknown config"):
        llama.get_config("llama2")
    with pytest.raises(ValueError, match="n_kv_heads"):
        llama.LlamaConfig(256, 128, 1, 4, 3, 256, 8)


def test_linear_layers_follow_the_flag(models):
    model, dense = models
    per_model = 4 * TINY.n_layers  # qkv (grouped by KV head), o, gate_up (interleaved), down
    nf4_layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, NF4Linear)]
    assert len(nf4_layers) == per_model
    assert all(isinstance(m.kernel.get_value(), NF4Weight) for m in nf4_layers)
    assert isinstance(model.lm_head, nnx.Linear)  # lm_head stays dense by default
    assert not any(isinstance(m, NF4Linear) for _, m in nnx.iter_modules(dense))
    assert sum(isinstance(m, nnx.Linear) for _, m in nnx.iter_modules(dense)) == per_model + 1
    qkv = model.layers[0].attn.qkv_proj.kernel.get_value()
    assert qkv.shape == ((TINY.n_heads + 2 * TINY.n_kv_heads) * TINY.head_dim, TINY.d_model)
    assert dense.layers[0].attn.qkv_proj.kernel.get_value().shape == qkv.shape[::-1]
    assert model.layers[0].mlp.gate_up_proj.kernel.get_value().shape == (2 * TINY.d_ff,
                                                                        TINY.d_model)
    assert dense.layers[0].mlp.gate_up_proj.kernel.get_value().shape == (TINY.d_model,
                                                                         2 * TINY.d_ff)


def test_nf4_logits_match_dequantized_dense(models, prompt):
    model, dense = models
    with jax.default_matmul_precision("highest"):
        for tokens in (prompt, prompt[:, :1]):  # M > 8 (dequantize + dot) and M <= 8 (fused)
            got, _ = forward(model, tokens)
            want, _ = forward(dense, tokens)
            assert got.shape == (2, tokens.shape[1], TINY.vocab_size)
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # the cached path too
        got, _ = forward(model, prompt, model.init_cache(2), 0)
        want, _ = forward(dense, prompt, dense.init_cache(2), 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cache_shapes_and_prefill(models, prompt):
    model, _ = models
    cache = model.init_cache(2)
    shape = (2, TINY.max_len, TINY.n_kv_heads, TINY.head_dim)   # one per layer
    assert len(cache.k) == len(cache.v) == TINY.n_layers
    assert {a.shape for a in cache.k + cache.v} == {shape}
    assert {a.dtype for a in cache.k + cache.v} == {jnp.dtype(jnp.float32)}
    assert model.init_cache(3, jnp.bfloat16).k[0].shape == (3,) + shape[1:]
    with jax.default_matmul_precision("highest"):
        logits, filled = forward(model, prompt, cache, 0)
        full, none = forward(model, prompt)
    assert none is None
    assert {a.shape for a in filled.k + filled.v} == {shape}
    k, v = np.stack(filled.k), np.stack(filled.v)
    assert (np.abs(k[:, :, :PROMPT_LEN]).sum(axis=(-1, -2)) > 0).all()
    assert not k[:, :, PROMPT_LEN:].any() and not v[:, :, PROMPT_LEN:].any()
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    # one more token through the cache = the last row of a full pass over prompt + token
    nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
    with jax.default_matmul_precision("highest"):
        step, after = forward(model, nxt, filled, PROMPT_LEN)
        ref, _ = forward(model, jnp.concatenate([prompt, nxt], 1))
    assert step.shape == (2, 1, TINY.vocab_size)
    assert (np.abs(np.stack(after.k)[:, :, PROMPT_LEN]).sum(axis=(-1, -2)) > 0).all()
    np.testing.assert_allclose(step[:, 0], ref[:, -1], rtol=1e-4, atol=1e-4)


def _greedy_without_cache(model, prompt, new_tokens):
    """Recomputes the full sequence (no cache) for every new token. The buffer has a fixed
    length so one compile serves every step; causality makes the padding irrelevant."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def last_logits(state, tokens, n):
        logits, _ = nnx.merge(graphdef, state)(tokens)
        return jax.lax.dynamic_index_in_dim(logits, n - 1, axis=1, keepdims=False)

    b, p = prompt.shape
    seq = jnp.zeros((b, p + new_tokens), jnp.int32).at[:, :p].set(prompt)
    for n in range(p, p + new_tokens):
        nxt = jnp.argmax(last_logits(state, seq, n), -1).astype(jnp.int32)
        seq = seq.at[:, n].set(nxt)
    return np.asarray(seq[:, p:])


def test_cached_decode_matches_recompute(models, prompt, decoded):
    assert decoded.shape == (2, NEW) and decoded.dtype == np.int32
    assert ((decoded >= 0) & (decoded < TINY.vocab_size)).all()
    with jax.default_matmul_precision("highest"):
        want = _greedy_without_cache(models[0], prompt, NEW)
        dense = np.asarray(llama.generate(models[1], prompt, NEW))
    np.testing.assert_array_equal(decoded, want)
    np.testing.assert_array_equal(dense, decoded)  # same weights, dense kernels


def test_decode_jittable_and_deterministic(models, prompt, decoded):
    model = models[0]
    with jax.default_matmul_precision("highest"):
        again = np.asarray(llama.generate(model, prompt, NEW))

        @nnx.jit
        def outer(model, prompt):
            return llama.generate(model, prompt, NEW)

        inside = np.asarray(outer(model, prompt))
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, p: llama._generate(graphdef, s, p, NEW))(state, prompt)
    np.testing.assert_array_equal(again, decoded)
    np.testing.assert_array_equal(inside, decoded)
    assert "scan" in str(jaxpr)
    assert llama.generate(model, prompt, 0).shape == (2, 0)
    with pytest.raises(ValueError, match="max_len"):
        llama.generate(model, prompt, TINY.max_len)


def test_bf16_model_and_benchmark():
    small = dataclasses.replace(TINY, n_layers=1)
    stages = []
    r = llama.benchmark_decode("tiny", 1, 4, True, prompt_len=3, iters=1, config=small,
                               profile=True, progress=lambda *a: stages.append(a))
    d = llama.benchmark_decode("tiny", 1, 4, False, prompt_len=3, iters=1, config=small)
    assert stages == [(0, 3, "nf4 build"), (1, 3, "nf4 compile"), (2, 3, "nf4 run 1/1"),
                      (3, 3, "nf4 done")]
    assert r["weights"] == "nf4" and d["weights"] == "bfloat16"
    assert r["tokens"].shape == (1, 4) and r["tokens_per_s"] > 0 and d["tokens_per_s"] > 0
    assert r["build_s"] > 0 and r["compile_s"] > 0
    if jax.default_backend() == "cpu":  # no device trace: no kernel times
        assert r["device_ms_per_token"] is None and r["top_kernels"] is None
    else:  # the NF4 projections' kernels are among the 16 longest, with their call counts
        assert r["device_ms_per_token"]["nf4"] > 0
        assert any("jax_nf4" in name and ms > 0 and calls > 0
                   for name, ms, calls in r["top_kernels"])
    # 7 projections of one layer: bf16 is 2 bytes/weight, NF4 0.5 + 4/64 (float32 scale)
    weights = 2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128  # q, o; k, v; gate, up, down
    assert d["linear_bytes"] == 2 * weights
    assert r["linear_bytes"] == weights // 2 + weights // 64 * 4
    assert r["weight_bytes"] < d["weight_bytes"]
    # the CPU backend reports no memory statistics
    assert r["peak_bytes"] == d["peak_bytes"] == llama.peak_device_bytes()
    assert llama.peak_device_bytes() is None or llama.peak_device_bytes() > 0


def test_explicit_head_dim():
    """A tensor-parallel shard: heads and d_ff divided, d_model and head_dim kept."""
    c70 = llama.get_config("llama3-70b")
    shard = dataclasses.replace(c70, n_heads=16, n_kv_heads=2, d_ff=7168)
    assert shard.head_dim == 128 == c70.head_dim  # the resolved value is kept
    c = llama.LlamaConfig(256, 128, 1, 2, 1, 128, 8, head_dim=32)
    block = llama.Block(c, True, dtype=jnp.float32, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
    assert block.attn.qkv_proj.kernel.get_value().shape == ((2 + 2 * 1) * 32, 128)
    assert block.attn.o_proj.kernel.get_value().shape == (128, 64)
    x = jnp.ones((1, 3, 128), jnp.float32)
    y, (k, _) = nnx.jit(lambda b, x: b(x, jnp.arange(3), None))(block, x)
    assert y.shape == x.shape and k.shape == (1, 3, 1, 32)
    with pytest.raises(ValueError, match="without head_dim"):
        llama.LlamaConfig(256, 128, 1, 3, 1, 128, 8)


def test_cli_generate(capsys):
    assert main(["generate", "--batch", "2", "--new-tokens", "4", "--prompt-len", "3",
                 "--iters", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    rows = [list(map(int, line.split())) for line in lines[:2]]
    assert all(len(r) == 4 and all(0 <= t < 256 for t in r) for r in rows)
    assert "tokens/s" in lines[2] and "nf4" in lines[2]

    assert main(["generate", "--bench", "--new-tokens", "2", "--prompt-len", "2",
                 "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "\nnf4 " in out and "\nbfloat16 " in out

    assert main(["generate", "--config", "nope"]) == 2  # usage error
    assert "invalid choice" in capsys.readouterr().err
    assert cli._MODEL_CONFIGS == tuple(llama.CONFIGS)
    assert main(["generate", "--batch", "0"]) == 1
    assert main(["generate", "--new-tokens", "x"]) == 2


def test_qkv_rows():
    """qkv_proj's features grouped by KV head: its g query heads, then k, then v."""
    d = TINY.head_dim                                  # tiny: 4 heads, 2 KV heads, g = 2
    q, k, v = np.arange(4 * d), 4 * d + np.arange(2 * d), 6 * d + np.arange(2 * d)
    want = np.concatenate([q[:2 * d], k[:d], v[:d], q[2 * d:], k[d:], v[d:]])
    np.testing.assert_array_equal(llama.qkv_rows(TINY), want)
    c8 = llama.get_config("llama3-8b")                 # 32 heads, 8 KV heads, g = 4
    rows = llama.qkv_rows(c8)
    assert sorted(rows.tolist()) == list(range((32 + 16) * 128))   # a permutation
    group = rows.reshape(8, 6, 128)                    # [KV head, g + 2, head_dim]
    for h in (0, 7):
        np.testing.assert_array_equal(group[h, :4].reshape(-1), np.arange(4 * h * 128,
                                                                          4 * (h + 1) * 128))
        np.testing.assert_array_equal(group[h, 4], 32 * 128 + h * 128 + np.arange(128))
        np.testing.assert_array_equal(group[h, 5], 40 * 128 + h * 128 + np.arange(128))
    np.testing.assert_array_equal(llama.gate_up_rows(dataclasses.replace(TINY, d_ff=3)),
                                  [0, 3, 1, 4, 2, 5])


def test_qkv_shards_are_whole_kv_head_groups():
    """A contiguous split of qkv_proj's features (and of o_proj's inputs) is a tp shard: the
    shards' attention outputs add up to the whole layer's."""
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, TINY.d_model), jnp.float32)
    pos = jnp.arange(5)
    run = nnx.jit(lambda a, x: a(x, pos, None)[0])
    cases = [(TINY, (2,)),                                                      # g = 2
             (dataclasses.replace(TINY, n_heads=8, head_dim=32), (2,)),         # g = 4
             (dataclasses.replace(TINY, n_kv_heads=4, block_size=32), (2, 4))]  # g = 1
    with jax.default_matmul_precision("highest"):
        for (c, tps), nf4 in itertools.product(cases, (False, True)):
            attn = llama.Attention(c, nf4, dtype=jnp.float32, param_dtype=jnp.float32,
                                   rngs=nnx.Rngs(0))
            want = run(attn, x)
            for tp in tps:
                shard = llama.shard_config(c, tp)
                total = 0
                for i in range(tp):
                    part = llama.Attention(shard, nf4, dtype=jnp.float32,
                                           param_dtype=jnp.float32, rngs=nnx.Rngs(1))
                    # qkv_proj by output features, o_proj by input features
                    for name, out in (("qkv_proj", True), ("o_proj", False)):
                        w = getattr(attn, name).kernel.get_value()
                        if nf4:   # NF4Weight (out, in): packed row pairs and scale rows
                            ax = 0 if out else 1
                            n, k = w.shape
                            w = NF4Weight(jnp.split(w.packed, tp, ax)[i],
                                          jnp.split(w.absmax, tp, ax)[i],
                                          (n // tp, k) if out else (n, k // tp), w.block_size,
                                          w.dtype)
                        else:     # nnx.Linear kernel (in, out)
                            w = jnp.split(w, tp, 1 if out else 0)[i]
                        getattr(part, name).kernel.set_value(w)
                    total = total + run(part, x)
                np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_formulas(bench_script):
    bd = bench_script("bench_decode")
    e = bd.tensor_parallel_estimate(4e-4, 1e-4, 2, batch=1, d_model=8192, n_layers=80,
                                    gbps=450.0, latency_us=10.0)
    buffer = 2 * 8192  # one all-reduce of d_model bf16 values
    allreduce = 10e-6 + 2 * (2 - 1) / 2 * buffer / 450e9
    assert e["allreduce_bytes"] == buffer and e["allreduce_bytes_per_layer"] == 2 * buffer
    assert e["allreduce_bytes_per_model"] == 80 * 2 * buffer
    assert e["scaling_no_comm"] == pytest.approx(2.0) and e["speedup_no_comm"] == 4.0
    assert e["allreduce_s"] == pytest.approx(allreduce)
    assert e["scaling_with_comm"] == pytest.approx(4e-4 / (2 * (1e-4 + 2 * allreduce)))
    assert e["model_ms_per_token_with_comm"] == pytest.approx(80e3 * (1e-4 + 2 * allreduce))
    e4 = bd.tensor_parallel_estimate(4e-4, 1e-4, 4, batch=8, d_model=8192, n_layers=80,
                                     gbps=450.0, latency_us=0.0)
    assert e4["ring_bytes_sent_per_gpu_per_layer"] == 2 * 2 * 3 / 4 * 8 * buffer
    assert e4["scaling_no_comm"] == pytest.approx(1.0)
    shard = llama.shard_config(llama.get_config("llama3-70b"), 4)
    assert (shard.n_heads, shard.n_kv_heads, shard.d_ff, shard.head_dim, shard.d_model) == (
        16, 2, 7168, 128, 8192)
    assert (shard.tp, shard.tp_axis, shard.vocab_size) == (4, None, 128_256)
    assert llama.shard_config(llama.get_config("llama3-70b"), 2, "tp").tp_axis == "tp"
    with pytest.raises(ValueError, match="tp=3"):
        llama.shard_config(llama.get_config("llama3-70b"), 3)
    with pytest.raises(ValueError, match="tp=2.*block_size 64"):
        llama.shard_config(llama.get_config("tiny", n_heads=2, n_kv_heads=2), 2)
    with pytest.raises(ValueError, match="already a 1/2 shard"):
        llama.shard_config(shard_half := llama.shard_config(TINY, 2), 2)
    assert shard_half.tp == 2


@pytest.mark.parametrize("tps", ["2,4", "1,4,2", "1,x"])
def test_bench_decode_rejects_bad_tps(bench_script, tps, capsys):
    with pytest.raises(SystemExit) as e:
        bench_script("bench_decode").main(["--quick", "--tps", tps])
    assert e.value.code == 2 and "--tps must" in capsys.readouterr().err


def test_bench_decode_rejects_a_prompt_past_the_context(bench_script, capsys):
    with pytest.raises(SystemExit) as e:
        bench_script("bench_decode").main(["--quick", "--prompt-len", "62", "--skip-70b",
                                           "--skip-tp"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "must fit the 64-position context of tiny" in err


def test_bench_decode_quick(bench_script, tmp_path, capsys):
    out = tmp_path / "decode.json"
    results = bench_script("bench_decode").main(["--quick", "--iters", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    printed = capsys.readouterr().out
    assert printed.count("(a) tiny") == 6 and printed.count("(b) tiny") == 2
    assert "(c) tp=2" in printed
    assert "(d) skipped: 1 device" in printed and results["tensor_parallel_decode"] == []
    # NF4 with jax_nf4.decode_attention, bf16 with the jnp attention, NF4 + lm_head with both
    decode = {(r["weights"], r["batch"], r["attention"]): r for r in results["decode"]}
    assert set(decode) == {("nf4", 1, "jax_nf4"), ("nf4", 8, "jax_nf4"), ("bfloat16", 1, "xla"),
                           ("bfloat16", 8, "xla"), ("nf4+lm_head", 1, "jax_nf4"),
                           ("nf4+lm_head", 1, "xla")}
    assert all(r["tokens_per_s"] > 0 and r["weight_bytes"] > 0 for r in decode.values())
    assert (decode["nf4", 8, "jax_nf4"]["weight_bytes"]
            < decode["bfloat16", 8, "xla"]["weight_bytes"])
    assert (decode["nf4+lm_head", 1, "jax_nf4"]["weight_bytes"]
            < decode["nf4", 1, "jax_nf4"]["weight_bytes"])
    assert len(results["decode_ratio"]) == 4
    for ratio in results["decode_ratio"]:
        b, w, a = ratio["batch"], ratio["nf4_weights"], ratio["nf4_attention"]
        assert ratio["tokens_per_s_nf4_over_bf16"] == pytest.approx(
            decode[w, b, a]["tokens_per_s"] / decode["bfloat16", b, "xla"]["tokens_per_s"])
    layers = {r["tp"]: r for r in results["layers"]}
    assert set(layers) == {1, 2} and all(r["seconds"] > 0 for r in layers.values())
    assert layers[2]["layer_bytes"] < layers[1]["layer_bytes"]
    (tp2,) = results["tensor_parallel"]
    assert tp2["scaling_no_comm"] == pytest.approx(
        layers[1]["seconds"] / (2 * layers[2]["seconds"]))
    assert tp2["scaling_with_comm"] < tp2["scaling_no_comm"]


# ----------------------------------------------------------------------------- checkpoints

_HF_CONFIG = {"model_type": "llama", "vocab_size": TINY.vocab_size, "hidden_size": TINY.d_model,
              "num_hidden_layers": TINY.n_layers, "num_attention_heads": TINY.n_heads,
              "num_key_value_heads": TINY.n_kv_heads, "intermediate_size": TINY.d_ff,
              "max_position_embeddings": TINY.max_len, "rope_theta": TINY.rope_theta,
              "rms_norm_eps": TINY.norm_eps, "hidden_act": "silu",
              "tie_word_embeddings": False}


def _hf_tensors(model: llama.Llama) -> dict[str, np.ndarray]:
    """A dense model's weights under Hugging Face LlamaForCausalLM names ((out, in) weights)."""
    c = model.config
    t = {"model.embed_tokens.weight": model.embed.embedding.get_value()}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = layer.attn_norm.scale.get_value()
        qkv = np.asarray(layer.attn.qkv_proj.kernel.get_value())   # [in, out] by KV head
        stacked = np.empty_like(qkv)
        stacked[:, llama.qkv_rows(c)] = qkv                          # [in, q | k | v]
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        t[p + "self_attn.q_proj.weight"] = stacked[:, :q].T
        t[p + "self_attn.k_proj.weight"] = stacked[:, q:q + kv].T
        t[p + "self_attn.v_proj.weight"] = stacked[:, q + kv:].T
        t[p + "self_attn.o_proj.weight"] = layer.attn.o_proj.kernel.get_value().T
        t[p + "post_attention_layernorm.weight"] = layer.mlp_norm.scale.get_value()
        gate_up = layer.mlp.gate_up_proj.kernel.get_value()
        t[p + "mlp.gate_proj.weight"] = gate_up[:, 0::2].T
        t[p + "mlp.up_proj.weight"] = gate_up[:, 1::2].T
        t[p + "mlp.down_proj.weight"] = layer.mlp.down_proj.kernel.get_value().T
    t["model.norm.weight"] = model.norm.scale.get_value()
    t["lm_head.weight"] = model.lm_head.kernel.get_value().T
    return {k: np.asarray(v) for k, v in t.items()}


def _write_folder(folder: Path, shards: dict[str, dict[str, np.ndarray]], config: dict) -> Path:
    """A model folder: ``config.json`` and the safetensors ``shards`` (name -> tensors), with
    the shard index when there are several."""
    from jax_nf4.safetensors_io import save_file

    folder.mkdir()
    for shard, tensors in shards.items():
        save_file(tensors, folder / shard)
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: s for s, t in shards.items() for k in t}}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A dense tiny model written as a two-shard Hugging Face folder, and its NF4 conversion
    by `jax-nf4 quantize` (embedding, norms and lm_head left dense)."""
    dense = llama.Llama(TINY, nf4=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
    tensors = _hf_tensors(dense)
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    src = _write_folder(tmp_path_factory.mktemp("hf") / "dense",
                        {s: {k: tensors[k] for k in keys} for s, keys in shards.items()},
                        _HF_CONFIG)
    dst = src.parent / "nf4"
    quantize_checkpoint(src, dst)
    return dense, src, dst


def _reference_logits(t: dict[str, np.ndarray], c: llama.LlamaConfig, tokens) -> np.ndarray:
    """Hugging Face Llama's forward pass in float64 NumPy from its own tensors (separate q, k,
    v projections; query head j attends with KV head j // g, ``repeat_kv``)."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    d, g = c.head_dim, c.n_heads // c.n_kv_heads
    b, s = tokens.shape

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.norm_eps) * w

    inv_freq = 1.0 / c.rope_theta ** (np.arange(0, d, 2) / d)
    angles = np.concatenate([np.arange(s)[:, None] * inv_freq] * 2, axis=-1)[:, None]  # [S,1,D]

    def rope(x):   # x * cos + rotate_half(x) * sin
        return x * np.cos(angles) + np.concatenate([-x[..., d // 2:], x[..., :d // 2]],
                                                   axis=-1) * np.sin(angles)

    x = t["model.embed_tokens.weight"][np.asarray(tokens)]
    causal = np.tril(np.ones((s, s), bool))
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q = rope((h @ t[p + "self_attn.q_proj.weight"].T).reshape(b, s, c.n_heads, d))
        k = rope((h @ t[p + "self_attn.k_proj.weight"].T).reshape(b, s, c.n_kv_heads, d))
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(b, s, c.n_kv_heads, d)
        k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
        scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(d)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bhst,bthd->bshd", probs, v).reshape(b, s, -1)
        x = x + out @ t[p + "self_attn.o_proj.weight"].T
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
    return norm(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


def _states_equal(a: nnx.Module, b: nnx.Module) -> bool:
    la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb))


def test_hf_config():
    assert llama.hf_config(_HF_CONFIG) == TINY
    assert llama.hf_config(_HF_CONFIG, max_len=16).max_len == 16
    for key, value, match in (("model_type", "qwen2", "model_type"),
                              ("rope_scaling", {"rope_type": "llama3"}, "rope_scaling"),
                              ("attention_bias", True, "attention_bias"),
                              ("hidden_act", "gelu", "hidden_act")):
        with pytest.raises(ValueError, match=match):
            llama.hf_config({**_HF_CONFIG, key: value})
    with pytest.raises(ValueError, match="missing 'hidden_size'"):
        llama.hf_config({k: v for k, v in _HF_CONFIG.items() if k != "hidden_size"})


def test_from_checkpoint_nf4_is_the_models_own_quantization(models, hf_folders, prompt):
    """`jax-nf4 quantize` of the dense weights loads into exactly the NF4 model that
    quantizes the same weights itself (same codes, scales and dense tensors)."""
    nf4_model, _ = models
    _, _, nf4_folder = hf_folders
    loaded = llama.from_checkpoint(nf4_folder, dtype=jnp.float32)
    assert loaded.config == TINY and loaded.nf4
    assert isinstance(loaded.layers[1].mlp.down_proj, NF4Linear)
    assert _states_equal(loaded, nf4_model)
    np.testing.assert_array_equal(np.asarray(llama.generate(loaded, prompt, 4)),
                                  np.asarray(llama.generate(nf4_model, prompt, 4)))


def test_fused_qkv_matches_separate_projections(tmp_path, prompt):
    """A checkpoint's separate q / k / v (random, not made by this model) loaded into qkv_proj
    give Hugging Face Llama's logits (float64 reference), dense and NF4 (the reference on
    the dequantized NF4 weights)."""
    c = dataclasses.replace(TINY, n_heads=8, n_kv_heads=2, head_dim=32)   # g = 4
    hf = {**_HF_CONFIG, "num_attention_heads": 8, "head_dim": 32}
    rng = np.random.default_rng(3)
    dense = llama.Llama(c, nf4=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
    tensors = _hf_tensors(dense)
    for i in range(c.n_layers):
        for n, rows in (("q", 8 * 32), ("k", 2 * 32), ("v", 2 * 32)):
            tensors[f"model.layers.{i}.self_attn.{n}_proj.weight"] = (
                rng.standard_normal((rows, c.d_model)) / np.sqrt(c.d_model)).astype(np.float32)
    src = _write_folder(tmp_path / "dense", {"model.safetensors": tensors}, hf)
    quantize_checkpoint(src, tmp_path / "nf4")
    deq = {k: (np.asarray(dequantize(v, jnp.float32)) if isinstance(v, NF4Weight) else v)
           for k, v in load_checkpoint(tmp_path / "nf4", nested=False).items()}
    with jax.default_matmul_precision("highest"):
        for folder, nf4, ref in ((src, False, tensors), (tmp_path / "nf4", True, deq)):
            model = llama.from_checkpoint(folder, nf4=nf4, dtype=jnp.float32)
            assert model.config == dataclasses.replace(c, max_len=TINY.max_len)
            got, _ = forward(model, prompt)
            want = _reference_logits(ref, c, prompt)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_from_checkpoint_gathers_exact_rows(hf_folders):
    """NF4 q / k / v (gate / up) load into qkv_proj (gate_up_proj) with their own codes and
    scales in the order of qkv_rows (gate_up_rows)."""
    _, _, nf4_folder = hf_folders
    model = llama.from_checkpoint(nf4_folder, dtype=jnp.float32)
    flat = load_checkpoint(nf4_folder, nested=False)
    for i in range(TINY.n_layers):
        p = f"model.layers.{i}."
        for module, names, rows in (
                (model.layers[i].attn.qkv_proj, ("q", "k", "v"), llama.qkv_rows(TINY)),
                (model.layers[i].mlp.gate_up_proj, ("gate", "up"), llama.gate_up_rows(TINY))):
            kind = "self_attn" if len(names) == 3 else "mlp"
            parts = [flat[f"{p}{kind}.{n}_proj.weight"] for n in names]
            fused = module.kernel.get_value()
            codes = np.concatenate([np.asarray(w.codes()) for w in parts])[rows]
            scales = np.concatenate([np.asarray(w.absmax) for w in parts])[rows]
            np.testing.assert_array_equal(np.asarray(fused.codes()), codes)
            np.testing.assert_array_equal(np.asarray(fused.absmax), scales)
            assert fused.absmax.dtype == jnp.float32 and fused.block_size == parts[0].block_size


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_gather_rows(double_quant):
    """_gather_rows: exact codes and scales for row orders that keep packed pairs (copied as
    bytes) and that split them (repacked); double-quantized scales decoded; the errors."""
    rng = np.random.default_rng(0)
    ws = [quantize(rng.standard_normal((n, 128)).astype(np.float32), 32, double_quant)
          for n in (6, 4, 8)]
    codes = np.concatenate([np.asarray(w.codes()) for w in ws])
    scales = np.concatenate([np.asarray(w.scales()) for w in ws])
    for rows in (np.array([8, 9, 0, 1, 16, 17, 6, 7]), np.arange(18)[::-1],
                 rng.permutation(18), np.array([3, 3, 0, 17])):
        got = llama._gather_rows(ws, rows)
        assert got.shape == (len(rows), 128) and got.block_size == 32 and not got.double_quant
        np.testing.assert_array_equal(np.asarray(got.codes()), codes[rows])
        np.testing.assert_array_equal(np.asarray(got.absmax), scales[rows])
        np.testing.assert_array_equal(np.asarray(dequantize(got, jnp.float32)), np.concatenate(
            [np.asarray(dequantize(w, jnp.float32)) for w in ws])[rows])
    other = quantize(np.ones((2, 128), np.float32), 64)
    with pytest.raises(ValueError, match="q_proj.*k_proj.*block_size 64.*same K and block_size"):
        llama._gather_rows([ws[0], other], [0, 1], ("q_proj", "k_proj"))
    with pytest.raises(ValueError, match=r"rows must be an even number .* \[0, 18\)"):
        llama._gather_rows(ws, [0, 18])
    with pytest.raises(ValueError, match="rows must be an even number"):
        llama._gather_rows(ws, [0, 1, 2])
    with pytest.raises(ValueError, match="stack of weights"):
        llama._gather_rows([jax.tree.map(lambda a: a[None], ws[0])], [0, 1])


def test_from_checkpoint_dense(models, hf_folders):
    dense, src, nf4_folder = hf_folders
    assert _states_equal(llama.from_checkpoint(src, nf4=False, dtype=jnp.float32), dense)
    # NF4 weights dequantized into a dense model: the NF4 model's dequantized copy
    assert _states_equal(llama.from_checkpoint(nf4_folder, nf4=False, dtype=jnp.float32),
                         models[1])
    # dense projections quantized at load: the NF4 model again
    assert _states_equal(llama.from_checkpoint(src, dtype=jnp.float32), models[0])


def test_from_checkpoint_tied_and_nf4_lm_head(tmp_path, hf_folders):
    dense, src, _ = hf_folders
    tensors = _hf_tensors(dense)
    del tensors["lm_head.weight"]
    tied = _write_folder(tmp_path / "tied", {"model.safetensors": tensors},
                         {**_HF_CONFIG, "tie_word_embeddings": True})
    model = llama.from_checkpoint(tied, nf4=False, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel.get_value()),
                                  np.asarray(dense.embed.embedding.get_value()).T)
    # lm_head quantized too (not skipped): an NF4 lm_head
    head = tmp_path / "head"
    quantize_checkpoint(src, head, skip=["embed", "norm"], default_skip=False)
    model = llama.from_checkpoint(head, dtype=jnp.float32)
    assert model.config.nf4_lm_head and isinstance(model.lm_head, NF4Linear)


def test_from_checkpoint_errors(tmp_path, hf_folders):
    dense, _, _ = hf_folders
    tensors = _hf_tensors(dense)
    cases = {"missing": ({k: v for k, v in tensors.items() if "layers.1.mlp.up" not in k},
                         _HF_CONFIG, "model.layers.1.mlp.up_proj.weight.*missing key"),
             "shape": (tensors, {**_HF_CONFIG, "intermediate_size": 512},
                       r"gate_proj.weight.*shape \(256, 128\) does not fit config.json "
                       r"\(expected \(512, 128\)\)"),
             "untied": ({k: v for k, v in tensors.items() if k != "lm_head.weight"},
                        _HF_CONFIG, "lm_head.weight.*missing key")}
    for name, (t, config, match) in cases.items():
        folder = _write_folder(tmp_path / name, {"model.safetensors": t}, config)
        with pytest.raises(CheckpointError, match=match):
            llama.from_checkpoint(folder, dtype=jnp.float32)
    with pytest.raises(CheckpointError, match="config.json is needed"):  # a file, not a folder
        llama.from_checkpoint(tmp_path / "missing" / "model.safetensors")


def test_cli_generate_from_checkpoint(capsys, hf_folders):
    _, _, nf4_folder = hf_folders
    argv = ["generate", "--checkpoint", str(nf4_folder), "--dtype", "float32", "--batch", "2",
            "--prompt-len", "3", "--new-tokens", "4", "--iters", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 4 for line in lines[:2])
    assert lines[2].startswith("nf4 (nf4 weights")
    # the same tokens as the model loaded directly, from the CLI's prompt (seed 0)
    model = llama.from_checkpoint(nf4_folder, dtype=jnp.float32)
    cli_prompt = jax.random.randint(jax.random.PRNGKey(0), (2, 3), 0, TINY.vocab_size, jnp.int32)
    want = np.asarray(llama.generate(model, cli_prompt, 4))
    assert [list(map(int, line.split())) for line in lines[:2]] == want.tolist()
    assert main(argv + ["--bench"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"nf4: {TINY.n_layers} layers, d_model {TINY.d_model}")
    assert "\nnf4 " in out and "\nfloat32 " in out
    assert main(["generate", "--checkpoint", str(nf4_folder / "nope")]) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_from_checkpoint_double_quant(tmp_path, hf_folders):
    """Double-quantized q / k / v weights go into one NF4 weight with their decoded scales:
    its rows dequantize exactly as the checkpoint's q, k and v do."""
    _, src, _ = hf_folders
    dq = tmp_path / "dq"
    quantize_checkpoint(src, dq, double_quant=True)
    model = llama.from_checkpoint(dq, dtype=jnp.float32)
    qkv = model.layers[1].attn.qkv_proj.kernel.get_value()
    assert not qkv.double_quant and qkv.shape == (
        (TINY.n_heads + 2 * TINY.n_kv_heads) * TINY.head_dim, TINY.d_model)
    flat = load_checkpoint(dq, nested=False)
    parts = [flat[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"]
    assert all(w.double_quant for w in parts)
    stacked = np.concatenate([np.asarray(dequantize(w, jnp.float32)) for w in parts])
    np.testing.assert_array_equal(np.asarray(dequantize(qkv, jnp.float32)),
                                  stacked[llama.qkv_rows(TINY)])
    np.testing.assert_array_equal(np.asarray(qkv.codes()), np.concatenate(
        [np.asarray(w.codes()) for w in parts])[llama.qkv_rows(TINY)])
    assert llama.generate(model, jnp.zeros((1, 2), jnp.int32), 2).shape == (1, 2)


def test_from_checkpoint_mixed_block_sizes(tmp_path, hf_folders):
    """q and k quantized with different block sizes cannot share qkv_proj: a CheckpointError
    naming them."""
    from jax_nf4.safetensors_io import load_file, save_file

    _, src, nf4_folder = hf_folders
    quantize_checkpoint(src, tmp_path / "b32", block_size=32)
    tensors = {k: v for f in sorted(nf4_folder.glob("*.safetensors")) for k, v in
               load_file(f).items()}
    key = "model.layers.0.self_attn.k_proj.weight"
    for f in sorted((tmp_path / "b32").glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(f).items() if k.startswith(key)})
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file(tensors, mixed / "model.safetensors")
    (mixed / "config.json").write_text((nf4_folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*block_size 64\).*k_proj.weight "
                                              r"\(shape \(64, 128\), block_size 32\)"):
        llama.from_checkpoint(mixed, dtype=jnp.float32)
