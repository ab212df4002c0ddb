"""Every bad input raises the documented exception type, with a message that names the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nf4
from jax_nf4 import NF4Weight

MODES = ["eager", "jit"]
N, K, BLOCK = 8, 64, 32


def call(mode: str, fn, *args):
    """fn(*args), eagerly or through jax.jit (errors surface while tracing)."""
    return jax.jit(fn)(*args) if mode == "jit" else fn(*args)


@pytest.fixture
def weight(device) -> NF4Weight:
    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    return jax_nf4.quantize(jax.device_put(w, device), BLOCK)


@pytest.fixture
def x(device) -> jax.Array:
    return jax.device_put(np.random.default_rng(1).standard_normal((3, K)).astype(np.float32),
                          device)


def dense(device, shape, dtype=np.float32) -> jax.Array:
    return jax.device_put(np.random.default_rng(2).standard_normal(shape).astype(dtype), device)


# ----------------------------------------------------------------------------- quantize

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, match", [
    ((K,), r"w must have shape \[\.\.\., N, K\] \(rank >= 2\), got shape \(64,\)"),
    ((), r"w must have shape \[\.\.\., N, K\] \(rank >= 2\), got shape \(\)"),
    ((7, K), r"w of shape \(7, 64\): N \(output features\) must be even"),
    ((2, 3, K), r"w of shape \(2, 3, 64\): N .* must be even"),
    ((N, 48), r"w of shape \(8, 48\): K .* = 48 must be a multiple of block_size = 32"),
], ids=["rank-1", "rank-0", "odd-N", "odd-N-stacked", "K-not-multiple"])
def test_quantize_rejects_bad_shapes(device, mode, shape, match):
    with pytest.raises(ValueError, match=rf"^{match}"):
        call(mode, lambda w: jax_nf4.quantize(w, BLOCK), dense(device, shape))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64,
                                   jnp.float8_e4m3fn])
def test_quantize_rejects_non_float_dtypes(device, mode, dtype):
    w = jax.device_put(np.ones((N, K), dtype), device)
    with pytest.raises(TypeError, match=r"^w must be float32, bfloat16 or float16, got "):
        call(mode, lambda w: jax_nf4.quantize(w, BLOCK), w)


@pytest.mark.parametrize("block_size, error, match", [
    (0, ValueError, r"^block_size must be positive, got 0"),
    (-32, ValueError, r"^block_size must be positive, got -32"),
    (32.0, TypeError, r"^block_size must be an int, got float"),
    ("32", TypeError, r"^block_size must be an int, got str"),
    (True, TypeError, r"^block_size must be an int, got bool"),
    (None, TypeError, r"^block_size must be an int, got NoneType"),
], ids=["0", "negative", "float", "str", "bool", "None"])
def test_quantize_rejects_bad_block_size(device, block_size, error, match):
    with pytest.raises(error, match=match):
        jax_nf4.quantize(dense(device, (N, K)), block_size)


# ----------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float64, np.int8, np.uint8, jnp.float8_e5m2])
def test_dequantize_rejects_unsupported_output_dtype(weight, mode, dtype):
    with pytest.raises(TypeError, match=r"^dtype must be float32, bfloat16 or float16, got "):
        call(mode, lambda q: jax_nf4.dequantize(q, dtype), weight)


@pytest.mark.parametrize("not_a_weight", ["tuple", "dense"])
def test_dequantize_rejects_non_weight(weight, device, not_a_weight):
    q = (weight.packed, weight.absmax) if not_a_weight == "tuple" else dense(device, (N, K))
    with pytest.raises(TypeError, match=r"^q must be an NF4Weight \(from jax_nf4\.quantize\)"):
        jax_nf4.dequantize(q)


# ----------------------------------------------------------------------------- matmul / linear

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, jnp.float8_e4m3fn])
def test_matmul_rejects_non_float_activations(weight, device, mode, dtype):
    x = jax.device_put(np.ones((3, K), dtype), device)
    with pytest.raises(TypeError, match=r"^x must be float32, bfloat16 or float16, got "):
        call(mode, jax_nf4.matmul, x, weight)


def test_matmul_rejects_float64_activations_under_x64(weight, device):
    # Without x64, JAX itself turns float64 input into float32 (JAX's usual convention).
    with jax.enable_x64(True):
        x = jax.device_put(np.ones((3, K), np.float64), device)
        with pytest.raises(TypeError, match=r"^x must be float32, bfloat16 or float16, got "
                                            r"float64"):
            jax_nf4.matmul(x, weight)


@pytest.mark.parametrize("mode", MODES)
def test_matmul_rejects_scalar_activations(weight, device, mode):
    with pytest.raises(ValueError, match=r"^x must have shape \[\.\.\., K\] with K = 64, got a "
                                         r"scalar"):
        call(mode, jax_nf4.matmul, jax.device_put(np.float32(1.5), device), weight)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("x_shape", [(3, 32), (K + 1,), (2, 3, 2 * K)])
def test_matmul_rejects_activation_feature_mismatch(weight, device, mode, x_shape):
    with pytest.raises(ValueError, match=rf"^x has {x_shape[-1]} features .* needs K = 64"):
        call(mode, jax_nf4.matmul, dense(device, x_shape), weight)


@pytest.mark.parametrize("mode", MODES)
def test_matmul_rejects_stacked_weight(device, x, mode):
    stacked = jax_nf4.quantize(dense(device, (2, N, K)), BLOCK)
    with pytest.raises(ValueError, match=r"^q is a stack of weights \(stack dims \(2,\)"):
        call(mode, jax_nf4.matmul, x, stacked)


@pytest.mark.parametrize("op", [jax_nf4.matmul, jax_nf4.linear])
@pytest.mark.parametrize("not_a_weight", ["tuple", "dense"])
def test_matmul_and_linear_reject_non_weight(weight, device, x, op, not_a_weight):
    q = (weight.packed, weight.absmax) if not_a_weight == "tuple" else dense(device, (N, K))
    with pytest.raises(TypeError, match=r"^q must be an NF4Weight \(from jax_nf4\.quantize\)"):
        op(x, q)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias_shape", [(N + 2,), (1, N), (), (N, 1)])
def test_linear_rejects_bias_shape_mismatch(weight, device, x, mode, bias_shape):
    with pytest.raises(ValueError, match=r"^bias must have shape \(8,\) for a weight of shape "):
        call(mode, jax_nf4.linear, x, weight, dense(device, bias_shape))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("leaf, change, match", [
    ("absmax", lambda a: a.astype(jnp.float16), r"absmax must be float32\[1, 8, 2\], got float16"),
    ("absmax", lambda a: a[:, :1], r"absmax must be float32\[1, 8, 2\], got float32\[1, 8, 1\]"),
    ("packed", lambda a: a.astype(jnp.int8), r"packed must be uint8\[G, N/2, K\], got int8"),
], ids=["absmax-dtype", "absmax-shape", "packed-dtype"])
def test_matmul_rejects_weight_leaves_broken_by_tree_map(weight, x, mode, leaf, change, match):
    # tree_unflatten does not validate (transforms rebuild trees with tracers), so the check at
    # trace time (abstract evaluation) must catch leaves that no longer fit the metadata.
    broken = jax.tree.map(lambda a: change(a) if a is getattr(weight, leaf) else a, weight)
    with pytest.raises(ValueError, match=rf"^nf4_matmul: {match}"):
        call(mode, jax_nf4.matmul, x, broken)


# ----------------------------------------------------------------------------- NF4Weight

PACKED = np.random.default_rng(3).integers(0, 256, size=(N // 2, K), dtype=np.uint8)
ABSMAX = np.ones((N, K // BLOCK), np.float32)


@pytest.mark.parametrize("packed, absmax, shape, block_size, error, match", [
    (PACKED[:, :32], ABSMAX, (N, K), BLOCK, ValueError, r"packed must be \[\.\.\., 4, 64\]"),
    (PACKED[:2], ABSMAX, (N, K), BLOCK, ValueError, r"packed must be \[\.\.\., 4, 64\]"),
    (PACKED, ABSMAX[:, :1], (N, K), BLOCK, ValueError, r"absmax must be \[\.\.\., 8, 2\]"),
    (PACKED, ABSMAX, (N, K), 16, ValueError, r"absmax must be \[\.\.\., 8, 4\]"),
    (PACKED.astype(np.int8), ABSMAX, (N, K), BLOCK, TypeError,
     r"packed must be uint8 and absmax float32, got int8 and float32"),
    (PACKED, ABSMAX.astype(np.float16), (N, K), BLOCK, TypeError,
     r"packed must be uint8 and absmax float32, got uint8 and float16"),
    (PACKED, ABSMAX, (7, K), BLOCK, ValueError, r"shape \(N, K\) = \(7, 64\) needs N >= 0 even"),
    (PACKED, ABSMAX, (-8, K), BLOCK, ValueError, r"shape \(N, K\) = \(-8, 64\) needs N >= 0"),
    (PACKED, ABSMAX, (N, 48), BLOCK, ValueError, r"shape \(N, K\) = \(8, 48\) .* block_size = 32"),
    (PACKED, ABSMAX, (N, K), 0, ValueError, r"block_size must be positive, got 0"),
    (PACKED, ABSMAX, (N, K), -32, ValueError, r"block_size must be positive, got -32"),
], ids=["packed-K", "packed-rows", "absmax-blocks", "absmax-for-block-size", "packed-dtype",
        "absmax-dtype", "odd-N", "negative-N", "K-not-multiple", "block-size-0",
        "block-size-negative"])
def test_weight_rejects_inconsistent_arrays(packed, absmax, shape, block_size, error, match):
    with pytest.raises(error, match=rf"^NF4Weight: {match}"):
        NF4Weight(packed, absmax, shape, block_size)


@pytest.mark.parametrize("block_size", [32.5, 32.0, "32", True, None],
                         ids=["float", "integral-float", "str", "bool", "None"])
def test_weight_rejects_non_integer_block_size(block_size):
    with pytest.raises(TypeError, match=r"block_size must be an int"):
        NF4Weight(PACKED, ABSMAX, (N, K), block_size)


@pytest.mark.parametrize("shape", [(N,), (N, K, 1), N], ids=["1-tuple", "3-tuple", "int"])
def test_weight_rejects_shape_that_is_not_a_pair(shape):
    with pytest.raises((TypeError, ValueError), match=r"shape"):
        NF4Weight(PACKED, ABSMAX, shape, BLOCK)


def test_weight_rejects_stack_dims_that_differ_between_packed_and_absmax():
    packed = np.stack([PACKED, PACKED])
    absmax = np.stack([ABSMAX, ABSMAX, ABSMAX])
    with pytest.raises(ValueError, match=r"NF4Weight: .*(packed|absmax)"):
        NF4Weight(packed, absmax, (N, K), BLOCK)
