"""jax_nf4.decode_attention (the fused rotary + KV-cache write + attention decode step) on every
available backend: against a NumPy float64 reference of its semantics, the cache write bit for
bit, in place under jit (donated caches, a loop carry), vmap, the errors, and the Llama model
decoding with it and without it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nf4

DTYPES = [pytest.param(np.dtype(np.float32), id="f32"),
          pytest.param(np.dtype(jnp.bfloat16), id="bf16"),
          pytest.param(np.dtype(np.float16), id="f16")]
# (B, H_kv, G, D, T). On an H100, bf16 / f16 with D = 64 or 128 and G <= 16 take the
# tensor-core split kernel: 8 warps per CTA up to 1024 slots, one chunk (T = 16) or the chunks
# of one (b, h) as a thread-block cluster (T = 300, 144, 1000: 3, 2, 8 chunks; G = 16 fills
# the mma's rows); 4 warps beyond, as a cluster (T = 2000: 8 chunks) or 47 chunks and the
# combine kernel (T = 3000). float32, D = 32 and G = 17 take the SIMT kernel, one chunk or 9
# and the combine kernel (T = 2100).
SHAPES = [(1, 2, 4, 64, 16), (2, 1, 1, 128, 300), (1, 8, 4, 128, 144), (1, 2, 8, 128, 1000),
          (2, 3, 2, 32, 7), (1, 2, 2, 128, 2000), (1, 1, 4, 64, 3000), (1, 1, 2, 32, 2100),
          (1, 1, 16, 128, 300), (1, 1, 17, 64, 40)]
# pos as a function of T: the first slot, the middle, the last, past the end and negative
# (both clamp into [0, T - 1]).
POSITIONS = {"first": lambda t: 0, "middle": lambda t: t // 2 + 1, "last": lambda t: t - 1,
             "past_end": lambda t: t + 3, "negative": lambda t: -2}
THETA = 10_000.0
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0 ** -24, np.dtype(jnp.bfloat16): 2.0 ** -8,
                 np.dtype(np.float16): 2.0 ** -11}


# ----------------------------------------------------------------------------- reference

def bits(a) -> np.ndarray:
    """The raw bits of an array (tells -0.0 from 0.0, compares NaNs)."""
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}")


def rope_angles(pos: int, d: int, theta: float) -> np.ndarray:
    """The rotary angles of pairs i < D/2 as the op computes them, every step in float32:
    float32(pos) * float32(theta ** (-2 i / D)) (float64 afterwards)."""
    inv_freq = (theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
    return (np.float32(pos) * inv_freq).astype(np.float64)


def rotate(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Llama's half-split rotary of the last dim of float64 ``x``: (x1 cos - x2 sin,
    x2 cos + x1 sin) for the pairs (i, i + D/2)."""
    half = x.shape[-1] // 2
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rotation_error(x: np.ndarray, angles: np.ndarray, platform: str) -> np.ndarray:
    """A bound on |float32 rotation - float64 rotation| of each element of ``x``: float32 cos /
    sin (a few ulps) and three roundings, and on GPU an inverse frequency from ``powf`` up to
    2 ulps off (which moves the angle by 2 EPS32 |angle|)."""
    half = x.shape[-1] // 2
    pair = np.abs(x[..., :half]) + np.abs(x[..., half:])
    rel = 8 * EPS32 + (2 * EPS32 * np.abs(angles) if platform == "gpu" else 0.0)
    return np.concatenate([pair * rel, pair * rel], axis=-1)


def round_to(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(np.float32).astype(dtype)


def assert_rounded(got: np.ndarray, want: np.ndarray, err: np.ndarray, dtype) -> None:
    """``got`` is ``want`` (float64, known to within ``err``) rounded to ``dtype``: bit-exact
    wherever every value within ``err`` of ``want`` rounds to the same number, otherwise one
    of the numbers between (rounding is monotonic)."""
    lo, hi = round_to(want - err, dtype), round_to(want + err, dtype)
    g = got.astype(np.float64)
    ok = (lo.astype(np.float64) <= g) & (g <= hi.astype(np.float64))
    assert ok.all(), f"{(~ok).sum()} elements outside their rounding interval"
    exact = bits(lo) == bits(hi)
    np.testing.assert_array_equal(bits(got)[exact], bits(lo)[exact])


def reference_attention(qkv: np.ndarray, keys: np.ndarray, values: np.ndarray, pos: int,
                        theta: float) -> np.ndarray:
    """The float64 attention output of the op's semantics: q = dtype(rot(qkv[:, :, :G])),
    softmax(q . k[t] / sqrt(D)) over the slots t <= slot of ``keys`` / ``values`` (which
    already hold the new key and value at the slot)."""
    g = qkv.shape[2] - 2
    d = qkv.shape[3]
    slot = min(max(pos, 0), keys.shape[1] - 1)
    q = round_to(rotate(qkv[:, :, :g].astype(np.float64), rope_angles(pos, d, theta)),
                 qkv.dtype).astype(np.float64)
    k = keys[:, :slot + 1].astype(np.float64)
    v = values[:, :slot + 1].astype(np.float64)
    scores = np.einsum("bhgd,bthd->bhgt", q, k) / np.sqrt(d)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhgt,bthd->bhgd", p, v)


def out_tolerance(dtype, platform: str, pos: int, v_max: float) -> tuple[float, float]:
    """(rtol, atol) of the attention output against the float64 reference.

    * rtol: the one rounding of the output to ``dtype`` (2u); float32: 1e-5, for the float32
      scores, softmax and sums (the errors seen are about 100 times smaller).
    * atol, a fraction of max |v|: 1e-5 for the float32 arithmetic where outputs cancel, and
      for bf16 / f16 u / 2 more: a query element whose float32 rotation lies next to a rounding
      boundary of ``dtype`` may round the other way than the float64 one (one ulp of q moves a
      score by about u / sqrt(D), the output by less than u / 2 max |v|).
    * On GPU, ``powf`` may give an inverse frequency a couple of ulps off: the angle then moves
      by up to 2 EPS32 pos, the rotated q and k by as much relative to their size, the scores
      (of size ~1 here) by about twice that and the output by twice the score error, so
      16 EPS32 pos max |v| more (none at pos 0).
    """
    u = UNIT_ROUNDOFF[np.dtype(dtype)]
    rtol = 1e-5 if np.dtype(dtype) == np.float32 else 2 * u
    atol = 1e-5 + (0.0 if np.dtype(dtype) == np.float32 else u / 2)
    if platform == "gpu":
        atol += 16 * EPS32 * max(pos, 0)
    return rtol, atol * v_max


# ----------------------------------------------------------------------------- helpers

def random_inputs(rng: np.random.Generator, shape, dtype, pos: int):
    """qkv and caches of standard normal values in ``dtype``, NaN in every slot after the one
    the step writes (the op must never read them)."""
    b, h, g, d, t = shape
    qkv = rng.standard_normal((b, h, g + 2, d)).astype(np.float32).astype(dtype)
    k = rng.standard_normal((b, t, h, d)).astype(np.float32).astype(dtype)
    v = rng.standard_normal((b, t, h, d)).astype(np.float32).astype(dtype)
    slot = min(max(pos, 0), t - 1)
    k[:, slot + 1:] = np.nan
    v[:, slot + 1:] = np.nan
    return qkv, k, v


def check_step(qkv, k, v, pos, out, k_out, v_out, platform: str, theta: float = THETA):
    """Asserts one step's results against the reference: the cache slot written (v bit-exact,
    k the rounded rotation), every other slot bit-identical, the output close."""
    qkv, k, v = np.asarray(qkv), np.asarray(k), np.asarray(v)
    out, k_out, v_out = np.asarray(out), np.asarray(k_out), np.asarray(v_out)
    dtype = qkv.dtype
    b, h, g2, d = qkv.shape
    t = k.shape[1]
    slot = min(max(pos, 0), t - 1)
    assert out.shape == (b, h, g2 - 2, d) and out.dtype == dtype
    assert k_out.shape == v_out.shape == k.shape and k_out.dtype == v_out.dtype == dtype
    others = np.arange(t) != slot
    np.testing.assert_array_equal(bits(k_out)[:, others], bits(k)[:, others])
    np.testing.assert_array_equal(bits(v_out)[:, others], bits(v)[:, others])
    np.testing.assert_array_equal(bits(v_out[:, slot]), bits(qkv[:, :, g2 - 1]))
    angles = rope_angles(pos, d, theta)
    x = qkv[:, :, g2 - 2].astype(np.float64)
    assert_rounded(k_out[:, slot], rotate(x, angles), rotation_error(x, angles, platform), dtype)
    want = reference_attention(qkv, k_out, v_out, pos, theta)
    v_max = float(np.abs(v_out[:, :slot + 1].astype(np.float64)).max())
    rtol, atol = out_tolerance(dtype, platform, pos, v_max)
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=rtol, atol=atol)


def put(device, *arrays):
    return [jax.device_put(a, device) for a in arrays]


# ----------------------------------------------------------------------------- semantics

@pytest.mark.parametrize("pos_case", list(POSITIONS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(platform, device, rng, dtype, shape, pos_case):
    pos = POSITIONS[pos_case](shape[-1])
    qkv, k, v = random_inputs(rng, shape, dtype, pos)
    args = put(device, qkv, k, v)
    out, k_out, v_out = jax_nf4.decode_attention(*args, pos, rope_theta=THETA)
    assert {x.devices().pop() for x in (out, k_out, v_out)} == {device}
    check_step(qkv, k, v, pos, out, k_out, v_out, platform)
    # Not donated: the inputs are intact.
    np.testing.assert_array_equal(bits(args[1]), bits(k))
    np.testing.assert_array_equal(bits(args[2]), bits(v))


def test_rotary_matches_llama_rope(platform, device, rng):
    """The key written to the cache is llama.rope of the new key (up to float32 rounding of
    cos / sin), and pos is also accepted as an int32 array or a NumPy integer."""
    pytest.importorskip("flax")
    from jax_nf4.models import llama

    qkv, k, v = random_inputs(rng, (2, 2, 1, 64, 40), np.float32, 37)
    args = put(device, qkv, k, v)
    for pos in (37, np.int64(37), jnp.asarray(37, jnp.int32)):
        _, k_out, _ = jax_nf4.decode_attention(*args, pos, rope_theta=500_000.0)
        with jax.default_device(device):
            want = llama.rope(jnp.asarray(qkv[:, None, :, 1]), jnp.asarray([37]), 500_000.0)
        np.testing.assert_allclose(np.asarray(k_out)[:, 37], np.asarray(want)[:, 0],
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- jit / in place

def test_jit_with_donated_caches(platform, device, rng):
    shape, pos = (2, 2, 4, 64, 32), 20
    qkv, k, v = random_inputs(rng, shape, np.dtype(jnp.bfloat16), pos)
    step = jax.jit(functools.partial(jax_nf4.decode_attention, rope_theta=THETA),
                   donate_argnums=(1, 2))
    args = put(device, qkv, k, v)
    compiled = step.lower(*args, jnp.int32(pos)).compile().as_text()
    assert "input_output_alias" in compiled  # the caches are updated in place
    out, k_out, v_out = step(*args, jnp.int32(pos))
    assert args[1].is_deleted() and args[2].is_deleted()
    check_step(qkv, k, v, pos, out, k_out, v_out, platform)


def test_loop_carry_matches_steps(platform, device, rng):
    """Several decode steps in a fori_loop with the caches as the carry (in place) give the
    results of the same steps called one by one."""
    b, h, g, d, t = 2, 2, 2, 32, 12
    n = 6
    qkvs = rng.standard_normal((n, b, h, g + 2, d)).astype(np.float32)
    k = rng.standard_normal((b, t, h, d)).astype(np.float32)
    v = rng.standard_normal((b, t, h, d)).astype(np.float32)
    start = 3

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def run(qkvs, k, v):
        def body(i, carry):
            k, v, outs = carry
            out, k, v = jax_nf4.decode_attention(qkvs[i], k, v, start + i, rope_theta=THETA)
            return k, v, outs.at[i].set(out)

        return jax.lax.fori_loop(0, n, body, (k, v, jnp.zeros((n, b, h, g, d), jnp.float32)))

    got_k, got_v, got_out = run(*put(device, qkvs, k, v))
    want_k, want_v = put(device, k, v)
    for i in range(n):
        out, want_k, want_v = jax_nf4.decode_attention(jax.device_put(qkvs[i], device), want_k,
                                                       want_v, start + i, rope_theta=THETA)
        np.testing.assert_allclose(np.asarray(got_out[i]), np.asarray(out), rtol=1e-6,
                                   atol=1e-6)
    np.testing.assert_array_equal(bits(got_k), bits(want_k))
    np.testing.assert_array_equal(bits(got_v), bits(want_v))


# ----------------------------------------------------------------------------- vmap

def test_vmap_over_qkv_and_caches(platform, device, rng):
    n, (b, h, g, d, t), pos = 3, (2, 2, 2, 32, 10), 6
    qkv = rng.standard_normal((n, b, h, g + 2, d)).astype(np.float32)
    k = rng.standard_normal((b, t, n, h, d)).astype(np.float32)  # vmapped along axis 2
    v = rng.standard_normal((n, b, t, h, d)).astype(np.float32)
    step = functools.partial(jax_nf4.decode_attention, rope_theta=THETA)
    args = put(device, qkv, k, v)
    for fn in (jax.vmap(step, in_axes=(0, 2, 0, None)),
               jax.jit(jax.vmap(step, in_axes=(0, 2, 0, None)))):
        out, k_out, v_out = fn(*args, pos)
        assert out.shape == (n, b, h, g, d) and k_out.shape == v_out.shape == (n, b, t, h, d)
        for i in range(n):
            check_step(qkv[i], k[:, :, i], v[i], pos, out[i], k_out[i], v_out[i], platform)


def test_vmap_over_qkv_only(platform, device, rng):
    """Unbatched caches are broadcast: each vmapped step writes its own copy."""
    n, (b, h, g, d, t), pos = 2, (1, 2, 4, 64, 9), 4
    qkv = rng.standard_normal((b, h, g + 2, n, d)).astype(np.float32)  # vmapped along axis 3
    k = rng.standard_normal((b, t, h, d)).astype(np.float32)
    v = rng.standard_normal((b, t, h, d)).astype(np.float32)
    step = jax.vmap(functools.partial(jax_nf4.decode_attention, rope_theta=THETA),
                    in_axes=(3, None, None, None))
    out, k_out, v_out = step(*put(device, qkv, k, v), pos)
    assert out.shape == (n, b, h, g, d) and k_out.shape == (n, b, t, h, d)
    for i in range(n):
        check_step(qkv[:, :, :, i], k, v, pos, out[i], k_out[i], v_out[i], platform)


def test_vmap_over_pos_raises(platform, device, rng):
    qkv, k, v = random_inputs(rng, (1, 1, 1, 32, 8), np.float32, 7)
    qkv, k, v = put(device, qkv[None].repeat(2, 0), k, v)
    step = functools.partial(jax_nf4.decode_attention, rope_theta=THETA)
    with pytest.raises(NotImplementedError, match="pos is batched"):
        jax.vmap(step, in_axes=(0, None, None, 0))(qkv, k, v, jnp.arange(2, dtype=jnp.int32))


# ----------------------------------------------------------------------------- autodiff, errors

def test_no_derivative(platform, device, rng):
    qkv, k, v = put(device, *random_inputs(rng, (1, 2, 2, 32, 8), np.float32, 3))

    def loss(qkv, k):
        return jax_nf4.decode_attention(qkv, k, v, 3, rope_theta=THETA)[0].sum()

    with pytest.raises(NotImplementedError, match="inference-only decode step.*qkv"):
        jax.grad(loss)(qkv, k)
    with pytest.raises(NotImplementedError, match="no derivative.*k_cache"):
        jax.jit(jax.grad(loss, argnums=1))(qkv, k)
    with pytest.raises(NotImplementedError, match="no derivative"):
        jax.jvp(lambda q: loss(q, k), (qkv,), (jnp.ones_like(qkv),))
    # Differentiating something else through a stopped op is fine.
    grad = jax.grad(lambda s: s * loss(jax.lax.stop_gradient(qkv), k))(jnp.float32(2.0))
    np.testing.assert_allclose(grad, loss(qkv, k), rtol=1e-6)


def _arrays(b=1, h=2, g=2, d=32, t=8, dtype=jnp.float32):
    return (jnp.zeros((b, h, g + 2, d), dtype), jnp.zeros((b, t, h, d), dtype),
            jnp.zeros((b, t, h, d), dtype))


@pytest.mark.parametrize("change, error, match", [
    (lambda q, k, v, p: (q[0], k, v, p), ValueError, r"qkv must be \[B, H_kv, G \+ 2, D\].*"
                                                     r"float32\[2, 4, 32\]"),
    (lambda q, k, v, p: (q[:, :, :2], k, v, p), ValueError, r"qkv's dim 2.*>= 3"),
    (lambda q, k, v, p: (q[..., :31], k[..., :31], v[..., :31], p), ValueError,
     r"head dim D.*even.*float32\[1, 2, 4, 31\]"),
    (lambda q, k, v, p: (q.astype(jnp.int32), k, v, p), TypeError, "qkv must be float32"),
    (lambda q, k, v, p: (q, k[:, :, :1], v, p), ValueError,
     r"k_cache must be \[B, T, H_kv, D\] = \[1, T >= 1, 2, 32\].*got float32\[1, 8, 1, 32\]"),
    (lambda q, k, v, p: (q, k, v[:, :0], p), ValueError, r"v_cache must be.*T >= 1"),
    (lambda q, k, v, p: (q, k, v[:, :4], p), ValueError, "same shape"),
    (lambda q, k, v, p: (q, k, v.astype(jnp.bfloat16), p), TypeError,
     r"v_cache must have qkv's dtype float32, got bfloat16\[1, 8, 2, 32\]"),
    (lambda q, k, v, p: (q, k, v, 1.0), TypeError, "pos must be an integer scalar"),
    (lambda q, k, v, p: (q, k, v, jnp.arange(2)), ValueError, r"pos must be a scalar.*\[2\]"),
])
def test_errors_name_the_argument(change, error, match):
    args = change(*_arrays(), 3)
    with pytest.raises(error, match=match):
        jax_nf4.decode_attention(*args)
    with pytest.raises(error, match=match):
        jax.jit(jax_nf4.decode_attention)(*args)


def test_handler_checks_its_operands(platform, device):
    """The FFI handler validates on its own (a custom call that skips the Python checks)."""
    def call(qkv, k, v, pos):
        b, h, g2, d = qkv.shape
        outs = (jax.ShapeDtypeStruct((b, h, g2 - 2, d), qkv.dtype),
                jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
        fn = jax.ffi.ffi_call("jax_nf4_decode_attention", outs)
        return jax.jit(lambda *a: fn(*a, rope_theta=np.float32(THETA)))(
            *put(device, qkv, k, v, pos))

    q, k, v = _arrays()
    pos = jnp.int32(3)
    out = call(q + 1, k, v, pos)  # well-formed: runs
    assert out[0].shape == (1, 2, 2, 32)
    for args, match in (((q, k[:, :, :1], v, pos), "decode_attention: k_cache"),
                        ((q, k, v[..., :16], pos), "decode_attention: v_cache"),
                        ((q[..., :31], k[..., :31], v[..., :31], pos), "decode_attention: qkv"),
                        ((q, k, v, jnp.float32(3)), "decode_attention: pos")):
        with pytest.raises(jax.errors.JaxRuntimeError, match=match):
            jax.block_until_ready(call(*args))


# ----------------------------------------------------------------------------- the Llama model

def test_llama_decodes_the_same_with_and_without_the_kernel(platform, device):
    pytest.importorskip("flax")
    from flax import nnx

    from jax_nf4.models import llama

    base = dataclasses.replace(llama.get_config("tiny"), n_layers=1, max_len=16)
    prompt_len, new = 4, 6
    with jax.default_device(device), jax.default_matmul_precision("highest"):
        models = {flag: llama.Llama(dataclasses.replace(base, decode_attention=flag),
                                    dtype=jnp.float32, rngs=nnx.Rngs(0))
                  for flag in (True, False)}
        prompt = jax.random.randint(jax.random.PRNGKey(1), (2, prompt_len), 0,
                                    base.vocab_size, jnp.int32)

        @nnx.jit
        def step(model, tokens, cache, pos):
            return model(tokens, cache, pos)

        logits, caches, jaxprs = {}, {}, {}
        for flag, model in models.items():
            _, cache = step(model, prompt, model.init_cache(2), 0)           # prefill
            nxt = jnp.full((2, 1), 7, jnp.int32)
            logits[flag], caches[flag] = step(model, nxt, cache, jnp.int32(prompt_len))
            jaxprs[flag] = str(jax.make_jaxpr(lambda c, m=model: m(nxt, c, prompt_len))(cache))
        assert "decode_attention" in jaxprs[True] and "decode_attention" not in jaxprs[False]
        np.testing.assert_allclose(logits[True], logits[False], rtol=1e-4, atol=1e-4)
        for a, b in zip(caches[True].k + caches[True].v, caches[False].k + caches[False].v):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        tokens = {flag: np.asarray(llama.generate(model, prompt, new))
                  for flag, model in models.items()}
    np.testing.assert_array_equal(tokens[True], tokens[False])
    # A cache of another dtype than the activations keeps the jnp attention.
    cache16 = models[True].init_cache(2, jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda c: models[True](prompt[:, :1], c, 2))(cache16))
    assert "decode_attention" not in jaxpr
