"""jax_nf4.flax: linen / NNX NF4 layers against the dense Flax layers on the same (dequantized)
kernel, conversion, LoRA-only optax steps, save / restore, scan over stacked layers."""

from __future__ import annotations

import functools
import pickle
import warnings

import numpy as np
import pytest

flax = pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx, serialization  # noqa: E402

import jax_nf4 as nf4  # noqa: E402
from jax_nf4 import reference  # noqa: E402
from jax_nf4.flax import (  # noqa: E402
    NF4_COLLECTION,
    NF4Dense,
    NF4Linear,
    NF4State,
    intercept_dense,
    lora_labels,
    quantize_module,
    quantize_params,
)

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 2e-5, BF16: 2e-2}


@pytest.fixture(autouse=True)
def _on_platform(device):
    """Runs every test on each backend of conftest's ``platform`` fixture (CPU, and the GPU
    where jax_nf4 has its CUDA kernels): arrays and jitted calls go to ``device``. Float32 dots
    run at full precision (GPUs would otherwise use TF32, 1e-3 off, in the dense references and
    the LoRA products)."""
    with jax.default_device(device), jax.default_matmul_precision("highest"):
        yield


def _np(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _deq(q):
    """Dequantized float32 ``(out, in)`` weight (NumPy reference)."""
    return reference.dequantize_f32(np.asarray(q.packed), np.asarray(q.absmax), q.block_size)


def _close(got, want, dtype=F32):
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * max(np.abs(want).max(), 1))


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- linen

@pytest.mark.parametrize("dtype,use_bias,block_size", [
    (None, True, 64), (F32, False, 32), (BF16, True, 64)])
def test_linen_nf4dense_matches_dense(dtype, use_bias, block_size):
    k, n = 128, 48
    x = jnp.asarray(_np((2, 3, k), 0))
    layer = NF4Dense(n, use_bias=use_bias, dtype=dtype, block_size=block_size,
                     bias_init=nn.initializers.normal(1.0))
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    assert set(variables) == {NF4_COLLECTION}  # no trainable params without LoRA
    q = variables[NF4_COLLECTION]["kernel"]
    assert isinstance(q, nf4.NF4Weight) and q.shape == (n, k) and q.block_size == block_size
    y = jax.jit(layer.apply)(variables, x)

    dense = nn.Dense(n, use_bias=use_bias, dtype=dtype, precision="highest")
    params = {"kernel": jnp.asarray(_deq(q).T)}
    if use_bias:
        params["bias"] = variables[NF4_COLLECTION]["bias"]
    y_dense = jax.jit(dense.apply)({"params": params}, x)
    assert y.dtype == y_dense.dtype == (dtype or F32)
    _close(y, y_dense, dtype or F32)


def test_linen_lora_output_and_grad():
    k, n, rank, alpha = 64, 32, 4, 8.0
    x = jnp.asarray(_np((5, k), 1))
    layer = NF4Dense(n, lora_rank=rank, lora_alpha=alpha, block_size=32)
    variables = layer.init(jax.random.key(1), x)
    params = variables["params"]
    assert set(params) == {"lora_a", "lora_b"}
    assert params["lora_a"].shape == (k, rank) and params["lora_b"].shape == (rank, n)
    assert not np.any(np.asarray(params["lora_b"]))  # B = 0: starts as the frozen layer
    params = {"lora_a": params["lora_a"], "lora_b": jnp.asarray(_np((rank, n), 2, 0.1))}
    variables = {**variables, "params": params}

    @jax.jit
    def run(params, x):
        f = lambda p: layer.apply({**variables, "params": p}, x)  # noqa: E731
        return f(params), jax.grad(lambda p: jnp.sum(f(p) ** 2))(params)

    y, g = run(params, x)
    nf = variables[NF4_COLLECTION]
    x64, a, b = (np.asarray(v, np.float64) for v in (x, params["lora_a"], params["lora_b"]))
    want = x64 @ _deq(nf["kernel"]).T + np.asarray(nf["bias"]) + alpha / rank * (x64 @ a) @ b
    _close(y, want)
    dy = 2 * want
    _close(g["lora_b"], alpha / rank * (x64 @ a).T @ dy)
    _close(g["lora_a"], alpha / rank * x64.T @ (dy @ b.T))


class _MLP(nn.Module):
    """A small dense linen model: embedding, two Dense layers, a norm and a small head."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(64, 128)(tokens)
        h = nn.relu(nn.Dense(256)(h))
        h = nn.LayerNorm()(h)
        h = nn.Dense(128, use_bias=False)(h)
        return nn.Dense(10)(h)  # 128 x 10: below min_dim, stays dense


@functools.cache
def _mlp_params():
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (4, 6)))
    model = _MLP()
    return model, tokens, jax.jit(model.init)(jax.random.key(3), tokens)["params"]


def _dequantized_params(params, nf4_vars):
    """``params`` with every quantized kernel replaced by its dequantized ``[in, out]``."""
    out = jax.tree.map(lambda a: a, flax.core.unfreeze(params))
    for name, sub in nf4_vars.items():
        out[name]["kernel"] = jnp.asarray(_deq(sub["kernel"]).T)
    return out


def test_quantize_params_round_trip_and_intercept():
    model, tokens, params = _mlp_params()
    variables = quantize_params(params, block_size=64)
    nf = variables[NF4_COLLECTION]
    assert set(nf) == {"Dense_0", "Dense_1"}
    # Layout: Flax kernel [in, out] -> NF4Weight (out, in); the same as quantizing kernel.T.
    for name in nf:
        kernel = np.asarray(params[name]["kernel"])
        q = nf[name]["kernel"]
        assert q.shape == kernel.T.shape
        packed, absmax = reference.quantize(kernel.T, 64)
        np.testing.assert_array_equal(q.packed, packed)
        np.testing.assert_array_equal(q.absmax, absmax)
        # Round trip: back to a [in, out] kernel within NF4 error (~ absmax / 10 per element).
        err = np.abs(_deq(q).T - kernel)
        assert err.max() <= 0.2 * np.abs(kernel).max() and err.mean() < 0.05 * np.abs(kernel).max()
    assert "bias" in nf["Dense_0"] and "bias" not in nf["Dense_1"]  # bias moved, frozen
    rest = variables["params"]
    assert set(rest) == {"Embed_0", "LayerNorm_0", "Dense_2"}
    assert _leaves_equal(rest["Embed_0"], params["Embed_0"])  # embeddings / norms untouched
    assert _leaves_equal(rest["Dense_2"], params["Dense_2"])

    @jax.jit
    def forward(variables, tokens):
        with intercept_dense():
            return model.apply(variables, tokens)

    y = forward(variables, tokens)
    y_ref = jax.jit(model.apply)({"params": _dequantized_params(params, nf)}, tokens)
    _close(y, y_ref, F32)
    y_orig = model.apply({"params": params}, tokens)
    assert np.abs(np.asarray(y) - np.asarray(y_orig)).max() < 0.2 * np.abs(y_orig).max()


def test_quantize_params_skips_unquantizable_kernels():
    params = {"a": {"kernel": jnp.ones((130, 256)), "bias": jnp.ones(256)},  # in % 64 != 0
              "b": {"kernel": jnp.ones((128, 129))},                         # odd out
              "c": {"kernel": jnp.ones((128, 128))}}
    with pytest.warns(UserWarning, match="left dense.*a/kernel.*b/kernel"):
        variables = quantize_params({"params": params, "batch_stats": {"x": 1}})
    assert set(variables[NF4_COLLECTION]) == {"c"}
    assert set(variables["params"]) == {"a", "b"}
    assert variables["batch_stats"] == {"x": 1}
    # A custom predicate.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = quantize_params(params, lambda path, kernel: path[0] == "c", block_size=32)
    assert set(v[NF4_COLLECTION]) == {"c"} and v[NF4_COLLECTION]["c"]["kernel"].block_size == 32


def test_linen_lora_optax_step_changes_only_lora():
    optax = pytest.importorskip("optax")
    model, tokens, params = _mlp_params()
    variables = quantize_params(params, lora_rank=4, rng=jax.random.key(4))
    assert set(variables["params"]["Dense_0"]) == {"lora_a", "lora_b"}
    targets = jnp.asarray(_np((4, 6, 10), 5))

    def loss(p, nf):
        with intercept_dense(lora_alpha=8.0):
            return jnp.mean((model.apply({"params": p, NF4_COLLECTION: nf}, tokens) - targets) ** 2)

    tx = optax.multi_transform({"lora": optax.adam(1e-2), "frozen": optax.set_to_zero()},
                               lora_labels(variables["params"]))
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(p, opt_state, nf):
        value, g = jax.value_and_grad(loss)(p, nf)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    p, nf = variables["params"], variables[NF4_COLLECTION]
    new, losses = p, []
    for _ in range(3):
        new, opt_state, value = step(new, opt_state, nf)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    for name in ("Dense_0", "Dense_1"):
        for leaf in ("lora_a", "lora_b"):
            assert not np.array_equal(new[name][leaf], p[name][leaf]), (name, leaf)
    for name in ("Embed_0", "LayerNorm_0", "Dense_2"):
        assert _leaves_equal(new[name], p[name]), name


def test_linen_nf4_only_model_grad_over_params_is_lora_only():
    optax = pytest.importorskip("optax")
    model = nn.Sequential([NF4Dense(64, lora_rank=2, block_size=32), nn.tanh,
                           NF4Dense(32, lora_rank=2, block_size=32)])
    x = jnp.asarray(_np((8, 32), 6))
    variables = jax.jit(model.init)(jax.random.key(6), x)
    tx = optax.sgd(0.1)
    params, frozen = variables["params"], variables[NF4_COLLECTION]

    @jax.jit
    def step(params):
        g = jax.grad(lambda p: jnp.sum(model.apply({"params": p, NF4_COLLECTION: frozen}, x)
                                       ** 2))(params)
        updates, _ = tx.update(g, tx.init(params))
        return optax.apply_updates(params, updates)

    new = step(step(params))
    assert all(set(v) == {"lora_a", "lora_b"} for v in new.values())
    assert not _leaves_equal(new, params)


def test_linen_serialization_round_trip():
    x = jnp.asarray(_np((3, 64), 7))
    layer = NF4Dense(32, lora_rank=2, block_size=32)
    variables = layer.init(jax.random.key(7), x)
    data = serialization.to_bytes(variables)
    template = layer.init(jax.random.key(8), x)  # different values, same structure
    restored = serialization.from_bytes(template, data)
    assert isinstance(restored[NF4_COLLECTION]["kernel"], nf4.NF4Weight)
    assert _leaves_equal(restored, variables)
    np.testing.assert_array_equal(layer.apply(restored, x), layer.apply(variables, x))
    state = serialization.to_state_dict(variables)
    assert set(state[NF4_COLLECTION]["kernel"]) == {"packed", "absmax"}
    # Pickling the variables works too (NF4Weight pickles).
    assert _leaves_equal(pickle.loads(pickle.dumps(variables)), variables)


def test_serialization_round_trip_of_double_quant_weights():
    """A double-quantized NF4Weight survives flax.serialization bytes and restores bit-exact."""
    w = _np((16, 128), 9)
    tree = {"kernel": nf4.quantize(w, 64, double_quant=True)}
    template = {"kernel": nf4.quantize(_np((16, 128), 10), 64, double_quant=True)}
    restored = serialization.from_bytes(template, serialization.to_bytes(tree))
    assert restored["kernel"].double_quant
    assert _leaves_equal(restored, tree)
    with pytest.raises(ValueError, match="double-quantized scales need the keys"):
        serialization.from_state_dict(template, {"kernel": {"packed": np.zeros((8, 128), np.uint8),
                                                            "absmax": np.ones((16, 2), np.float32)}})


def test_linen_scan_over_stacked_layers():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(NF4Dense(64, block_size=32, name="fc")(h)), None

    stack = nn.scan(Block, variable_axes={"params": 0, NF4_COLLECTION: 0},
                    split_rngs={"params": True}, length=3)()
    x = jnp.asarray(_np((4, 64), 9))
    variables = jax.jit(lambda k: stack.init(k, x, None))(jax.random.key(9))
    q = variables[NF4_COLLECTION]["fc"]["kernel"]
    assert q.stack_shape == (3,) and q.shape == (64, 64)
    y, _ = jax.jit(stack.apply)(variables, x, None)
    h = np.asarray(x, np.float64)
    w, b = _deq(q), np.asarray(variables[NF4_COLLECTION]["fc"]["bias"])
    for i in range(3):
        h = np.tanh(h @ w[i].T + b[i])
    _close(y, h)


# ----------------------------------------------------------------------------- NNX

@pytest.mark.parametrize("dtype,use_bias,block_size", [(None, True, 64), (BF16, False, 32)])
def test_nnx_nf4linear_matches_linear(dtype, use_bias, block_size):
    k, n = 128, 48
    x = jnp.asarray(_np((2, 3, k), 10))
    layer = NF4Linear(k, n, use_bias=use_bias, dtype=dtype, block_size=block_size,
                      bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(10))
    assert isinstance(layer.kernel, NF4State) and not isinstance(layer.kernel, nnx.Param)
    q = layer.kernel.get_value()
    assert q.shape == (n, k)
    assert not nnx.state(layer, nnx.Param)  # nothing trainable without LoRA
    y = nnx.jit(lambda m, x: m(x))(layer, x)

    dense = nnx.Linear(k, n, use_bias=use_bias, dtype=dtype, precision="highest",
                       rngs=nnx.Rngs(0))
    dense.kernel.set_value(jnp.asarray(_deq(q).T))
    if use_bias:
        dense.bias.set_value(layer.bias.get_value())
    y_dense = nnx.jit(lambda m, x: m(x))(dense, x)
    assert y.dtype == y_dense.dtype == (dtype or F32)
    _close(y, y_dense, dtype or F32)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(64, 128, rngs=rngs)
        self.fc1 = nnx.Linear(128, 256, rngs=rngs)
        self.norm = nnx.LayerNorm(256, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(256, 256, use_bias=False, rngs=rngs)
                                for _ in range(2)])
        self.head = nnx.Linear(256, 10, rngs=rngs)  # below min_dim: stays dense

    def __call__(self, tokens):
        h = self.norm(nnx.relu(self.fc1(self.embed(tokens))))
        for block in self.blocks:
            h = h + nnx.relu(block(h))
        return self.head(h)


@functools.cache
def _base_net() -> _Net:
    return _Net(nnx.Rngs(11))


def _net() -> _Net:
    """A fresh copy of one dense _Net (building modules compiles initializers: do it once)."""
    return nnx.clone(_base_net())


def _tokens(seed=11):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (4, 6)))


def test_quantize_module_round_trip():
    net = _net()
    tokens = _tokens()
    dense_kernels = {"fc1": np.asarray(net.fc1.kernel.get_value()),
                     "blocks0": np.asarray(net.blocks[0].kernel.get_value())}
    fc1_bias = np.asarray(net.fc1.bias.get_value())
    y_orig = nnx.jit(lambda m, t: m(t))(net, tokens)
    reference_net = nnx.clone(net)

    out = quantize_module(net, block_size=64)
    assert out is net
    assert isinstance(net.fc1, NF4Linear) and isinstance(net.blocks[1], NF4Linear)
    assert type(net.head) is nnx.Linear and isinstance(net.embed, nnx.Embed)
    q = net.fc1.kernel.get_value()
    packed, absmax = reference.quantize(dense_kernels["fc1"].T, 64)
    np.testing.assert_array_equal(q.packed, packed)
    np.testing.assert_array_equal(q.absmax, absmax)
    np.testing.assert_array_equal(net.fc1.bias.get_value(), fc1_bias)
    assert net.blocks[0].bias is None and net.blocks[0].kernel.get_value().shape == (256, 256)

    # The converted model equals the dense model with dequantized kernels (rounding level) and
    # the original model within NF4 error.
    reference_net.fc1.kernel.set_value(jnp.asarray(_deq(q).T))
    for i in range(2):
        reference_net.blocks[i].kernel.set_value(
            jnp.asarray(_deq(net.blocks[i].kernel.get_value()).T))
    y = nnx.jit(lambda m, t: m(t))(net, tokens)
    _close(y, nnx.jit(lambda m, t: m(t))(reference_net, tokens))
    assert np.abs(np.asarray(y - y_orig)).max() < 0.2 * np.abs(np.asarray(y_orig)).max()

    # A root nnx.Linear is returned converted.
    root = quantize_module(nnx.Linear(128, 128, rngs=nnx.Rngs(0)))
    assert isinstance(root, NF4Linear)


def test_nnx_lora_optax_step_changes_only_lora():
    optax = pytest.importorskip("optax")
    net = quantize_module(_net(), lora_rank=4, lora_alpha=8.0, rngs=nnx.Rngs(13))
    assert isinstance(net.fc1.lora_a, nnx.LoRAParam)
    tokens, targets = _tokens(12), jnp.asarray(_np((4, 6, 10), 12))
    before = nnx.clone(net)
    optimizer = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(net, optimizer):
        def loss(net):
            return jnp.mean((net(tokens) - targets) ** 2)
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(net)
        optimizer.update(net, grads)
        return value

    losses = [float(step(net, optimizer)) for _ in range(3)]
    assert losses[-1] < losses[0]
    lora_new, lora_old = nnx.state(net, nnx.LoRAParam), nnx.state(before, nnx.LoRAParam)
    for a, b in zip(jax.tree.leaves(lora_new), jax.tree.leaves(lora_old)):
        assert not np.array_equal(a, b)
    # NF4 kernels, biases, embeddings, norms and the dense head are untouched.
    not_lora = nnx.Not(nnx.LoRAParam)
    assert _leaves_equal(nnx.state(net, not_lora), nnx.state(before, not_lora))
    assert jax.tree.leaves(nnx.state(net, NF4State))


def test_nnx_save_restore_state():
    net = quantize_module(_net(), lora_rank=2, rngs=nnx.Rngs(15))
    for i, layer in enumerate((net.fc1, net.blocks[0], net.blocks[1])):
        layer.lora_b.set_value(jnp.asarray(_np(layer.lora_b.get_value().shape, 20 + i, 0.1)))
    tokens = _tokens(14)
    forward = nnx.jit(lambda m, t: m(t))
    y = forward(net, tokens)

    graphdef, state = nnx.split(net)
    restored = nnx.merge(graphdef, pickle.loads(pickle.dumps(state)))
    np.testing.assert_array_equal(forward(restored, tokens), y)

    # Pure-dict state (what a checkpoint holds) into a freshly built, differently initialised
    # model of the same structure.
    pure = pickle.loads(pickle.dumps(nnx.to_pure_dict(nnx.state(net))))
    assert isinstance(pure["fc1"]["kernel"], nf4.NF4Weight)
    fresh = quantize_module(_Net(nnx.Rngs(99)), lora_rank=2, rngs=nnx.Rngs(98))
    assert not np.array_equal(forward(fresh, tokens), y)
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(fresh, state)
    np.testing.assert_array_equal(forward(fresh, tokens), y)


def test_nnx_scan_over_stacked_layers_and_grad():
    layers, d = 3, 64

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return NF4Linear(d, d, block_size=32, lora_rank=2, rngs=nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(16), layers))
    q = stack.kernel.get_value()
    assert q.stack_shape == (layers,) and stack.lora_a.get_value().shape == (layers, d, 2)
    x = jnp.asarray(_np((4, d), 16))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(h, layer):
        return jnp.tanh(layer(h))

    @nnx.jit
    def loss_and_grad(stack, x):
        return nnx.value_and_grad(lambda s: jnp.sum(run(x, s) ** 2),
                                  argnums=nnx.DiffState(0, nnx.LoRAParam))(stack)

    value, grads = loss_and_grad(stack, x)
    h = np.asarray(x, np.float64)
    w, b = _deq(q), np.asarray(stack.bias.get_value())
    for i in range(layers):
        h = np.tanh(h @ w[i].T + b[i])
    np.testing.assert_allclose(float(value), np.sum(h ** 2), rtol=1e-5)
    g = grads["lora_b"].get_value()
    assert g.shape == (layers, 2, d) and np.any(np.asarray(g))

    # quantize_module on a stacked nnx.Linear (from nnx.vmap) quantizes the stack.
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_dense(key):
        return nnx.Linear(d, d, rngs=nnx.Rngs(key))

    dense = make_dense(jax.random.split(jax.random.key(17), layers))
    kernels = np.asarray(dense.kernel.get_value())
    converted = quantize_module(dense, min_dim=64, block_size=32)
    cq = converted.kernel.get_value()
    assert cq.stack_shape == (layers,)
    np.testing.assert_array_equal(cq.packed, reference.quantize(kernels.swapaxes(-1, -2), 32)[0])
    y = nnx.jit(lambda s, x: run(x, s))(converted, x)
    h = np.asarray(x, np.float64)
    for i in range(layers):
        h = np.tanh(h @ _deq(cq)[i].T + np.asarray(converted.bias.get_value())[i])
    _close(y, h)


def test_layer_errors():
    with pytest.raises(ValueError, match="in_features % block_size"):
        NF4Linear(100, 64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="out_features even"):
        NF4Dense(33).init(jax.random.key(0), jnp.ones((1, 64)))
    with pytest.raises(ValueError, match="needs rng"):
        quantize_params({"d": {"kernel": jnp.ones((128, 128))}}, lora_rank=2)
