"""jaxcnn.alternatives: the ES, forward-gradient and SPSA estimators are unbiased on a quadratic, with the
variance their derivations predict; the estimator train step trains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn import alternatives, nn
from jaxcnn.train import create_train_state

RNG = np.random.default_rng(0)
A = RNG.standard_normal((7, 7))
A = jnp.asarray(A @ A.T / 7 + np.eye(7))  # symmetric positive definite
B = jnp.asarray(RNG.standard_normal(7))
PARAMS = {"u": jnp.asarray(RNG.standard_normal(3)), "v": jnp.asarray(RNG.standard_normal((2, 2)))}


def quadratic(params):
    theta = jnp.concatenate([params["u"], params["v"].reshape(-1)])
    return 0.5 * theta @ A @ theta + B @ theta


def flat(tree):
    return np.concatenate([np.asarray(tree["u"]), np.asarray(tree["v"]).reshape(-1)])


GRADIENT = flat(jax.grad(quadratic)(PARAMS))
NORM2 = float(GRADIENT @ GRADIENT)

# method -> (estimator call, per-component variance of one estimate)
SAMPLES = 4
CASES = {
    "es": (
        lambda key: alternatives.evolution_strategies_grad(quadratic, PARAMS, key, population=SAMPLES, sigma=0.3),
        (GRADIENT**2 + NORM2) / SAMPLES,
    ),
    "forward": (
        lambda key: alternatives.forward_grad(quadratic, PARAMS, key, directions=SAMPLES),
        (GRADIENT**2 + NORM2) / SAMPLES,
    ),
    "spsa": (
        lambda key: alternatives.spsa_grad(quadratic, PARAMS, key, samples=SAMPLES, c=0.3),
        (NORM2 - GRADIENT**2) / SAMPLES,
    ),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_estimators_are_unbiased_on_a_quadratic_within_their_known_variance(method):
    estimate, variance = CASES[method]
    draws = 20000
    estimates = jax.jit(jax.vmap(lambda k: flat_jax(estimate(k))))(jax.random.split(jax.random.key(1), draws))
    estimates = np.asarray(estimates)
    mean = estimates.mean(axis=0)
    standard_error = np.sqrt(variance / draws)
    assert np.all(np.abs(mean - GRADIENT) <= 5 * standard_error), (mean - GRADIENT) / standard_error
    # the empirical variance is the derived one (a 20,000-draw variance is good to a few percent)
    np.testing.assert_allclose(estimates.var(axis=0), variance, rtol=0.1)


def flat_jax(tree):
    return jnp.concatenate([tree["u"], tree["v"].reshape(-1)])


def test_backprop_is_the_exact_gradient_and_options_are_checked():
    np.testing.assert_allclose(flat(alternatives.backprop_grad(quadratic, PARAMS)), GRADIENT, rtol=1e-12)
    with pytest.raises(ValueError, match="population must be an int >= 1"):
        alternatives.evolution_strategies_grad(quadratic, PARAMS, jax.random.key(0), population=0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        alternatives.evolution_strategies_grad(quadratic, PARAMS, jax.random.key(0), sigma=-1.0)
    with pytest.raises(ValueError, match="c must be a finite number > 0"):
        alternatives.spsa_grad(quadratic, PARAMS, jax.random.key(0), c=0)
    assert alternatives.evaluations_per_step("es", population=8) == 16
    assert alternatives.evaluations_per_step("forward", directions=3) == 3
    assert alternatives.evaluations_per_step("spsa") == 2
    with pytest.raises(ValueError, match="unknown method 'adjoint'"):
        alternatives.evaluations_per_step("adjoint")


@pytest.mark.sample(2)
@pytest.mark.parametrize("method", ["es", "forward", "spsa", "backprop"])
def test_the_estimator_step_lowers_the_loss(method):
    with jax.enable_x64(False):
        model = nn.Sequential([nn.Conv2D(3, 3, padding="VALID"), nn.ReLU(), nn.Flatten(), nn.Dense(2)])
        optimizer = optax.adam(0.01)
        state = create_train_state(model, optimizer, jax.random.key(0), (5, 5, 1))
        x = jax.random.normal(jax.random.key(1), (32, 5, 5, 1))
        y = (x.sum(axis=(1, 2, 3)) > 0).astype(jnp.int32)
        options = {"es": {"population": 32}, "forward": {"directions": 8}, "spsa": {"samples": 16}}.get(method, {})
        step = alternatives.make_estimator_train_step(model, method, **options)
        losses = []
        for _ in range(40):
            state, metrics = step(state, x, y)
            losses.append(float(metrics["loss"]))
        assert int(metrics["evaluations"]) == alternatives.evaluations_per_step(method, **options)
        assert np.mean(losses[-5:]) < 0.9 * losses[0], losses
    with pytest.raises(ValueError, match="takes options"):
        alternatives.make_estimator_train_step(model, "forward", population=3)
