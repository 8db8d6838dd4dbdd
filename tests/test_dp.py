"""DP-SGD by ghost norms (jaxcnn.train.dp): the per-layer norm and book-keeping rules against autodiff's
per-example gradients, the ghost step against the vmap step (same key, same update), masks, and refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn.functional as F
from conftest import TOLERANCE, normal, relative_error
from jaxcnn import models, nn, parallel
from jaxcnn.train import create_train_state, dp
from models_for_tests import random_variables

# -- per layer: the two rules DP needs, against jax.grad per example ---------------------------------------------

LAYERS = {
    "dense": (nn.Dense(5), (7,)),
    "dense-seq-nobias": (nn.Dense(4, use_bias=False), (3, 6)),
    "conv-same": (nn.Conv2D(4, 3), (6, 6, 2)),
    "conv-stride-dil-groups": (nn.Conv2D(6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=1, groups=3), (9, 8, 3)),
    "conv-1x1-nobias": (nn.Conv2D(3, 1, use_bias=False), (4, 4, 5)),
    "conv-transpose": (nn.ConvTranspose2D(3, 3, stride=2), (4, 5, 2)),
    "conv-transpose-dil": (nn.ConvTranspose2D(2, 2, stride=(1, 2), dilation=2, padding="VALID"), (3, 4, 3)),
    "group-norm": (nn.GroupNorm(2), (3, 4, 6)),
    "layer-norm-scale-only": (nn.LayerNorm(use_bias=False), (5, 4)),
}


def per_example_grads_of(layer, params, x, dy):
    """Example i's parameter gradient of <layer(x_i), dy_i>, by jax.grad (the oracle)."""

    def one(xi, dyi):
        return jax.grad(lambda p: jnp.sum(layer.forward(p, xi[None])[0] * dyi[None]))(params)

    return jax.vmap(one)(x, dy)


@pytest.mark.parametrize("dtype", [jnp.float64, pytest.param(jnp.float32, marks=pytest.mark.sample(3))])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_norms_and_weighted_grads_match_per_example_autodiff(name, dtype):
    layer, shape = LAYERS[name]
    params, _ = random_variables(layer, shape, seed=1, dtype=dtype)
    n = 5
    x = normal(2, (n, *shape), dtype)
    dy = normal(3, jax.eval_shape(lambda x: layer.forward(params, x)[0], x).shape, dtype)
    weights = jnp.asarray([0.3, 1.0, 0.0, 2.5, 0.7], dtype)
    methods = ("auto", "ghost", "direct") if isinstance(layer, nn.Conv2D | nn.ConvTranspose2D) else ("auto",)

    @jax.jit  # one program per case: eagerly, every primitive would compile on its own
    def run(params, x, dy, weights):
        _, residuals = layer.forward(params, x)
        oracle = per_example_grads_of(layer, params, x, dy)
        expected_sq = sum(jnp.sum(g.reshape(n, -1) ** 2, axis=1) for g in jax.tree.leaves(oracle))
        expected_sum = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), oracle)
        sq = {m: layer.per_example_sq_norms(params, residuals, dy, method=m) for m in methods}
        return sq, expected_sq, layer.weighted_param_grads(params, residuals, dy, weights), expected_sum

    sq, expected_sq, weighted, expected_sum = run(params, x, dy, weights)
    for method in methods:
        assert sq[method].shape == (n,)
        assert relative_error(sq[method], expected_sq) <= TOLERANCE[dtype], method
    for got, want in zip(jax.tree.leaves(weighted), jax.tree.leaves(expected_sum), strict=True):
        assert got.dtype == want.dtype
        assert relative_error(got, want) <= TOLERANCE[dtype]


def test_weighted_kernel_grads_scale_either_operand_alike():
    # a first convolution's input is smaller than its output (the input is scaled), a late one's is larger
    for layer, shape in ((nn.Conv2D(8, 3), (6, 6, 1)), (nn.Conv2D(1, 3, stride=2), (6, 6, 8))):
        params, _ = random_variables(layer, shape, seed=4)
        x = normal(5, (3, *shape))
        y, residuals = layer.forward(params, x)
        dy = normal(6, y.shape)
        weights = jnp.asarray([2.0, 0.5, 0.0])
        got = layer.weighted_param_grads(params, residuals, dy, weights)
        plain = nn.Layer.weighted_param_grads(layer, params, residuals, dy, weights)  # the default: dy scaled
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain), strict=True):
            assert relative_error(a, b) <= 1e-12


# -- whole models: ghost against vmap ------------------------------------------------------------------------


def strided_groupnorm_net():
    """Strides, dilation, groups, GroupNorm, LayerNorm, a transposed convolution, a residual block."""
    return nn.Sequential(
        [
            nn.Conv2D(6, 3, stride=2, padding="SAME"),
            nn.GroupNorm(3),
            nn.ReLU(),
            nn.Residual(nn.Sequential([nn.Conv2D(6, 3, dilation=2, padding=2, groups=3), nn.GELU()])),
            nn.LayerNorm(),
            nn.ConvTranspose2D(4, 3, stride=2),
            nn.Tanh(),
            nn.MaxPool2D(2),
            nn.Flatten(),
            nn.Dense(5),
        ]
    )


MODELS = {
    "mnist_cnn": (models.mnist_cnn, (28, 28, 1), F.softmax_cross_entropy),
    "strided-groupnorm": (strided_groupnorm_net, (9, 10, 3), F.softmax_cross_entropy),
    "conv_autoencoder": (models.conv_autoencoder, (12, 12, 1), F.mean_squared_error),
}


def batch(name, n, dtype=jnp.float64):
    builder, shape, loss_fn = MODELS[name]
    model = builder()
    params, state = random_variables(model, shape, seed=7, dtype=dtype)
    x = normal(8, (n, *shape), dtype)
    y = x if loss_fn is F.mean_squared_error else jnp.arange(n) % 5
    return model, loss_fn, params, state, x, y


@functools.cache
def clipped_and_noised(name, method, dtype):
    """Compiled once per (model, method, dtype): the clipped sum, then the noised mean, for a given clip."""
    model, loss_fn, *_ = batch(name, 1, dtype)

    def run(params, state, x, y, clip, key, mask):
        options = dict(l2_norm_clip=clip, method=method, mask=mask)
        result = dp.clipped_grad_sum(model, loss_fn, params, state, x, y, **options)
        noised = dp.noised_mean(result.grads, key, stddev=1.3 * clip, denominator=x.shape[0])
        return result, noised

    return jax.jit(run)


@pytest.mark.parametrize("dtype", [jnp.float64, pytest.param(jnp.float32, marks=pytest.mark.sample(3))])
@pytest.mark.parametrize(
    "name",
    # the per-example norms of mnist_cnn's weighted layers (convolutions, dense) are the other two models' too
    [pytest.param("mnist_cnn", marks=pytest.mark.slow), "strided-groupnorm", "conv_autoencoder"],
)
def test_ghost_gives_the_vmap_update(name, dtype):
    model, loss_fn, params, state, x, y = batch(name, 4, dtype)
    key = jax.random.key(3)
    huge = jnp.asarray(1e30, dtype)
    ones = jnp.ones((4,))
    unclipped, _ = clipped_and_noised(name, "vmap", dtype)(params, state, x, y, huge, key, ones)
    norms = np.sort(np.asarray(unclipped.norms))
    clip = jnp.asarray((norms[1] + norms[2]) / 2, dtype)  # two examples clipped, two not
    ghost, ghost_noised = clipped_and_noised(name, "ghost", dtype)(params, state, x, y, clip, key, ones)
    vmap, vmap_noised = clipped_and_noised(name, "vmap", dtype)(params, state, x, y, clip, key, ones)
    tol = TOLERANCE[dtype]
    assert relative_error(ghost.norms, vmap.norms) <= tol
    assert relative_error(ghost.losses, vmap.losses) <= tol
    assert relative_error(ghost.predictions, vmap.predictions) <= tol
    for part, (a, b) in {"clipped sum": (ghost.grads, vmap.grads), "update": (ghost_noised, vmap_noised)}.items():
        assert jax.tree.structure(a) == jax.tree.structure(params)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert u.dtype == dtype and relative_error(u, v) <= tol, part
    # the clipped sum really is clipped: its norm is at most the sum of the bounded norms
    total = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(ghost.grads)))
    assert total <= float(np.sum(np.minimum(norms, float(clip)))) * (1 + 1e-6)


def test_the_ghost_and_vmap_steps_take_the_same_step():
    # the step's wiring: keys, noise, mean, optimizer, metrics (the clipped sums are compared above)
    model = nn.Sequential([nn.Conv2D(3, 3, stride=2), nn.GroupNorm(3), nn.ReLU(), nn.Flatten(), nn.Dense(4)])
    optimizer = optax.adam(1e-2)
    x, y = normal(1, (4, 6, 6, 2)), jnp.arange(4) % 4
    states = {}
    for method in ("ghost", "vmap"):
        state = create_train_state(model, optimizer, jax.random.key(0), (6, 6, 2), dtype=jnp.float64)
        step = parallel.make_dp_train_step(model, optimizer, l2_norm_clip=0.5, noise_multiplier=1.1, method=method)
        for _ in range(2):
            state, metrics = step(state, x, y)
        states[method] = (state, metrics)
    (ghost, gm), (vmap, vm) = states["ghost"], states["vmap"]
    assert set(gm) == {"loss", "count", "grad_norm", "clipped", "accuracy"} and int(ghost.step) == 2
    for a, b in zip(jax.tree.leaves(ghost.params), jax.tree.leaves(vmap.params), strict=True):
        assert relative_error(a, b) <= 1e-10
    for metric in gm:
        assert relative_error(gm[metric], vm[metric]) <= 1e-10, metric


def test_dropout_draws_from_the_batch_key_and_clips_each_example_of_that_forward():
    model = nn.Sequential([nn.Conv2D(4, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Dense(3)])
    params, state = random_variables(model, (5, 5, 2), seed=9)
    x, y, key = normal(10, (4, 5, 5, 2)), jnp.arange(4) % 3, jax.random.key(11)

    def example_grad(i):  # example i's loss in the batch forward with the step's key (the same masks)
        def loss(p):
            out = model.apply(p, state, x, train=True, key=key)[0]
            return F.softmax_cross_entropy(
                jax.lax.dynamic_slice_in_dim(out, i, 1), jax.lax.dynamic_slice_in_dim(y, i, 1)
            )

        return jax.grad(loss)(params)

    stacked = jax.jit(jax.vmap(example_grad))(jnp.arange(4))
    grads = [jax.tree.map(lambda g, i=i: g[i], stacked) for i in range(4)]
    norms = np.asarray([np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(t))) for t in grads])
    clip = float(np.median(norms))
    factors = np.minimum(1.0, clip / norms)
    expected = jax.tree.map(lambda *gs: sum(f * g for f, g in zip(factors, gs, strict=True)), *grads)
    ghost = jax.jit(functools.partial(dp.clipped_grad_sum, model, F.softmax_cross_entropy))
    got = ghost(params, state, x, y, l2_norm_clip=clip, key=key)
    np.testing.assert_allclose(got.norms, norms, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(got.grads), jax.tree.leaves(expected), strict=True):
        assert relative_error(a, b) <= 1e-10


def test_a_masked_example_contributes_nothing():
    # S(all) = S(without example 1) + S(example 1 alone): a mask drops exactly the masked example's clipped gradient
    model, loss_fn, params, state, x, y = batch("strided-groupnorm", 4)
    run = clipped_and_noised("strided-groupnorm", "ghost", jnp.float64)
    clip, key = jnp.asarray(0.3), jax.random.key(0)
    parts = [
        run(params, state, x, y, clip, key, jnp.asarray([float(c) for c in m]))[0] for m in ("1111", "1011", "0100")
    ]
    whole, without, alone = parts
    for a, b, c in zip(*(jax.tree.leaves(p.grads) for p in parts), strict=True):
        assert relative_error(b + c, a) <= 1e-12 and float(jnp.max(jnp.abs(c))) > 0
    metrics = dp._dp_metrics(without, y, 0.3, jnp.asarray([1, 0, 1, 1]))
    assert int(metrics["count"]) == 3
    np.testing.assert_allclose(metrics["loss"], np.mean(np.asarray(whole.losses)[[0, 2, 3]]), rtol=1e-12)


def test_the_noise_has_the_stated_size_and_a_fresh_draw_each_step():
    model = nn.Sequential([nn.Flatten(), nn.Dense(64, use_bias=False)])  # 20,480 weights
    optimizer = optax.sgd(1.0)
    state = create_train_state(model, optimizer, jax.random.key(0), (320,), dtype=jnp.float64)
    state = state.replace(params=jax.tree.map(jnp.zeros_like, state.params))
    x, y = jnp.zeros((4, 320)), jnp.zeros((4,), jnp.int32)  # zero input: every gradient is zero
    step = dp.make_dp_train_step(model, optimizer, l2_norm_clip=2.0, noise_multiplier=1.5)
    first, _ = step(state, x, y)
    first_w = np.asarray(first.params["Dense_0"]["kernel"])
    second, _ = step(first, x, y)
    # 20,480 draws: the sample standard deviation is good to about 0.5%; the update is -(noise / N)
    assert np.std(first_w) == pytest.approx(2.0 * 1.5 / 4, rel=0.02)
    assert not np.allclose(np.asarray(second.params["Dense_0"]["kernel"]) - first_w, first_w)


# -- refusals -------------------------------------------------------------------------------------------------


class Scale(nn.Layer):
    """A layer with a parameter and a backward but no per-example norm rule."""

    def init(self, key, input_shape, *, dtype=jnp.float32):
        return {"s": jnp.ones((), dtype)}, {}

    def forward(self, params, x):
        return x * params["s"], x

    def backward(self, params, residuals, dy):
        return dy * params["s"], {"s": jnp.sum(dy * residuals)}


def test_refusals_are_one_line():
    model = nn.Sequential([nn.Flatten(), Scale(), nn.Dense(2)])
    params, state = model.init(jax.random.key(0), (3,), dtype=jnp.float64)
    x, y = normal(1, (2, 3)), jnp.asarray([0, 1])
    with pytest.raises(ValueError, match=r"Scale_0 \(Scale\) has parameters but no per_example_sq_norms") as error:
        dp.clipped_grad_sum(model, F.softmax_cross_entropy, params, state, x, y, l2_norm_clip=1.0)
    assert "\n" not in str(error.value) and "method='vmap'" in str(error.value)
    # the vmap method takes that model (autodiff through its forward)
    vmap = dp.clipped_grad_sum(model, F.softmax_cross_entropy, params, state, x, y, l2_norm_clip=1.0, method="vmap")
    assert vmap.norms.shape == (2,)
    bn = nn.Sequential([nn.Conv2D(2, 3), nn.BatchNorm(), nn.Flatten(), nn.Dense(2)])
    bn_params, bn_state = bn.init(jax.random.key(0), (4, 4, 1))
    with pytest.raises(ValueError, match="BatchNorm"):
        dp.clipped_grad_sum(
            bn, F.softmax_cross_entropy, bn_params, bn_state, normal(1, (2, 4, 4, 1)), y, l2_norm_clip=1
        )
    bad = [
        (dict(l2_norm_clip=0.0, noise_multiplier=1.0), "l2_norm_clip"),
        (dict(l2_norm_clip=float("inf"), noise_multiplier=1.0), "l2_norm_clip"),
        (dict(l2_norm_clip=1.0, noise_multiplier=-0.1), "noise_multiplier"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1.0, method="opacus"), "unknown DP method"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1.0, gradients="autodiff"), "method='ghost' runs the hand"),
        (dict(l2_norm_clip=1.0, noise_multiplier=1.0, batch_size=0), "batch_size"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message) as error:
            dp.make_dp_train_step(model, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="needs both"):
        parallel.make_dp_train_step(model, optax.sgd(1.0), l2_norm_clip=1.0)


def test_a_state_with_another_optimizer_is_refused():
    model = nn.Sequential([nn.Flatten(), nn.Dense(2)])
    wrapped = parallel.dp_optimizer(optax.sgd(1.0), l2_norm_clip=1.0, noise_multiplier=1.0, key=jax.random.key(0))
    state = create_train_state(model, wrapped, jax.random.key(0), (3,))
    step = dp.make_dp_train_step(model, optax.sgd(1.0), l2_norm_clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="another optimizer"):
        step(state, jnp.zeros((2, 3)), jnp.asarray([0, 1]))
