"""jax_nf4.sharding on 8 virtual CPU devices.

The checks run in one subprocess on 8 virtual CPU devices (``_SCRIPT``, through the
``run_on_8_cpu_devices`` fixture), which prints one JSON line per check; the tests below assert
on those results.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax_nf4
from jax_nf4 import sharding

_SCRIPT = r'''
import json, re, sys
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jax_nf4
from jax_nf4 import sharding

assert len(jax.devices()) == 8, jax.devices()
rng = np.random.default_rng(7)
m8 = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
m8a = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
m24 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

def report(name, **kw):
    print("RESULT " + json.dumps(dict(name=name, **kw)), flush=True)

def weight(n, k, bs=64, dq=False):
    w = rng.standard_normal((n, k)).astype(np.float32)
    return jax_nf4.quantize(w, block_size=bs, double_quant=dq)

def put(q, mesh, pspec, aspec):
    packed = jax.device_put(q.packed, NamedSharding(mesh, pspec))
    if q.double_quant:
        return jax_nf4.NF4Weight(packed, q.absmax, q.shape, q.block_size, q.dtype)
    absmax = jax.device_put(q.absmax, NamedSharding(mesh, aspec))
    return jax_nf4.NF4Weight(packed, absmax, q.shape, q.block_size, q.dtype)

def u8_all_gather(txt):
    return any(re.search(r"=\s*u8\[[^\]]*\][^=]*all-gather", l) for l in txt.splitlines())

def check(name, fn, args, ref, mesh=None):
    f = jax.jit(fn)
    out = f(*args)
    txt = f.lower(*args).compile().as_text()
    out_np = np.asarray(out.astype(jnp.float32))
    ref_np = np.asarray(jnp.asarray(ref).astype(jnp.float32))
    scale = float(np.abs(ref_np).max()) or 1.0
    spec = out.sharding.spec if hasattr(out.sharding, "spec") else None
    report(name, exact=bool(np.array_equal(out_np, ref_np)),
           max_rel=float(np.abs(out_np - ref_np).max() / scale),
           spec=str(spec), all_gather="all-gather" in txt, u8_all_gather=u8_all_gather(txt),
           all_reduce="all-reduce" in txt)

def error(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        report(name, type=type(e).__name__, msg=str(e)[-20000:])  # (XLA prepends tracebacks)
    else:
        report(name, type=None, msg="")

# column-parallel (M <= 8: the fused kernel on every device and in the reference)
q = weight(64, 1024)
x = rng.standard_normal((8, 1024)).astype(np.float32)
ref = jax_nf4.matmul(x, q)
check("col", sharding.matmul, (x, put(q, m8, P("d", None), P("d", None))), ref)
check("col_auto", sharding.matmul, (x, put(q, m8a, P("d", None), P("d", None))), ref)
x3 = x.reshape(2, 4, 1024)
check("col_lead", sharding.matmul, (x3, put(q, m8, P("d", None), P("d", None))),
      jax_nf4.matmul(x3, q))
bias = rng.standard_normal(64).astype(np.float32)
check("col_linear", sharding.linear,
      (x, put(q, m8, P("d", None), P("d", None)), jax.device_put(bias, NamedSharding(m8, P("d")))),
      jax_nf4.linear(x, q, bias))

# row-parallel: K = 1024 = 16 blocks of 64, two blocks per device
xk = jax.device_put(x, NamedSharding(m8, P(None, "d")))
check("row", sharding.matmul, (xk, put(q, m8, P(None, "d"), P(None, "d"))), ref)
xka = jax.device_put(x, NamedSharding(m8a, P(None, "d")))
check("row_auto", sharding.matmul, (xka, put(q, m8a, P(None, "d"), P(None, "d"))), ref)
xb = jnp.asarray(x, jnp.bfloat16)
check("row_bf16", sharding.matmul,
      (jax.device_put(xb, NamedSharding(m8, P(None, "d"))), put(q, m8, P(None, "d"), P(None, "d"))),
      jax_nf4.matmul(xb, q))
xl = rng.standard_normal((64, 1024)).astype(np.float32)   # dot path (M > 8)
check("row_large", sharding.matmul,
      (jax.device_put(xl, NamedSharding(m8, P(None, "d"))), put(q, m8, P(None, "d"), P(None, "d"))),
      jax_nf4.matmul(xl, q))

# control: plain jax_nf4.matmul on the row-sharded operands all-gathers the packed weight
check("plain_row", jax_nf4.matmul, (xk, put(q, m8, P(None, "d"), P(None, "d"))), ref)

# data-parallel: 8 rows, one per device; weight replicated
check("data", sharding.matmul,
      (jax.device_put(x, NamedSharding(m8, P("d", None))), put(q, m8, P(), P())), ref)
# data x column on a 2 x 4 mesh
check("data_col", sharding.matmul,
      (jax.device_put(x, NamedSharding(m24, P("data", None))),
       put(q, m24, P("model", None), P("model", None))), ref)
# data x row on a 2 x 4 mesh
check("data_row", sharding.matmul,
      (jax.device_put(x, NamedSharding(m24, P("data", "model"))),
       put(q, m24, P(None, "model"), P(None, "model"))), ref)

# dequantize
dref = jax_nf4.dequantize(q)
check("deq_col", sharding.dequantize, (put(q, m8, P("d", None), P("d", None)),), dref)
check("deq_row", sharding.dequantize, (put(q, m8, P(None, "d"), P(None, "d")),), dref)
check("deq_bf16", lambda q: sharding.dequantize(q, jnp.bfloat16),
      (put(q, m24, P("data", "model"), P("data", "model")),), jax_nf4.dequantize(q, jnp.bfloat16))

# double-quantized scales: decoded first, packed weight still column-sharded
qd = weight(64, 1024, dq=True)
check("dq_col", sharding.matmul, (x, put(qd, m8, P("d", None), None)), jax_nf4.matmul(x, qd))

# errors: K shard of 32 columns with block_size 64; an N shard of 3 rows (odd)
qs = weight(64, 256)
xs = rng.standard_normal((8, 256)).astype(np.float32)
error("err_block", lambda: jax.jit(sharding.matmul)(xs, put(qs, m8, P(None, "d"), P())))
# activations sharded on K finer than a block: not followed (x re-sharded, weight untouched)
check("x_k_unaligned", sharding.matmul,
      (jax.device_put(xs.reshape(2, 4, 256), NamedSharding(m8, P(None, None, "d"))),
       put(qs, m8, P("d", None), P("d", None))), jax_nf4.matmul(xs.reshape(2, 4, 256), qs))
check("x_k_unaligned_auto", sharding.matmul,
      (jax.device_put(xs, NamedSharding(m8a, P(None, "d"))), qs), jax_nf4.matmul(xs, qs))
# column-parallel layers chained in a scan: each layer's N-sharded output feeds the next K
qc = jax_nf4.quantize(rng.standard_normal((3, 128, 128)).astype(np.float32))
xc = rng.standard_normal((8, 128)).astype(np.float32)
chain = lambda op: (lambda x, q: jax.lax.scan(lambda h, l: (op(h, l), None), x, q)[0])
check("scan_col", chain(sharding.matmul),
      (xc, jax_nf4.NF4Weight(jax.device_put(qc.packed, NamedSharding(m8, P(None, "d", None))),
                             jax.device_put(qc.absmax, NamedSharding(m8, P(None, "d", None))),
                             qc.shape, 64)), chain(jax_nf4.matmul)(xc, qc))
error("err_block_deq", lambda: jax.jit(sharding.dequantize)(put(qs, m8, P(None, "d"), P())))
error("err_block_auto", lambda: jax.jit(sharding.matmul)(
    jax.device_put(xs, NamedSharding(m8a, P())), put(qs, m8a, P(None, "d"), P())))
qo = weight(12, 256)
error("err_odd", lambda: jax.jit(sharding.matmul)(
    rng.standard_normal((8, 256)).astype(np.float32), put(qo, m24, P(), P("model", None))))
# gradients through jax.shard_map with check_vma=True: a replicated activation times a
# column-sharded weight; its cotangent needs the psum that the varying-axes type brings
qg = weight(64, 128)
xg = jax.device_put(rng.standard_normal((4, 128)).astype(np.float32), NamedSharding(m8a, P()))
pg = jax.device_put(qg.packed, NamedSharding(m8a, P("d")))
ag = jax.device_put(qg.absmax, NamedSharding(m8a, P("d")))
def layer(x, packed, absmax):
    return jax_nf4.matmul(x, jax_nf4.NF4Weight(packed, absmax, (2 * packed.shape[0], 128), 64))
for check_vma in (True, False):
    sm = jax.shard_map(layer, mesh=m8a, in_specs=(P(), P("d"), P("d")), out_specs=P(None, "d"),
                       check_vma=check_vma)
    got = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(sm(x, pg, ag)))))(xg)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(jax_nf4.matmul(x, qg))))(np.asarray(xg))
    report(f"shard_map_grad_{check_vma}",
           rel=float(jnp.abs(got - want).max() / jnp.abs(want).max()))

# decode_attention: batch and KV heads sharded, the caches updated in place when donated
B, H, G, D, T = 2, 4, 3, 16, 12
qkv = rng.standard_normal((B, H, G + 2, D)).astype(np.float32)
kc, vc = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in "kv")
aref = jax_nf4.decode_attention(qkv, kc, vc, 7, rope_theta=1e4)

def put_attention(mesh, qspec, cspec, q=qkv):
    return (jax.device_put(q, NamedSharding(mesh, qspec)),
            jax.device_put(kc, NamedSharding(mesh, cspec)),
            jax.device_put(vc, NamedSharding(mesh, cspec)))

def check_attention(name, mesh, qspec, cspec, donate=False):
    args = put_attention(mesh, qspec, cspec)
    f = jax.jit(lambda q, k, v: sharding.decode_attention(q, k, v, 7, rope_theta=1e4),
                donate_argnums=(1, 2) if donate else ())
    txt = f.lower(*args).compile().as_text()
    ptrs = [s.data.unsafe_buffer_pointer() for s in args[1].addressable_shards]
    out = f(*args)
    report(name, exact=all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
                           for a, b in zip(out, aref)),
           specs=[str(o.sharding.spec) for o in out], all_gather="all-gather" in txt,
           in_place=ptrs == [s.data.unsafe_buffer_pointer() for s in out[1].addressable_shards])

check_attention("attn_batch_heads", m24, P("data", "model"), P("data", None, "model"))
check_attention("attn_batch_heads_auto", jax.make_mesh((2, 4), ("data", "model"),
                axis_types=(AxisType.Auto,) * 2), P("data", "model"), P("data", None, "model"))
check_attention("attn_donated", m24, P("data", "model"), P("data", None, "model"), donate=True)
check_attention("attn_head_dim", m8, P(), P(None, None, None, "d"))  # D sharded: gathered
# the decoder's use: the caches carried through a scan of steps
qs = rng.standard_normal((5, B, H, G + 2, D)).astype(np.float32)
def steps(op, qs, k, v):
    def body(carry, q_pos):
        o, k, v = op(*q_pos[:1], *carry, q_pos[1], rope_theta=1e4)
        return (k, v), o
    (k, v), o = jax.lax.scan(body, (k, v), (qs, jnp.arange(5, dtype=jnp.int32)))
    return o, k, v
sargs = put_attention(m24, P(None, "data", "model"), P("data", None, "model"), q=qs)
scan = jax.jit(lambda *a: steps(sharding.decode_attention, *a))
got = scan(*sargs)
want = jax.jit(lambda *a: steps(jax_nf4.decode_attention, *a))(qs, kc, vc)
report("attn_scan", exact=all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
                              for a, b in zip(got, want)),
       all_gather="all-gather" in scan.lower(*sargs).compile().as_text())
# control: the plain op on the same sharded operands gathers them
pargs = put_attention(m24, P("data", "model"), P("data", None, "model"))
plain = jax.jit(lambda q, k, v: jax_nf4.decode_attention(q, k, v, 7, rope_theta=1e4))
report("attn_plain", all_gather="all-gather" in plain.lower(*pargs).compile().as_text())
print("DONE", flush=True)
'''


@pytest.fixture(scope="module")
def results(run_on_8_cpu_devices) -> dict:
    return run_on_8_cpu_devices(_SCRIPT, timeout=300)


@pytest.mark.parametrize("name", ["col", "col_auto", "col_lead", "col_linear"])
def test_column_parallel(results, name):
    r = results[name]
    assert r["exact"], r
    assert not r["all_gather"], r  # no collective at all: every device owns its output columns
    assert not r["all_reduce"], r


def test_column_parallel_output_sharding(results):
    assert results["col"]["spec"] in ("PartitionSpec(None, 'd')", "P(None, 'd')"), results["col"]


@pytest.mark.parametrize("name", ["row", "row_auto", "row_bf16", "row_large"])
def test_row_parallel(results, name):
    r = results[name]
    tol = 1e-2 if name == "row_bf16" else 1e-5  # bf16: one rounding of a float32 sum
    assert r["max_rel"] <= tol, r
    assert r["all_reduce"], r
    assert not r["u8_all_gather"], r
    assert not r["all_gather"], r


def test_gather_detector_control(results):
    # The unpartitioned op gathers the uint8 weight: proves the HLO check above can fail.
    r = results["plain_row"]
    assert r["u8_all_gather"] and r["max_rel"] <= 1e-5, r


@pytest.mark.parametrize("name", ["data", "data_col"])
def test_data_parallel(results, name):
    r = results[name]
    assert r["exact"], r
    assert not r["all_gather"], r
    assert not r["all_reduce"], r


def test_data_and_row_parallel(results):
    r = results["data_row"]
    assert r["max_rel"] <= 1e-5, r
    assert r["all_reduce"] and not r["u8_all_gather"], r


@pytest.mark.parametrize("name", ["deq_col", "deq_row", "deq_bf16"])
def test_dequantize(results, name):
    r = results[name]
    assert r["exact"], r
    assert not r["all_gather"], r


def test_double_quant_column_parallel(results):
    r = results["dq_col"]
    assert r["exact"], r
    assert not r["u8_all_gather"], r  # (decoding the scales may gather small int32 indices)


@pytest.mark.parametrize("name,arg,spec", [("err_block", "q.packed", "P(None, 'd')"),
                                           ("err_block_deq", "q.packed", "P(None, 'd')")])
def test_split_block_error(results, name, arg, spec):
    r = results[name]
    assert r["type"] == "ValueError", r
    assert "block_size = 64" in r["msg"] and "splits K = 256" in r["msg"], r
    assert f"{arg} has sharding {spec}" in r["msg"], r  # names the argument and the sharding


@pytest.mark.parametrize("name", ["x_k_unaligned", "x_k_unaligned_auto", "scan_col"])
def test_unaligned_activation_sharding_is_resharded(results, name):
    r = results[name]
    assert r["exact"], r
    if name != "x_k_unaligned_auto":  # (there Shardy slices the replicated weight, see module doc)
        assert not r["u8_all_gather"], r


def test_split_block_error_auto_axes(results):
    # With Auto mesh axes only XLA's partitioner sees the sharding: the same message arrives
    # inside the compilation error.
    r = results["err_block_auto"]
    assert r["type"] is not None, r
    assert "q.packed has sharding" in r["msg"], r
    assert "block_size = 64" in r["msg"] and "splits K = 256" in r["msg"], r


def test_odd_row_pair_error(results):
    r = results["err_odd"]
    assert r["type"] == "ValueError", r
    assert "q.absmax" in r["msg"] and "splits N = 12" in r["msg"] and "even" in r["msg"], r


@pytest.mark.parametrize("name", ["attn_batch_heads", "attn_batch_heads_auto", "attn_donated"])
def test_decode_attention_batch_and_heads(results, name):
    """Batch over one mesh axis, KV heads over the other: each device attends its own sequences
    and heads, bit-identical to the unsharded op, with no all-gather; the results keep the
    caches' sharding, and donated caches are updated in place (same buffers)."""
    r = results[name]
    assert r["exact"] and not r["all_gather"]
    assert r["specs"] == ["P('data', 'model')"] + ["P('data', None, 'model')"] * 2
    if name == "attn_donated":
        assert r["in_place"]


def test_decode_attention_sharded_head_dim_is_gathered(results):
    """A sharding of the caches' head dim is not followed (the caches are gathered first): the
    result is still exact."""
    assert results["attn_head_dim"]["exact"] and results["attn_head_dim"]["all_gather"]


def test_decode_attention_in_a_scan(results):
    """The caches carried through a scan of decode steps stay sharded, results exact."""
    assert results["attn_scan"]["exact"] and not results["attn_scan"]["all_gather"]


def test_plain_decode_attention_gathers(results):
    """The control: jax_nf4.decode_attention on the same sharded operands all-gathers them."""
    assert results["attn_plain"]["all_gather"]


# ----------------------------------------------------------------------------- in-process

@pytest.mark.parametrize("check_vma", [True, False])
def test_grad_through_shard_map(results, check_vma):
    """The primitives carry the varying-manual-axes type, so with check_vma=True the cotangent
    of a replicated activation gets its psum (it was silently wrong without)."""
    assert results[f"shard_map_grad_{check_vma}"]["rel"] < 1e-5


def test_single_device_matches_ops(rng):
    q = jax_nf4.quantize(rng.standard_normal((32, 128)).astype(np.float32))
    x = rng.standard_normal((3, 5, 128)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(sharding.matmul(x, q)),
                                  np.asarray(jax_nf4.matmul(x, q)))
    np.testing.assert_array_equal(np.asarray(sharding.dequantize(q)),
                                  np.asarray(jax_nf4.dequantize(q)))
    qkv = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    kc, vc = (rng.standard_normal((2, 5, 2, 8)).astype(np.float32) for _ in "kv")
    for got, want in zip(sharding.decode_attention(qkv, kc, vc, 3, rope_theta=1e4),
                         jax_nf4.decode_attention(qkv, kc, vc, 3, rope_theta=1e4)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_attention_checks_its_arguments(rng):
    kc = np.zeros((1, 5, 2, 8), np.float32)
    with pytest.raises(ValueError, match="qkv must be"):
        sharding.decode_attention(np.zeros((2, 4, 8), np.float32), kc, kc, 0)
    with pytest.raises(TypeError, match="pos must be an integer"):
        sharding.decode_attention(np.zeros((1, 2, 4, 8), np.float32), kc, kc, 1.5)


def test_rejects_stacks(rng):
    q = jax_nf4.quantize(rng.standard_normal((2, 8, 64)).astype(np.float32))
    with pytest.raises(ValueError, match="stack"):
        sharding.matmul(np.zeros((1, 64), np.float32), q)
    with pytest.raises(ValueError, match="stack"):
        sharding.dequantize(q)
