"""Tensor-parallel decoding of the Llama-style model (``llama.shard_model``) on 8 virtual CPU
devices: the same tokens as one device, NF4 and dense, tp = 1, 2, 4; collectives in the HLO
(all-reduces, no all-gather of a weight); the errors; bench/bench_decode.py's measured (d).

The checks run in one subprocess (the ``run_on_8_cpu_devices`` fixture) that prints one JSON line
per check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flax")

_REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import dataclasses, importlib.util, json, re, sys
import numpy as np
import jax, jax.numpy as jnp
from flax import nnx
import jax_nf4
from jax_nf4.models import llama

assert len(jax.devices()) == 8, jax.devices()

def report(name, **kw):
    print("RESULT " + json.dumps(dict(name=name, **kw)), flush=True)

def error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None

# head_dim 32 with block 32, so that tp = 4 keeps whole scale blocks in o_proj's shards
config = llama.get_config("tiny", n_kv_heads=4, block_size=32)
prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, config.vocab_size, jnp.int32)
with jax.default_matmul_precision("highest"):
    for nf4 in (True, False):
        model = llama.Llama(config, nf4=nf4, dtype=jnp.float32, rngs=nnx.Rngs(0))
        want = np.asarray(llama.generate(model, prompt, 8))
        for tp in (1, 2, 4):
            mesh = jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp])
            sharded = llama.shard_model(model, mesh)
            got = np.asarray(llama.generate(sharded, prompt, 8))
            paths = [jax.tree_util.keystr(p) for p, _ in
                     jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]]
            q = sharded.leaves[[i for i, p in enumerate(paths) if "qkv_proj" in p][0]]
            hlo = llama._generate_sharded.lower(
                sharded.graphdef, sharded.treedef, mesh, sharded.specs, sharded.leaves, prompt,
                8).compile().as_text()
            report(f"tokens_{nf4}_{tp}", equal=bool((got == want).all()),
                   specs=[list(s) for s in set(sharded.specs)],
                   q_split=int(np.prod(q.shape) // np.prod(q.addressable_shards[0].data.shape)),
                   all_reduce=len(re.findall(r"all-reduce(-start)?\(", hlo)),
                   weight_gather=any(re.search(r"=\s*(u8|f32)\[\d+,\d+\][^=]*all-gather", l)
                                     for l in hlo.splitlines()))

mesh2 = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
with jax.default_matmul_precision("highest"):  # an NF4 lm_head, split by vocabulary rows
    head = llama.Llama(dataclasses.replace(config, nf4_lm_head=True), dtype=jnp.float32,
                       rngs=nnx.Rngs(0))
    report("nf4_lm_head", equal=bool((np.asarray(llama.generate(head, prompt, 8)) == np.asarray(
        llama.generate(llama.shard_model(head, mesh2), prompt, 8))).all()))

model = llama.Llama(config, nf4=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
report("errors",
       axis=error(lambda: llama.shard_model(model, mesh2, "model")),
       tp3=error(lambda: llama.shard_model(model, jax.make_mesh((3,), ("tp",),
                                                                devices=jax.devices()[:3]))),
       sharded_twice=error(lambda: llama.shard_model(
           llama.Llama(llama.shard_config(config, 2), rngs=nnx.Rngs(0)), mesh2)))
w = np.random.default_rng(0).standard_normal((384, 128)).astype(np.float32)  # (4 + 2 * 4) * 32
model.layers[0].attn.qkv_proj.kernel.set_value(jax_nf4.quantize(w, 32, double_quant=True))
with jax.default_matmul_precision("highest"):  # double-quantized scales decoded for sharding
    sharded = llama.shard_model(model, mesh2)
    report("double_quant", equal=bool((np.asarray(llama.generate(model, prompt, 8)) ==
                                       np.asarray(llama.generate(sharded, prompt, 8))).all()),
           q_scales=str(jax.tree.unflatten(sharded.treedef, sharded.leaves)["layers"][0]
                        ["attn"]["qkv_proj"]["kernel"].get_value().absmax.dtype))
donor = llama.Llama(config, nf4=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
placed = llama.shard_model(donor, mesh2, donate=True)
# the split leaves: 2 layers x 4 NF4 layers (packed, absmax) + lm_head
split = [x for x, s in zip(jax.tree.leaves(nnx.state(donor)), placed.specs) if "tp" in s]
report("donate", split=len(split), deleted=all(x.is_deleted() for x in split),
       placed_alive=not any(x.is_deleted() for x in placed.leaves))

spec = importlib.util.spec_from_file_location("bench_decode", sys.argv[1])
bd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bd)
res = bd.main(["--quick", "--skip-8b", "--skip-70b", "--iters", "1", "--tps", "1,2,4",
               "--tp-batch", "2"])
report("bench", rows=res["tensor_parallel_decode"])
print("DONE", flush=True)
'''


@pytest.fixture(scope="module")
def results(run_on_8_cpu_devices) -> dict:
    return run_on_8_cpu_devices(_SCRIPT, str(_REPO / "bench" / "bench_decode.py"))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
def test_same_tokens_as_one_device(results, nf4, tp):
    r = results[f"tokens_{nf4}_{tp}"]
    assert r["equal"]
    assert r["q_split"] == tp      # qkv_proj's weight really is split tp ways
    assert not r["weight_gather"]
    if tp > 1:
        # Row-parallel outputs are all-reduced: 2 per layer per step (prefill, scan body).
        assert r["all_reduce"] >= 4
        assert ["tp", None] in r["specs"] and [None, "tp"] in r["specs"]


def test_nf4_lm_head(results):
    assert results["nf4_lm_head"]["equal"]


def test_errors(results):
    r = results["errors"]
    assert "no axis 'model'" in r["axis"]
    assert "tp=3 must divide" in r["tp3"]
    assert "already a 1/2 shard" in r["sharded_twice"]


def test_double_quant_weights_are_decoded(results):
    r = results["double_quant"]
    assert r["equal"] and r["q_scales"] == "float32"


def test_donate_frees_the_model(results):
    r = results["donate"]
    assert r["split"] == 2 * 4 * 2 + 1 and r["deleted"] and r["placed_alive"]


def test_bench_measured_tensor_parallel(results):
    rows = results["bench"]["rows"]
    assert [r["tp"] for r in rows] == [1, 2]   # the tiny preset has 2 KV heads
    assert all(r["batch"] == 2 for r in rows)  # --tp-batch
    assert all(r["tokens_per_s"] == pytest.approx(2 * r["new_tokens"] / r["seconds"])
               for r in rows)
    assert rows[0]["scaling"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[1]["scaling"] == pytest.approx(rows[1]["tokens_per_s"] /
                                               (2 * rows[0]["tokens_per_s"]))
    assert all(0.0 <= r["tokens_equal_to_tp1"] <= 1.0 for r in rows)   # bf16 may round apart
    assert all(r["device_ms_per_token"] is None and r["top_kernels"] is None for r in rows)
