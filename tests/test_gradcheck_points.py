"""The checker cannot be fooled by its starting point: rules that are right only at initial values (a scale at 1,
a bias at 0, an identity kernel) fail at the perturbed point, while correct models pass there over several seeds.
"""

import pathlib
import re
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import nn

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
PERTURBED = "perturbed(seed=0)"


def readme_swish_block() -> str:
    """The README's custom-layer block, up to (not including) its gradient check."""
    block = next(code for code in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "class Swish" in code)
    return block.split("report = ")[0]


def build_readme_swish(code: str):
    namespace = {"jax": jax, "jnp": jnp, "nn": nn, "jc": jc}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace["swish_model"], namespace["p"], namespace["s"], namespace["x12"]


RIGHT_DX = "dx = dy * (s + beta * x * s * (1 - s))"
WRONG_DX = "dx = dy * (s + x * s * (1 - s))"  # the README: "drop the `beta *` in `dx`"


@pytest.fixture(scope="module")
def readme_swish_reports():
    code = readme_swish_block()
    assert code.count(RIGHT_DX) == 1, "the README's Swish backward changed; update this test with it"
    y = jnp.array([0, 1, 2, 1])
    reports = {}
    # (the right one passes in test_readme.py, which runs the block as written)
    model, params, state, x = build_readme_swish(code.replace(RIGHT_DX, WRONG_DX))
    reports["wrong"] = jc.gradcheck.check_model(model, params, state, x, y)
    reports["wrong, given point only"] = jc.gradcheck.check_model(
        model, params, state, x, y, perturbations=0, finite_differences=False
    )
    return reports


def test_readme_wrong_swish_fails_on_its_input_rows(readme_swish_reports):
    """The README says: drop the `beta *` in `dx` and the check fails on the `Swish_*` `input` rows, and on every
    parameter below it in the model rows. beta starts at 1, where the wrong rule is right: only the perturbed
    point sees it."""
    report = readme_swish_reports["wrong"]
    assert not report.ok
    failed = {(c.scope, c.layer, c.quantity, c.method, c.point) for c in report.failures()}
    for layer in ("Swish_0", "Swish_1"):
        assert ("layer", layer, "input", "hand vs autodiff", PERTURBED) in failed
        assert ("layer", layer, "input", "hand vs finite diff", PERTURBED) in failed
    for layer, quantity in (("Conv_0", "kernel"), ("Conv_0", "bias"), ("Dense_0", "kernel"), ("Dense_0", "bias")):
        assert ("model", layer, quantity, "engine vs autodiff", PERTURBED) in failed
        assert ("model", layer, quantity, "manual vs autodiff", PERTURBED) in failed
    # the Swish layers' own beta rows and the layers above them are right
    assert all(c.layer != "Dense_1" for c in report.failures())
    assert all(c.quantity != "beta" or c.scope == "model" for c in report.failures())
    # at the given point (beta = 1) the wrong rule gives the right numbers: what v0.1 saw
    assert all(c.ok for c in report.checks if c.point == "given")
    assert readme_swish_reports["wrong, given point only"].ok
    assert "FAIL" in report.table() and PERTURBED in report.table()


def test_every_row_is_made_at_both_points(readme_swish_reports):
    report = readme_swish_reports["wrong"]
    assert report.points == ["given", PERTURBED]
    given = [(c.scope, c.layer, c.quantity, c.method) for c in report.checks if c.point == "given"]
    perturbed = [(c.scope, c.layer, c.quantity, c.method) for c in report.checks if c.point == PERTURBED]
    assert given == perturbed and len(given) == 56


# -- planted rules that are right only at a special value ------------------------------------------------------


class ScaleResiduals(NamedTuple):
    x: jax.Array


def per_channel(v, x):
    """``v`` (C,) shaped to broadcast against ``x`` (..., C) (rank promotion is an error in the tests)."""
    return v.reshape((1,) * (x.ndim - 1) + v.shape)


@dataclass(frozen=True)
class ChannelScale(nn.Layer):
    """y = gamma * x per channel, gamma initialised to 1; ``wrong`` forgets gamma in dx (right only at gamma = 1)."""

    wrong: bool = False

    def init(self, key, input_shape, *, dtype=jnp.float32):
        return {"gamma": jnp.ones((input_shape[-1],), dtype)}, {}

    def forward(self, params, x):
        return per_channel(params["gamma"], x) * x, ScaleResiduals(x)

    def backward(self, params, residuals, dy):
        dx = dy if self.wrong else dy * per_channel(params["gamma"], dy)
        return dx, {"gamma": jnp.sum(dy * residuals.x, axis=tuple(range(dy.ndim - 1)))}


@dataclass(frozen=True)
class Gate(nn.Layer):
    """y = x * (1 + b * x) per feature, b initialised to 0: dx = dy (1 + 2 b x); ``wrong`` writes 1 - 2 b x (the
    wrong sign of a term multiplied by the bias, right only at b = 0)."""

    wrong: bool = False

    def init(self, key, input_shape, *, dtype=jnp.float32):
        return {"bias": jnp.zeros((input_shape[-1],), dtype)}, {}

    def forward(self, params, x):
        return x * (1 + per_channel(params["bias"], x) * x), ScaleResiduals(x)

    def backward(self, params, residuals, dy):
        x = residuals.x
        b = per_channel(params["bias"], x)
        sign = -1 if self.wrong else 1
        return dy * (1 + sign * 2 * b * x), {"bias": jnp.sum(dy * x * x, axis=tuple(range(dy.ndim - 1)))}


@dataclass(frozen=True)
class SquareMix(nn.Layer):
    """y = x @ W for square W initialised to the identity; ``wrong`` uses dx = dy @ W instead of dy @ W.T (right for
    any symmetric W, the identity among them)."""

    wrong: bool = False

    def init(self, key, input_shape, *, dtype=jnp.float32):
        return {"kernel": jnp.eye(input_shape[-1], dtype=dtype)}, {}

    def forward(self, params, x):
        return x @ params["kernel"], ScaleResiduals(x)

    def backward(self, params, residuals, dy):
        w = params["kernel"]
        dx = dy @ (w if self.wrong else w.T)
        return dx, {"kernel": residuals.x.reshape(-1, w.shape[0]).T @ dy.reshape(-1, w.shape[1])}


PLANTED = ("ChannelScale_0", "Gate_0", "SquareMix_0")


def planted_model(wrong: bool):
    """Each planted layer sees the output of the one before, so each is checked at its own (perturbed) input."""
    layers = [ChannelScale(wrong), Gate(wrong), SquareMix(wrong)]
    return nn.Sequential([nn.Conv2D(3, 3, padding="VALID"), nn.Tanh(), *layers, nn.Flatten(), nn.Dense(3)])


def planted_data(model, seed=0):
    params, state = model.init(jax.random.key(seed), (5, 5, 2))
    x = jax.random.normal(jax.random.key(seed + 1), (2, 5, 5, 2))
    return params, state, x, jnp.array([0, 2])


def test_rules_right_only_at_initial_values_are_caught():
    model = planted_model(wrong=True)
    params, state, x, y = planted_data(model)
    report = jc.gradcheck.check_model(model, params, state, x, y, finite_differences=False)
    assert not report.ok
    failed = {(c.layer, c.quantity, c.method, c.point) for c in report.failures()}
    for name in PLANTED:
        assert (name, "input", "hand vs autodiff", PERTURBED) in failed
    assert ("Conv_0", "kernel", "engine vs autodiff", PERTURBED) in failed
    assert {c.point for c in report.failures()} == {PERTURBED}
    # the given point alone (v0.1's check) is fooled
    assert jc.gradcheck.check_model(model, params, state, x, y, finite_differences=False, perturbations=0).ok


@pytest.mark.parametrize("seed", [pytest.param(0, marks=pytest.mark.slow), 1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_right_rules_pass_at_every_seed(seed):
    model = planted_model(wrong=False)
    params, state, x, y = planted_data(model, seed)
    report = jc.gradcheck.check_model(model, params, state, x, y, seed=seed, perturbations=2)
    assert report.ok, report.table()
    assert report.points == ["given", f"perturbed(seed={seed}, 1/2)", f"perturbed(seed={seed}, 2/2)"]


def swish(x, beta):
    return x * jax.nn.sigmoid(beta * x)


def swish_vjp_without_beta(x, beta, dy):
    s = jax.nn.sigmoid(beta * x)
    return dy * (s + x * s * (1 - s)), jnp.sum(dy * x * x * s * (1 - s))


def test_check_op_is_not_fooled_by_beta_one():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 5)))
    report = jc.gradcheck.check_op(swish, x, jnp.asarray(1.0), vjp=swish_vjp_without_beta)
    assert {(c.quantity, c.point) for c in report.failures()} == {("arg 0", PERTURBED)}
    assert jc.gradcheck.check_op(swish, x, jnp.asarray(1.0), vjp=swish_vjp_without_beta, perturbations=0).ok


# -- correct models, kinks and normalisation at the perturbed point ------------------------------------------


def kinked_model() -> nn.Sequential:
    """ReLU, max-pool, BatchNorm and a residual branch: kinks, ties and normalisation at the perturbed point."""
    # the conv's bias before the BatchNorm has a gradient of exactly zero: a "zero gradient" row (issue 18)
    block = nn.Sequential([nn.Conv2D(4, 3, padding=1), nn.BatchNorm(), nn.ReLU(), nn.Conv2D(4, 3, padding=1)])
    return nn.Sequential(
        [
            nn.Conv2D(4, 3, padding="SAME"),
            nn.ReLU(),
            nn.Residual(block),
            nn.MaxPool2D(2),
            nn.LayerNorm(),
            nn.Flatten(),
            nn.Dense(5),
            nn.LeakyReLU(0.1),
            nn.Dense(3),
        ]
    )


@pytest.mark.parametrize(
    "seed,dtype",
    [
        pytest.param(0, jnp.float64, marks=pytest.mark.slow),  # float64 at perturbed points: test_gradcheck.py
        (1, jnp.float32),
        pytest.param(2, jnp.float64, marks=pytest.mark.slow),
    ],
)
def test_correct_models_pass_at_perturbed_points(seed, dtype):
    model = kinked_model()
    params, state = model.init(jax.random.key(seed), (6, 6, 2))
    x = jax.random.normal(jax.random.key(seed + 10), (3, 6, 6, 2))
    x = x.at[:, :2].set(0.0)  # zero borders: pre-activations on ReLU kinks at the given point
    report = jc.gradcheck.check_model(model, params, state, x, jnp.array([0, 1, 2]), seed=seed, dtype=dtype)
    assert report.ok, report.table()
    assert {c.point for c in report.checks} == {"given", f"perturbed(seed={seed})"}
    # float32: the engine's round-off on that bias (1e-7) is held to the exact rows' floor, not the fd's 1e-9
    zero = {(c.layer, c.quantity, c.method) for c in report.checks if c.note == "zero gradient"}
    assert zero == {("Residual_0/block/Conv_0", "bias", "engine vs finite diff")}


def test_perturbations_must_be_a_non_negative_int():
    model = planted_model(wrong=False)
    params, state, x, y = planted_data(model)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="`perturbations` must be a non-negative int"):
            jc.gradcheck.check_model(model, params, state, x, y, perturbations=bad)


def test_perturbed_points_are_seeded_and_move_every_parameter():
    model = planted_model(wrong=False)
    params, state, x, y = planted_data(model)
    a = jc.gradcheck.check_model(model, params, state, x, y, seed=3, finite_differences=False, layers=False)
    b = jc.gradcheck.check_model(model, params, state, x, y, seed=3, finite_differences=False, layers=False)
    c = jc.gradcheck.check_model(model, params, state, x, y, seed=4, finite_differences=False, layers=False)
    assert [r.max_abs for r in a.checks] == [r.max_abs for r in b.checks]
    assert [r.max_abs for r in a.checks] != [r.max_abs for r in c.checks]
    from jaxcnn.gradcheck.numerics import add_noise, perturbation

    moved = add_noise(params, perturbation(params, (0, 1)))
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(moved), strict=True):
        assert np.all(np.asarray(before) != np.asarray(after))  # the zero bias too


def test_restricted_domain_ops_shrink_the_perturbation():
    """An op defined only for positive inputs: the perturbed point is pulled back until the op is finite."""
    log_vjp = lambda x, dy: dy / x
    x = jnp.asarray(np.random.default_rng(0).uniform(0.05, 0.2, (6,)))
    report = jc.gradcheck.check_op(jnp.log, x, vjp=log_vjp)
    assert report.ok, report.table()
    assert len(report.checks) == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "conv_autoencoder", "resnet20_cifar"])
def test_registered_models_pass_at_the_perturbed_point(name, capsys):
    from jaxcnn import cli

    code = cli.main(["gradcheck", "--model", name, "--batch-size", "2", "--failures-only"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[-2].endswith("rows checked, 0 failed")
