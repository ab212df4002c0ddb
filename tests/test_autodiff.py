"""Autodiff through the NF4 ops: gradients against the dense reference on the same quantized
weight, forward/reverse/higher order, jit/vmap/scan, and the frozen-weight errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_nf4 as nf4
from jax_nf4 import reference

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
# (N, K, block_size): one with a single block per row, one with several, an odd N/2.
SHAPES = [(16, 128, 64), (6, 64, 32), (10, 96, 32)]
# Relative tolerances (of the largest reference magnitude) of a product in each dtype.
TOL = {F32: 2e-5, BF16: 2e-2, F16: 2e-3}


@pytest.fixture(autouse=True)
def _on_platform(device):
    """Runs every test on each backend of conftest's ``platform`` fixture (CPU, and the GPU
    where jax_nf4 has its CUDA kernels): arrays and jitted calls go to ``device``."""
    with jax.default_device(device):
        yield


def _np(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _weight(n, k, block_size, seed=0, lead=()):
    """An NF4Weight built with the NumPy reference quantizer (bit-identical to the kernel; no
    compilation, which keeps the tests fast)."""
    packed, absmax = reference.quantize(_np((*lead, n, k), seed), block_size)
    return nf4.NF4Weight(jnp.asarray(packed), jnp.asarray(absmax), (n, k), block_size)


def _w64(q):
    """The dequantized weight in float64 (the exact value the kernels multiply by)."""
    return reference.dequantize_f32(np.asarray(q.packed), np.asarray(q.absmax),
                                    q.block_size).astype(np.float64)


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _close(got, want, dtype, scale=None):
    got, want = _f64(got), _f64(want)
    assert got.shape == want.shape
    scale = np.max(np.abs(want)) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * max(scale, 1e-30))


def _rand(shape, seed, dtype=F32):
    return jnp.asarray(_np(shape, seed).astype(dtype))


# ----------------------------------------------------------------------------- reverse mode

GRAD_CASES = ([(F32, shape) for shape in SHAPES] + [(BF16, SHAPES[0]), (BF16, SHAPES[2]),
                                                     (F16, SHAPES[1])])


@pytest.mark.parametrize("dtype,shape", GRAD_CASES)
def test_grad_matches_dense_reference(dtype, shape):
    n, k, bs = shape
    q = _weight(n, k, bs)
    x = _rand((2, 3, k), 1, dtype)
    c = _rand((2, 3, n), 2, F32)  # the cotangent that reaches the product

    @jax.jit
    def grads(x, q, c):
        g = jax.grad(lambda x: jnp.sum(nf4.matmul(x, q).astype(F32) * c))(x)
        # jax.grad of the dense jnp reference x @ dequantize(q, f32).T on the same weight.
        w32 = nf4.dequantize(q, F32)
        g_dense = jax.grad(lambda x: jnp.sum(
            jnp.matmul(x.astype(F32), w32.T, precision="highest") * c))(x)
        return g, g_dense

    g, g_dense = grads(x, q, c)
    assert g.dtype == dtype and g.shape == x.shape
    # d/dx sum(c * (x @ W^T)) = c @ W, in float64 on the same quantized weight.
    _close(g, _f64(c) @ _w64(q), dtype)
    _close(g, g_dense, dtype)


def test_grad_eager_matches_jit():
    q = _weight(16, 128, 64)
    x = _rand((3, 128), 3)

    def loss(x):
        return jnp.sum(nf4.matmul(x, q) ** 2)

    g = jax.grad(loss)(x)
    np.testing.assert_allclose(g, jax.jit(jax.grad(loss))(x), rtol=1e-6, atol=1e-5)
    w = _w64(q)
    _close(g, 2 * (_f64(x) @ w.T) @ w, F32)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_value_and_grad_linear_with_bias(dtype):
    n, k, bs = 16, 128, 64
    q = _weight(n, k, bs, seed=3)
    x = _rand((5, k), 4, dtype)
    bias = _rand((n,), 5, dtype)

    @jax.jit
    def run(x, bias):
        return jax.value_and_grad(
            lambda x, b: jnp.sum(jnp.tanh(nf4.linear(x, q, b).astype(F32))), argnums=(0, 1))(
                x, bias)

    val, (gx, gb) = run(x, bias)
    w = _w64(q)
    y = _f64(x) @ w.T + _f64(bias)
    dy = 1 - np.tanh(y) ** 2
    assert abs(float(val) - np.sum(np.tanh(y))) <= TOL[dtype] * 4 * n * 5
    assert gx.dtype == dtype and gb.dtype == dtype
    _close(gx, dy @ w, dtype)
    _close(gb, dy.sum(0), dtype)


def test_grad_under_jit_and_vmap():
    n, k, bs = 16, 128, 64
    q = _weight(n, k, bs)
    xs = _rand((4, 3, k), 6)

    def loss(x):
        return jnp.sum(jnp.sin(nf4.matmul(x, q)))

    w = _w64(q)
    want = np.cos(_f64(xs) @ w.T) @ w
    _close(jax.jit(jax.vmap(jax.grad(loss)))(xs), want, F32)
    _close(jax.vmap(jax.jit(jax.grad(loss)))(xs), want, F32)
    # per-example gradients by vmap of grad over (x, weight) pairs, weight unbatched.
    _close(jax.jit(jax.vmap(jax.grad(lambda x, q: jnp.sum(jnp.sin(nf4.matmul(x, q)))),
                            in_axes=(0, None)))(xs, q), want, F32)


def test_grad_vmap_over_stacked_weights():
    n, k, bs, groups = 6, 64, 32, 3
    q = _weight(n, k, bs, seed=7, lead=(groups,))  # a stack of 3 weights
    xs = _rand((groups, 2, k), 8)
    c = _rand((groups, 2, n), 9)

    def loss(x, q, c):
        return jnp.sum(nf4.matmul(x, q) * c)

    g = jax.jit(jax.vmap(jax.grad(loss)))(xs, q, c)
    _close(g, np.einsum("gmn,gnk->gmk", _f64(c), _w64(q)), F32)


def test_grad_through_scan_over_stacked_layers():
    n = k = 64
    layers = 3
    q = _weight(n, k, 32, seed=10, lead=(layers,))
    x = _rand((4, k), 11) / 4

    @jax.jit
    def both(x, q):
        def net(x):
            def body(h, layer_q):
                return jnp.tanh(nf4.matmul(h, layer_q)), None
            return jnp.sum(jax.lax.scan(body, x, q)[0] ** 2)

        w32 = nf4.dequantize(q, F32)

        def dense(x):
            def body(h, w):
                return jnp.tanh(jnp.matmul(h, w.T, precision="highest")), None
            return jnp.sum(jax.lax.scan(body, x, w32)[0] ** 2)

        return jax.value_and_grad(net)(x), jax.value_and_grad(dense)(x)

    (val, g), (val_d, g_d) = both(x, q)
    np.testing.assert_allclose(val, val_d, rtol=1e-5)
    _close(g, g_d, F32)


# ----------------------------------------------------------------------------- forward mode etc.

@pytest.mark.parametrize("dtype", [F32, BF16])
def test_jvp_matches_dense(dtype):
    n, k, bs = 10, 96, 32
    q = _weight(n, k, bs, seed=12)
    x, t = _rand((3, k), 13, dtype), _rand((3, k), 14, dtype)
    ts = _rand((5, 3, k), 15, dtype)

    @jax.jit
    def run(x, t, ts):
        f = lambda x: nf4.matmul(x, q)  # noqa: E731
        y, y_dot = jax.jvp(f, (x,), (t,))
        dots = jax.vmap(lambda t: jax.jvp(f, (x,), (t,))[1])(ts)  # batched tangents only
        return y, y_dot, dots

    y, y_dot, dots = run(x, t, ts)
    w = _w64(q)
    assert y_dot.dtype == dtype
    _close(y, _f64(x) @ w.T, dtype)
    _close(y_dot, _f64(t) @ w.T, dtype)
    _close(dots, _f64(ts) @ w.T, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_linear_transpose(dtype):
    n, k, bs = 6, 64, 32
    q = _weight(n, k, bs, seed=16)
    x = jnp.zeros((2, 4, k), dtype)
    ct = _rand((2, 4, n), 17, dtype)
    f_t = jax.linear_transpose(lambda x: nf4.matmul(x, q), x)
    (dx,) = jax.jit(f_t)(ct)
    assert dx.dtype == dtype and dx.shape == x.shape
    _close(dx, _f64(ct) @ _w64(q), dtype)


@pytest.mark.parametrize("n,k,bs", [(4, 32, 32), (6, 64, 32)])
def test_check_grads_order2(n, k, bs):
    q = _weight(n, k, bs, seed=18)
    x = _rand((2, k), 19)
    # Linear in x: exact up to rounding; tanh(x W^T) makes the second order non-trivial.
    check_grads(jax.jit(lambda x: nf4.matmul(x, q)), (x,), order=2, modes=("fwd", "rev"),
                eps=1e-2)
    if n == 4:
        check_grads(jax.jit(lambda x: jnp.tanh(nf4.linear(x, q))), (x / 16,), order=2,
                    modes=("fwd", "rev"), eps=1e-3, atol=2e-2, rtol=2e-2)


def test_hessian_vector_product_matches_dense():
    n, k, bs = 6, 64, 32
    q = _weight(n, k, bs, seed=20)
    x, v = _rand((k,), 21) / 4, _rand((k,), 22)

    @jax.jit
    def hvps(x, v):
        w32 = nf4.dequantize(q, F32)
        f = lambda x: jnp.sum(jnp.tanh(nf4.matmul(x, q)) ** 2)  # noqa: E731
        f_dense = lambda x: jnp.sum(  # noqa: E731
            jnp.tanh(jnp.matmul(x, w32.T, precision="highest")) ** 2)
        fwd_rev = jax.jvp(jax.grad(f), (x,), (v,))[1]
        rev_rev = jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x)
        return fwd_rev, rev_rev, jax.jvp(jax.grad(f_dense), (x,), (v,))[1]

    fwd_rev, rev_rev, want = hvps(x, v)
    _close(fwd_rev, want, F32, scale=float(np.max(np.abs(want))) * 10)
    _close(rev_rev, want, F32, scale=float(np.max(np.abs(want))) * 10)


# ----------------------------------------------------------------------------- frozen weight

def test_grad_wrt_nf4_weight_raises_clear_error():
    q = _weight(16, 128, 64)
    x = _rand((2, 128), 23)
    with pytest.raises(TypeError, match="NF4 weight is frozen.*stop_gradient"):
        jax.grad(lambda q: jnp.sum(nf4.matmul(x, q)), allow_int=True)(q)
    with pytest.raises(TypeError, match="frozen"):
        jax.jit(jax.grad(lambda x, q: jnp.sum(nf4.linear(x, q)), argnums=(0, 1),
                         allow_int=True))(x, q)
    # Forward mode: an explicit tangent for absmax.
    zero_packed = np.zeros(q.packed.shape, jax.dtypes.float0)
    t = jax.tree.unflatten(jax.tree.structure(q), [zero_packed, jnp.ones_like(q.absmax)])
    with pytest.raises(TypeError, match="frozen"):
        jax.jvp(lambda q: nf4.matmul(x, q), (q,), (t,))
    # absmax computed from a differentiated value.
    with pytest.raises(TypeError, match="frozen"):
        jax.grad(lambda s: jnp.sum(nf4.matmul(x, nf4.NF4Weight(
            q.packed, q.absmax * s, q.shape, q.block_size, q.dtype))))(1.0)


def test_stop_gradient_weight_is_fine():
    q = _weight(16, 128, 64)
    x = _rand((2, 128), 24)

    @jax.jit
    def run(x, q):
        loss = lambda x, q: jnp.sum(nf4.matmul(x, jax.lax.stop_gradient(q)) ** 2)  # noqa: E731
        return (jax.grad(loss, argnums=(0, 1), allow_int=True)(x, q),
                jax.grad(lambda x: jnp.sum(nf4.matmul(x, q) ** 2))(x))

    (gx, gq), want = run(x, q)
    np.testing.assert_array_equal(gx, want)
    assert not np.any(np.asarray(gq.absmax))  # the symbolic zero, made explicit by allow_int


def test_quantize_is_not_differentiable():
    w = _rand((16, 128), 25)
    x = _rand((2, 128), 26)
    with pytest.raises(TypeError, match="quantize is not differentiable"):
        jax.jit(jax.grad(lambda w: jnp.sum(nf4.matmul(x, nf4.quantize(w)))))(w)
    # Quantizing a stop_gradient'ed weight is the documented way to say "frozen".
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(
        nf4.matmul(x, nf4.quantize(jax.lax.stop_gradient(w))))))(x, w)
    assert g.shape == x.shape


# ----------------------------------------------------------------------------- dequantize

def _with_absmax(q, absmax):
    return nf4.NF4Weight(q.packed, absmax, q.shape, q.block_size, q.dtype)


def _unit_codes(q):
    """CODEBOOK[code] as float64 [..., N, K] (the dequantized weight with unit scales)."""
    return reference.dequantize_f32(np.asarray(q.packed), np.ones(q.absmax.shape, np.float32),
                                    q.block_size).astype(np.float64)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n,k,bs", SHAPES[:2])
def test_dequantize_grad_wrt_absmax(dtype, n, k, bs):
    q = _weight(n, k, bs, seed=27)
    c = _rand((n, k), 28)

    g = jax.jit(jax.grad(lambda a: jnp.sum(nf4.dequantize(_with_absmax(q, a), dtype).astype(F32)
                                           * c)))(q.absmax)
    assert g.dtype == F32 and g.shape == q.absmax.shape
    # d/dabsmax[n, b] = sum over the block of CODEBOOK[code] * c (float64 reference).
    want = (_unit_codes(q) * _f64(c)).reshape(n, k // bs, bs).sum(-1)
    _close(g, want, dtype)
    # The cotangent reaching the kernel is c rounded to the output dtype: then f32-exact.
    c_rounded = _f64(np.asarray(c).astype(dtype))
    _close(g, (_unit_codes(q) * c_rounded).reshape(n, k // bs, bs).sum(-1), F32)


def test_dequantize_jvp_and_check_grads():
    n, k, bs = 6, 64, 32
    q = _weight(n, k, bs, seed=29)
    t = _rand(q.absmax.shape, 30)
    f = jax.jit(lambda a: nf4.dequantize(_with_absmax(q, a), F32))

    _, w_dot = jax.jvp(f, (q.absmax,), (t,))
    np.testing.assert_allclose(w_dot, _unit_codes(q) * np.repeat(_f64(t), bs, axis=-1),
                               rtol=1e-6)
    check_grads(f, (q.absmax,), order=2, modes=("fwd", "rev"), eps=1e-2)
    # A stacked weight (leading dims) and vmap over it.
    qs = _weight(n, k, bs, seed=31, lead=(2,))
    gs = jax.jit(jax.grad(lambda a: jnp.sum(nf4.dequantize(_with_absmax(qs, a)) ** 2)))(
        qs.absmax)
    want = (2 * _unit_codes(qs) ** 2 * np.repeat(_f64(qs.absmax), bs, axis=-1)).reshape(
        2, n, k // bs, bs).sum(-1)
    _close(gs, want, F32)
