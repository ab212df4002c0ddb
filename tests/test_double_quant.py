"""Double-quantized scales: the quantizer against its NumPy reference, the pytree, and the ops on
double-quantized weights against the same ops on the decoded scales."""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nf4
from jax_nf4 import NF4Weight
from jax_nf4 import double_quant as dq
from jax_nf4.double_quant import DoubleQuantScales

SHARED_MAP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "bnb_dynamic_map_signed.txt"


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def plain_twin(q: NF4Weight) -> NF4Weight:
    """The same weight with its scales decoded to float32."""
    return NF4Weight(q.packed, q.scales(), q.shape, q.block_size, q.dtype)


# ----------------------------------------------------------------------------- the table

def test_dynamic_map_is_sorted_and_complete():
    t = dq.DYNAMIC_MAP
    assert t.dtype == np.float32 and t.shape == (256,)
    assert np.all(np.diff(t) >= 0) and t[-1] == 1.0 and t[0] == np.float32(-0.992968738079071)
    assert np.count_nonzero(t == 0) == 1


@pytest.mark.skipif(not SHARED_MAP.is_file(), reason="shared/data is not beside the checkout")
def test_dynamic_map_matches_the_shared_table():
    vals = [float.fromhex(line.split()[1]) for line in SHARED_MAP.read_text().splitlines()
            if line and not line.startswith("#")]
    np.testing.assert_array_equal(bits(dq.DYNAMIC_MAP), bits(np.array(vals, np.float32)))


def test_lut_rule_on_bin_centres_and_midpoints():
    t = dq.DYNAMIC_MAP
    lut = dq.quantization_lut()
    centre = (np.float32(-1) + np.float32(2) * np.arange(65536, dtype=np.float32)
              / np.float32(65535)).astype(np.float32)
    # every bin maps to a nearest entry (ties to the lower one)
    d_chosen = np.abs(centre - t[lut])
    d_best = np.min(np.abs(centre[:, None] - t[None, :]), axis=1)
    np.testing.assert_array_equal(d_chosen, d_best)
    assert lut[0] == 0 and lut[-1] == 255


# ----------------------------------------------------------------------------- the quantizer

@pytest.mark.parametrize("rows, cols", [(2, 1), (4, 64), (16, 32), (8, 96), (6, 100)])
def test_quantize_scales_matches_reference(rng, rows, cols):
    absmax = (np.abs(rng.standard_normal((rows, cols))) * rng.uniform(1e-3, 3)).astype(np.float32)
    got = jax.jit(dq.quantize_scales)(absmax)
    codes, nested, offset = dq.reference_quantize_scales(absmax)
    assert np.asarray(got.offset) == offset
    np.testing.assert_array_equal(np.asarray(got.codes), codes)
    np.testing.assert_array_equal(bits(got.nested_absmax), bits(nested))
    np.testing.assert_array_equal(bits(got.table), bits(dq.DYNAMIC_MAP))
    assert got.nested_absmax.shape == (-(-rows * cols // 256),)
    dec = dq.reference_dequantize_scales(codes, nested, offset)
    np.testing.assert_array_equal(bits(got.decode()), bits(dec))
    # 8-bit codes of the deviation from the mean: small error relative to the block's range
    err = np.abs(dec - absmax).reshape(-1)
    span = np.repeat(nested, 256)[: err.size]
    assert np.all(err <= span * 0.07 + 1e-7)


def test_quantize_scales_special_blocks():
    # the first 256 blocks equal the mean: x - offset == 0 -> codes 0 and nested absmax 0
    absmax = np.ones((4, 128), np.float32)
    absmax[2:].reshape(-1)[0::2] = 0.5
    absmax[2:].reshape(-1)[1::2] = 1.5
    got = dq.quantize_scales(absmax)
    codes, nested, offset = dq.reference_quantize_scales(absmax)
    np.testing.assert_array_equal(np.asarray(got.codes), codes)
    np.testing.assert_array_equal(bits(got.nested_absmax), bits(nested))
    assert nested[0] == 0 and np.all(codes.reshape(-1)[:256] == 0)
    np.testing.assert_array_equal(np.asarray(got.decode()).reshape(-1)[:256], offset)
    # NaN is the caller's problem but must not crash either implementation
    absmax[0, 0] = np.nan
    nan_codes = np.asarray(dq.quantize_scales(absmax).codes)
    assert nan_codes.shape == (4, 128)


def test_reference_reproduces_a_given_offset(rng):
    absmax = np.abs(rng.standard_normal(300)).astype(np.float32)
    off = np.float32(0.25)
    codes, nested, got_off = dq.reference_quantize_scales(absmax, off)
    assert got_off == off
    dec = dq.reference_dequantize_scales(codes, nested, off)
    assert np.max(np.abs(dec - absmax)) < 0.05


def test_quantize_scales_stack_has_one_offset_per_matrix(rng):
    absmax = np.abs(rng.standard_normal((3, 2, 8, 64))).astype(np.float32) * \
        np.array([1, 10, 100], np.float32)[:, None, None, None]
    got = dq.quantize_scales(absmax)
    assert got.offset.shape == (3, 2) and got.codes.shape == (3, 2, 8, 64)
    for i in range(3):
        for j in range(2):
            c, n, o = dq.reference_quantize_scales(absmax[i, j])
            assert np.asarray(got.offset)[i, j] == o
            np.testing.assert_array_equal(np.asarray(got.codes)[i, j], c)
            np.testing.assert_array_equal(bits(np.asarray(got.nested_absmax)[i, j]), bits(n))


# ----------------------------------------------------------------------------- quantize / ops

@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_quantize_double_quant_keeps_codes_and_quantizes_scales(platform, device, rng, dtype):
    w = jax.device_put(rng.standard_normal((2, 16, 512)).astype(dtype), device)
    plain = jax_nf4.quantize(w, 64)
    q = jax_nf4.quantize(w, 64, double_quant=True)
    assert q.double_quant and not plain.double_quant and q.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(plain.packed))
    for i in range(2):
        c, n, o = dq.reference_quantize_scales(np.asarray(plain.absmax[i]))
        np.testing.assert_array_equal(np.asarray(q.absmax.codes[i]), c)
        np.testing.assert_array_equal(bits(np.asarray(q.absmax.nested_absmax[i])), bits(n))
        assert np.asarray(q.absmax.offset)[i] == o
        np.testing.assert_array_equal(bits(np.asarray(q.scales()[i])),
                                      bits(dq.reference_dequantize_scales(c, n, o)))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_dequantize_matmul_linear_on_double_quant_weights(platform, device, rng, mode):
    w = jax.device_put(rng.standard_normal((32, 256)).astype(np.float32), device)
    x = jax.device_put(rng.standard_normal((3, 5, 256)).astype(jnp.bfloat16), device)
    b = jax.device_put(rng.standard_normal(32).astype(np.float32), device)
    q = jax_nf4.quantize(w, 64, double_quant=True)
    twin = plain_twin(q)
    wrap = jax.jit if mode == "jit" else (lambda f: f)
    for dt in (np.float32, jnp.bfloat16, np.float16):
        np.testing.assert_array_equal(
            bits(wrap(lambda q: jax_nf4.dequantize(q, dt))(q)), bits(jax_nf4.dequantize(twin, dt)))
    np.testing.assert_array_equal(bits(wrap(jax_nf4.matmul)(x, q)),
                                  bits(jax_nf4.matmul(x, twin)))
    np.testing.assert_array_equal(bits(wrap(jax_nf4.linear)(x, q, b)),
                                  bits(jax_nf4.linear(x, twin, b)))
    # decoded scales equal the NumPy reference decode, so the product matches the reference
    ref = jax_nf4.reference.dequantize(np.asarray(q.packed),
                                       dq.reference_dequantize_scales(
                                           np.asarray(q.absmax.codes),
                                           np.asarray(q.absmax.nested_absmax),
                                           np.asarray(q.absmax.offset)), 64)
    np.testing.assert_array_equal(bits(jax_nf4.dequantize(q, np.float32)), bits(ref))


@pytest.mark.parametrize("x_dtype, block_size, rows, row_blocks", [
    (jnp.bfloat16, 64, 1, 24), (jnp.bfloat16, 128, 13, 24), (np.float16, 64, 32, 24),
    (jnp.bfloat16, 64, 40, 24), (np.float32, 64, 3, 24), (np.float32, 32, 9, 24),
    (jnp.bfloat16, 48, 2, 24), (jnp.bfloat16, 128, 5, 24), (np.float16, 256, 3, 24),
    (jnp.bfloat16, 64, 2, 25), (jnp.bfloat16, 64, 1, 32), (jnp.bfloat16, 64, 8, 32),
    (np.float16, 128, 4, 16), (jnp.bfloat16, 64, 150, 24), (np.float16, 64, 100, 24),
    (np.float16, 128, 200, 25), (jnp.bfloat16, 64, 40, 32), (np.float16, 128, 130, 16),
    (jnp.bfloat16, 64, 300, 24), (jnp.bfloat16, 64, 12, 32), (jnp.bfloat16, 64, 1, 256),
    (np.float16, 64, 8, 200), (jnp.bfloat16, 128, 5, 100), (jnp.bfloat16, 256, 6, 64),
    (jnp.bfloat16, 64, 3, 200), (jnp.bfloat16, 64, 2, 201), (jnp.bfloat16, 64, 1, 202),
    (np.float16, 128, 2, 101)],
    ids=["tensor-core-M1", "tensor-core-M13", "tensor-core-f16-M32", "tiled-M40",
         "simt-f32", "simt-f32-tiled", "bytewise-block48", "byte-pair-block128-M5",
         "byte-pair-block256-M3", "byte-pair-odd-blocks-M2", "byte-pair-row-nested-M1",
         "byte-pair-row-nested-M8", "byte-pair-row-nested-block128-M4", "tiled-two-m-tiles-M150",
         "tiled-f16-M100", "tiled-f16-odd-blocks-M200", "tiled-row-nested-M40",
         "tiled-row-nested-block128-M130", "dense-path-M300", "tiled-row-nested-M12",
         "byte-pair-lane-table-row-nested-M1", "byte-pair-lane-table-f16-M8",
         "byte-pair-lane-table-block128-M5", "byte-pair-lane-table-row-nested-block256-M6",
         "byte-pair-lane-table-M3", "byte-pair-many-spans-odd-blocks-M2",
         "byte-pair-many-spans-2-mod-4-M1", "byte-pair-many-spans-2-mod-4-block128-M2"])
def test_kernels_decode_double_quant_scales(platform, device, rng, x_dtype, block_size, rows,
                                            row_blocks):
    """Every kernel path (fused tensor-core / SIMT / byte-wise GEMV, dequantize + dot) decodes
    the double-quantized scales itself, bit-identically to the float32 scales decoded first.
    N * K / block_size spans more than 256 blocks, so several nested scales are used. A row
    has 24 (or an odd 25) blocks, so nested boundaries fall inside rows (inside a GEMV warp's
    slice), or 16 / 32, which divide 256: each row lies in one nested group, and the byte-pair
    GEMV reads its nested scale once per work unit, the tiled kernel once per CTA (up to M = 64
    each lane of a quad decodes one of its four rows' scales: M = 12, 13, 32 and 40 here).
    With 100 - 256 blocks per row the byte-pair GEMV's CTAs run 16 spans each, where it takes
    its lane-replicated table (code reads of 4 spans at once: K / 64 divisible by 4, so 201
    blocks of 64, 202 of 64 and 101 of 128 keep the shared table)."""
    n, k = 96, row_blocks * block_size
    w = jax.device_put(rng.standard_normal((n, k)).astype(np.float32), device)
    x = jax.device_put(rng.standard_normal((rows, k)).astype(x_dtype), device)
    q = jax_nf4.quantize(w, block_size, double_quant=True)
    assert q.absmax.nested_absmax.shape[-1] > 1
    twin = plain_twin(q)
    np.testing.assert_array_equal(bits(jax.jit(jax_nf4.matmul)(x, q)),
                                  bits(jax.jit(jax_nf4.matmul)(x, twin)))
    np.testing.assert_array_equal(bits(jax.jit(jax_nf4.dequantize)(q)),
                                  bits(jax.jit(jax_nf4.dequantize)(twin)))


@pytest.mark.parametrize("x_dtype, m, k", [
    (np.float32, 4, 640), (jnp.bfloat16, 4, 640), (jnp.bfloat16, 24, 640),
    (jnp.bfloat16, 24, 2048), (jnp.bfloat16, 150, 640)],
    ids=["f32", "bf16", "bf16-tiled", "bf16-tiled-row-nested", "bf16-wgmma"])
def test_vmap_over_stacked_double_quant_weights(platform, device, rng, x_dtype, m, k):
    """A vmap over stacked weights is one kernel launch over all of them (on the GPU with bf16
    activations the byte-pair GEMV with one group per weight, its table read per block, at
    M = 24 the tiled kernel, each CTA with its weight's table, at M = 150 on H100 / H200 the
    wgmma kernel); 32 rows of 10 blocks put a nested-scale boundary inside row 25 of each
    weight, 32 blocks per row (row-nested reads) put 8 rows in each nested group."""
    w = jax.device_put(rng.standard_normal((3, 32, k)).astype(np.float32), device)
    x = jax.device_put(rng.standard_normal((m, k)).astype(x_dtype), device)
    q = jax_nf4.quantize(w, 64, double_quant=True)
    got = jax.jit(jax.vmap(jax_nf4.matmul, in_axes=(None, 0)))(x, q)
    for i in range(3):
        qi = jax.tree.map(lambda a: a[i], q)
        np.testing.assert_array_equal(bits(got[i]), bits(jax_nf4.matmul(x, plain_twin(qi))))
    # vmapped quantization equals the stacked one
    qv = jax.vmap(lambda w: jax_nf4.quantize(w, 64, double_quant=True))(w)
    for a, b in zip(jax.tree.leaves(qv), jax.tree.leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grad_through_double_quant_weight_wrt_activations(rng):
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    q = jax_nf4.quantize(w, 64, double_quant=True)
    g = jax.grad(lambda x: jnp.sum(jax_nf4.matmul(x, q) ** 2))(x)
    g_twin = jax.grad(lambda x: jnp.sum(jax_nf4.matmul(x, plain_twin(q)) ** 2))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_twin))
    with pytest.raises(TypeError, match="frozen"):
        jax.grad(lambda q: jnp.sum(jax_nf4.matmul(x, q)), allow_int=True)(q)


# ----------------------------------------------------------------------------- the pytree

def test_pytree_jit_tree_map_and_pickle(rng):
    q = jax_nf4.quantize(rng.standard_normal((8, 128)).astype(np.float32), 64, double_quant=True)
    leaves = jax.tree.leaves(q)
    assert len(leaves) == 5  # packed, codes, nested_absmax, table, offset
    assert jax.tree.structure(q) != jax.tree.structure(jax_nf4.quantize(np.ones((8, 128)), 64))
    q2 = pickle.loads(pickle.dumps(jax.tree.map(np.asarray, q)))
    assert isinstance(q2.absmax, DoubleQuantScales) and q2.shape == q.shape
    for a, b in zip(jax.tree.leaves(q2), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    same = jax.jit(lambda q: q)(q)
    assert same.double_quant and repr(same) == repr(q) and "double_quant" in repr(q)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), q, q)
    assert stacked.stack_shape == (2,) and stacked.absmax.offset.shape == (2,)


def test_nbytes_and_bits_per_weight():
    q = jax_nf4.quantize(np.ones((64, 4096), np.float32), 64, double_quant=True)
    n_blocks = 64 * 4096 // 64
    assert q.nbytes == 64 * 4096 // 2 + n_blocks + 4 * (n_blocks // 256) + 4 * 256 + 4
    plain = jax_nf4.quantize(np.ones((64, 4096), np.float32), 64)
    assert plain.bits_per_weight == 4.5
    assert 4.12 < q.bits_per_weight < 4.2


def _dq(codes_shape=(8, 2), stack=()):
    r, c = codes_shape
    return DoubleQuantScales(np.zeros(stack + (r, c), np.uint8),
                             np.zeros(stack + (-(-r * c // 256),), np.float32),
                             np.zeros(stack + (256,), np.float32),
                             np.zeros(stack, np.float32))


@pytest.mark.parametrize("make, error, match", [
    (lambda: DoubleQuantScales(np.zeros((8, 2), np.int8), np.zeros(1, np.float32),
                               np.zeros(256, np.float32), np.zeros((), np.float32)),
     TypeError, "codes must be uint8"),
    (lambda: DoubleQuantScales(np.zeros((8, 2), np.uint8), np.zeros(2, np.float32),
                               np.zeros(256, np.float32), np.zeros((), np.float32)),
     ValueError, r"nested_absmax must have shape \[1\]"),
    (lambda: DoubleQuantScales(np.zeros((8, 2), np.uint8), np.zeros(1, np.float32),
                               np.zeros(255, np.float32), np.zeros((), np.float32)),
     ValueError, r"table must have shape \[256\]"),
    (lambda: DoubleQuantScales(np.zeros((8, 2), np.uint8), np.zeros(1, np.float32),
                               np.zeros(256, np.float32), np.zeros((2,), np.float32)),
     ValueError, r"offset must have shape \[\]"),
    (lambda: DoubleQuantScales(np.zeros((8, 2), np.uint8), np.zeros(1, np.float32),
                               np.zeros(256, np.float32), np.zeros((), np.float32), 0),
     ValueError, "nested_block_size must be positive"),
    (lambda: NF4Weight(np.zeros((4, 64), np.uint8), _dq((8, 1)), (8, 64), 32),
     ValueError, r"absmax codes must be \[\.\.\., 8, 2\]"),
    (lambda: NF4Weight(np.zeros((2, 4, 64), np.uint8), _dq((8, 2), (3,)), (8, 64), 32),
     ValueError, "same stack dims"),
    (lambda: NF4Weight(np.zeros((4, 64), np.int8), _dq(), (8, 64), 32),
     TypeError, "packed must be uint8"),
], ids=["codes-dtype", "nested-shape", "table-shape", "offset-shape", "nested-block",
        "weight-codes-shape", "weight-stack", "weight-packed-dtype"])
def test_double_quant_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()
