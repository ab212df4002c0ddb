"""jax_nf4.rms_norm / add_rms_norm (one kernel per RMSNorm, with the residual add before it) on
every available backend: against a NumPy float64 reference (the residual sum bit for bit, the
norm within its float32 rounding), eager, under jit and vmap, their derivatives against jnp's,
the errors, and the Llama model with and without the kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nf4

DTYPES = [pytest.param(np.dtype(np.float32), id="f32"),
          pytest.param(np.dtype(jnp.bfloat16), id="bf16"),
          pytest.param(np.dtype(np.float16), id="f16")]
# Leading dims and D: one element, odd D (the CUDA kernel's scalar path), D = 4096 / 8192 (one
# 16-byte access per thread: 512 / 1024 threads), D = 8200 (threads loop), no rows at all.
SHAPES = [(1, 1), (3, 7), (2, 5, 64), (4, 4096), (2, 8192), (3, 8200), (0, 64), (1, 2, 3, 130)]
EPS32 = float(np.finfo(np.float32).eps)


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}")


def round_to(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(np.float32).astype(dtype)


def reference(x: np.ndarray, residual: np.ndarray | None, scale: np.ndarray, eps: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The op's semantics: s = dtype(float32(x) + float32(residual)) (exact: one rounding of
    a float32 sum, as jnp's x + residual), then y = s / rms(s) * scale in float64; returns
    (s, y, a bound on |float32 y - y|: the sum of squares' rounding in any summation order,
    the sqrt, division and two products)."""
    s = x if residual is None else round_to(x.astype(np.float32) + residual.astype(np.float32),
                                            x.dtype)
    u = s.astype(np.float64)
    d = u.shape[-1]
    y = u / np.sqrt((u * u).mean(-1, keepdims=True) + eps) * scale.astype(np.float64)
    return s, y, np.abs(y) * (d / 8 + 24) * EPS32


def assert_rounded(got, want: np.ndarray, err: np.ndarray, dtype) -> None:
    """``got`` is ``want`` (known to within ``err``) rounded to ``dtype``: one of the numbers
    between the roundings of ``want - err`` and ``want + err``, bit-exact where they agree."""
    got = np.asarray(got)
    assert got.dtype == dtype
    lo, hi = round_to(want - err, dtype), round_to(want + err, dtype)
    g = got.astype(np.float64)
    ok = (lo.astype(np.float64) <= g) & (g <= hi.astype(np.float64))
    assert ok.all(), f"{(~ok).sum()} of {ok.size} elements outside their rounding interval"
    exact = bits(lo) == bits(hi)
    np.testing.assert_array_equal(bits(got)[exact], bits(lo)[exact])


def random_inputs(rng, shape, dtype, scale_dtype):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    scale = (1 + 0.5 * rng.standard_normal(shape[-1:])).astype(scale_dtype)
    return x, residual, scale


def put(device, *arrays):
    return [jax.device_put(a, device) for a in arrays]


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_dtype", [pytest.param(np.dtype(np.float32), id="scale_f32"),
                                         pytest.param(np.dtype(jnp.bfloat16), id="scale_bf16")])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused_add", [True, False], ids=["add_rms_norm", "rms_norm"])
def test_matches_reference(platform, device, rng, dtype, scale_dtype, shape, fused_add):
    x, residual, scale = random_inputs(rng, shape, dtype, scale_dtype)
    eps = 1e-5
    s_want, y_want, err = reference(x, residual if fused_add else None, scale, eps)
    eager = jax_nf4.add_rms_norm if fused_add else jax_nf4.rms_norm
    args = put(device, x, residual, scale) if fused_add else put(device, x, scale)
    for op in (eager, jax.jit(eager, static_argnames="eps")):
        out = op(*args, eps=eps)
        y = out[0] if fused_add else out
        if fused_add:
            np.testing.assert_array_equal(bits(out[1]), bits(s_want))
        assert y.shape == shape
        assert_rounded(y, y_want, err, dtype)


def test_residual_sum_rounds_once_like_jnp(platform, device, rng):
    """The new residual stream is jnp's x + residual, bit for bit (also where the float32 sum
    of two bfloat16 values is inexact: operands far apart in magnitude)."""
    x = (rng.standard_normal((4, 256)) * 2.0 ** rng.integers(-30, 30, (4, 256))).astype(
        jnp.bfloat16)
    residual = rng.standard_normal((4, 256)).astype(jnp.bfloat16)
    scale = np.ones(256, np.float32)
    _, s = jax_nf4.add_rms_norm(*put(device, x, residual, scale))
    np.testing.assert_array_equal(bits(s), bits(jax.device_put(x, device) + residual))


def test_rows_are_independent_and_deterministic(platform, device, rng):
    """A row's result does not depend on the other rows or on the call."""
    x, residual, scale = random_inputs(rng, (6, 1000), np.dtype(jnp.bfloat16), np.float32)
    y, s = jax_nf4.add_rms_norm(*put(device, x, residual, scale))
    y2, s2 = jax_nf4.add_rms_norm(*put(device, x, residual, scale))
    y3, s3 = jax_nf4.add_rms_norm(*put(device, x[3:4], residual[3:4], scale))
    np.testing.assert_array_equal(bits(y), bits(y2))
    np.testing.assert_array_equal(bits(y[3:4]), bits(y3))
    np.testing.assert_array_equal(bits(s[3:4]), bits(s3))


# ----------------------------------------------------------------------------- vmap, autodiff

def test_vmap_over_x_and_residual(platform, device, rng):
    """An unbatched scale: the vmapped axis folds into the rows (an unbatched residual is
    broadcast); results equal the per-slice calls bit for bit."""
    x, residual, scale = put(device, *random_inputs(rng, (4, 3, 64), np.dtype(np.float16),
                                                    np.float32))
    cases = (((1, 1, None), residual, lambda i: residual[:, i]),   # both along axis 1
             ((1, None, None), residual[:, 0], lambda i: residual[:, 0]))
    for in_axes, r_arg, r_of in cases:
        for fn in (jax.vmap(jax_nf4.add_rms_norm, in_axes=in_axes),
                   jax.jit(jax.vmap(jax_nf4.add_rms_norm, in_axes=in_axes))):
            y, s = fn(x, r_arg, scale)
            assert y.shape == s.shape == (3, 4, 64)
            for i in range(3):
                want_y, want_s = jax_nf4.add_rms_norm(x[:, i], r_of(i), scale)
                np.testing.assert_array_equal(bits(y[i]), bits(want_y))
                np.testing.assert_array_equal(bits(s[i]), bits(want_s))


def test_vmap_over_scale(platform, device, rng):
    """A batched scale folds into the group dim: each slice normalized with its own scale."""
    x, _, _ = random_inputs(rng, (2, 3, 40), np.dtype(jnp.bfloat16), np.float32)
    scales = (1 + rng.standard_normal((2, 40))).astype(np.float32)
    x, scales = put(device, x, scales)
    for in_axes in ((0, 0), (None, 0)):
        y = jax.vmap(jax_nf4.rms_norm, in_axes=in_axes)(x if in_axes[0] == 0 else x[0], scales)
        for i in range(2):
            want = jax_nf4.rms_norm(x[i] if in_axes[0] == 0 else x[0], scales[i])
            np.testing.assert_array_equal(bits(y[i]), bits(want))


def jnp_add_rms_norm(x, residual, scale, eps):
    s = x + residual
    u = s.astype(jnp.float32)
    y = u * jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype), s


def test_grad_matches_jnp(platform, device, rng):
    x, residual, scale = put(device, *random_inputs(rng, (3, 2, 48), np.dtype(np.float32),
                                                    np.float32))
    w = jax.device_put(rng.standard_normal((3, 2, 48)).astype(np.float32), device)

    def loss(norm):
        def f(x, residual, scale):
            y, s = norm(x, residual, scale, eps=1e-5)
            return jnp.sum(jnp.sin(y) * w) + jnp.sum(s * s * w) + jnp.sum(norm(
                y, s, scale, eps=1e-5)[0] ** 2)
        return f

    want = jax.grad(loss(jnp_add_rms_norm), argnums=(0, 1, 2))(x, residual, scale)
    for fn in (jax.grad(loss(jax_nf4.add_rms_norm), argnums=(0, 1, 2)),
               jax.jit(jax.grad(loss(jax_nf4.add_rms_norm), argnums=(0, 1, 2)))):
        for g, g_want in zip(fn(x, residual, scale), want):
            np.testing.assert_allclose(g, g_want, rtol=2e-5, atol=2e-5)
    # Forward mode, and rms_norm alone through vmap of grad.
    tangents = put(device, *random_inputs(rng, (3, 2, 48), np.dtype(np.float32), np.float32))
    _, t_got = jax.jvp(lambda *a: jax_nf4.add_rms_norm(*a, eps=1e-5), (x, residual, scale),
                       tuple(tangents))
    _, t_want = jax.jvp(lambda *a: jnp_add_rms_norm(*a, 1e-5), (x, residual, scale),
                        tuple(tangents))
    for a, b in zip(t_got, t_want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    per_row = jax.vmap(jax.grad(lambda v: jnp.sum(jax_nf4.rms_norm(v, scale) * w[0, 0])))(x[0])
    per_row_want = jax.vmap(jax.grad(
        lambda v: jnp.sum(jnp_add_rms_norm(v, jnp.zeros_like(v), scale, 1e-6)[0] * w[0, 0])))(x[0])
    np.testing.assert_allclose(per_row, per_row_want, rtol=2e-5, atol=2e-5)


def test_bf16_grad_has_the_primal_dtypes(platform, device, rng):
    x, residual, scale = put(device, *random_inputs(rng, (2, 64), np.dtype(jnp.bfloat16),
                                                    np.float32))
    grads = jax.grad(lambda *a: jnp.sum(jax_nf4.add_rms_norm(*a)[0].astype(jnp.float32)),
                     argnums=(0, 1, 2))(x, residual, scale)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    assert all(np.isfinite(np.asarray(g, np.float32)).all() and np.any(g) for g in grads)


# ----------------------------------------------------------------------------- errors

def _arrays():
    return (jnp.ones((2, 32), jnp.float32), jnp.ones((2, 32), jnp.float32),
            jnp.ones((32,), jnp.float32))


@pytest.mark.parametrize("change, error, match", [
    (lambda x, r, g, e: (x.astype(jnp.int32), r, g, e), TypeError, "add_rms_norm: x must be"),
    (lambda x, r, g, e: (x, r[:, :16], g, e), ValueError,
     r"residual must have x's shape and dtype float32\[2, 32\], got float32\[2, 16\]"),
    (lambda x, r, g, e: (x, r.astype(jnp.bfloat16), g, e), ValueError,
     r"residual must have x's shape and dtype"),
    (lambda x, r, g, e: (x, r, g[:31], e), ValueError,
     r"scale must have shape \[32\].*got float32\[31\]"),
    (lambda x, r, g, e: (x, r, g.astype(jnp.int8), e), TypeError, "add_rms_norm: scale must be"),
    (lambda x, r, g, e: (x[:, :0], r[:, :0], g[:0], e), ValueError, "D >= 1"),
    (lambda x, r, g, e: (x, r, g, -1.0), ValueError, "eps must be finite and >= 0"),
    (lambda x, r, g, e: (x, r, g, float("nan")), ValueError, "eps must be finite"),
    (lambda x, r, g, e: (x, r, g, "1e-5"), TypeError, "eps must be a float"),
])
def test_errors_name_the_argument(change, error, match):
    x, r, g, eps = change(*_arrays(), 1e-6)
    with pytest.raises(error, match=match):
        jax_nf4.add_rms_norm(x, r, g, eps=eps)


def test_rms_norm_errors():
    x, _, g = _arrays()
    with pytest.raises(ValueError, match=r"rms_norm: x must have shape \[..., D\]"):
        jax_nf4.rms_norm(jnp.float32(1), g)
    with pytest.raises(ValueError, match=r"rms_norm: scale must have shape \[32\]"):
        jax.jit(jax_nf4.rms_norm)(x, g[None])


def test_handler_checks_its_operands(platform, device):
    """The FFI handlers validate on their own (custom calls that skip the Python checks)."""
    def call(target, *arrays, outs):
        fn = jax.ffi.ffi_call(f"jax_nf4_{target}", outs)
        return jax.jit(lambda *a: fn(*a, eps=np.float32(1e-6)))(*put(device, *arrays))

    x = jnp.ones((1, 2, 32), jnp.float32)
    good = jax.ShapeDtypeStruct(x.shape, x.dtype)
    y = call("rms_norm", 2 * x, jnp.ones((1, 32)), outs=(good,))
    np.testing.assert_allclose(y[0], np.ones((1, 2, 32)), rtol=1e-6)
    for target, arrays, outs, match in (
            ("rms_norm", (x, jnp.ones((1, 16))), (good,), r"rms_norm: scale must be"),
            ("rms_norm", (x, jnp.ones((1, 32))),
             (jax.ShapeDtypeStruct((1, 2, 32), jnp.bfloat16),), "rms_norm: the output must be"),
            ("add_rms_norm", (x, x[:, :1], jnp.ones((1, 32))), (good, good),
             "add_rms_norm: residual must be"),
            ("add_rms_norm", (x[0], x[0], jnp.ones((1, 32))), (good, good),
             r"add_rms_norm: x must be \[G, R, D\]")):
        with pytest.raises(jax.errors.JaxRuntimeError, match=match):
            jax.block_until_ready(call(target, *arrays, outs=outs))


# ----------------------------------------------------------------------------- the Llama model

def test_llama_with_and_without_the_norm_kernels(platform, device):
    pytest.importorskip("flax")
    from flax import nnx

    from jax_nf4.models import llama

    base = dataclasses.replace(llama.get_config("tiny"), max_len=16)
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, base.vocab_size, jnp.int32)
    with jax.default_device(device), jax.default_matmul_precision("highest"):
        models = {flag: llama.Llama(dataclasses.replace(base, fused_norm=flag),
                                    dtype=jnp.float32, rngs=nnx.Rngs(0))
                  for flag in (True, False)}
        logits = {flag: m(prompt)[0] for flag, m in models.items()}
        jaxpr = {flag: str(jax.make_jaxpr(lambda t, m=m: m(t))(prompt))
                 for flag, m in models.items()}
        tokens = {flag: np.asarray(llama.generate(m, prompt, 6)) for flag, m in models.items()}
    # Two blocks: the first norm alone, every later one fused with the residual add before it.
    assert jaxpr[True].count("rms_norm") == 1 + 2 * base.n_layers
    assert "rms_norm" not in jaxpr[False]
    np.testing.assert_allclose(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(tokens[True], tokens[False])
