"""The Elman RNN's hand-derived backpropagation through time, checked three ways like every other rule: against
jax.vjp of its forward (float64 to 1e-10, float32), table-driven over shapes, and against central finite
differences on a sample (gradcheck.check_op)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPES, TOLERANCE, normal, relative_error
from jaxcnn import gradcheck
from jaxcnn.functional import elman_rnn, elman_rnn_vjp
from jaxcnn.functional._registry import hand_rule

# (N, T, D, H, bias): a single step, long sequences, one unit, wide and narrow layers
CASES = [
    (1, 1, 1, 1, True),
    (2, 1, 3, 4, False),
    (3, 5, 2, 3, True),
    (1, 12, 4, 2, True),
    (4, 8, 8, 5, False),
    (2, 30, 3, 6, True),
    pytest.param((5, 3, 1, 7, True), marks=pytest.mark.slow),
    pytest.param((2, 6, 10, 1, False), marks=pytest.mark.slow),
]


def arguments(case, dtype, seed=0):
    n, steps, d, hidden, bias = case
    x = normal(seed, (n, steps, d), dtype)
    h0 = 0.5 * normal(seed + 1, (n, hidden), dtype)
    w_x = normal(seed + 2, (d, hidden), dtype) / float(np.sqrt(d))
    w_h = 0.9 * normal(seed + 3, (hidden, hidden), dtype) / float(np.sqrt(hidden))
    b = 0.1 * normal(seed + 4, (hidden,), dtype) if bias else None
    return x, h0, w_x, w_h, b


def reference_forward(x, h0, w_x, w_h, b):
    """A Python loop over time steps: the definition, written independently of the scan."""
    h, out = h0, []
    for t in range(x.shape[1]):
        a = x[:, t] @ w_x + h @ w_h + (0 if b is None else b[None])
        h = jnp.tanh(a)
        out.append(h)
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_the_unrolled_loop(case):
    args = arguments(case, jnp.float64)
    np.testing.assert_allclose(elman_rnn(*args), reference_forward(*args), rtol=1e-12, atol=1e-13)


@pytest.mark.sample(3)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_bptt_matches_autodiff(case, dtype):
    x, h0, w_x, w_h, b = arguments(case, dtype, seed=sum(case[:4]))
    dhs = normal(99, (case[0], case[1], case[3]), dtype)
    present = (x, h0, w_x, w_h) + (() if b is None else (b,))
    _, pullback = jax.vjp(lambda *a: elman_rnn(*a), *present)
    expected = pullback(dhs)
    hand = elman_rnn_vjp(x, h0, w_x, w_h, b, dhs)
    assert (hand[4] is None) == (b is None)
    hand = hand[: len(present)]
    for name, got, want in zip(("dx", "dh0", "dw_x", "dw_h", "db")[: len(present)], hand, expected, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        error = relative_error(got, want)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e}"


@pytest.mark.sample(2)
@pytest.mark.parametrize("case", CASES[2:6])
def test_bptt_against_finite_differences(case):
    args = arguments(case, jnp.float64, seed=7)
    report = gradcheck.check_op(elman_rnn, *args)
    assert report.ok, report.table()


def test_the_weight_gradient_is_a_sum_over_time():
    """dw_h is the sum of one term per step: running the rule on each step's cotangent alone and adding the
    results gives the same matrix (the structure a convolution has over positions, an RNN has over time)."""
    x, h0, w_x, w_h, b = arguments((2, 6, 3, 4, True), jnp.float64)
    dhs = normal(5, (2, 6, 4))
    total = elman_rnn_vjp(x, h0, w_x, w_h, b, dhs)[3]
    parts = [elman_rnn_vjp(x, h0, w_x, w_h, b, dhs * (jnp.arange(6) == t)[None, :, None])[3] for t in range(6)]
    np.testing.assert_allclose(sum(parts), total, rtol=1e-12, atol=1e-14)


def test_registered_rule_and_bad_shapes():
    rule = hand_rule(elman_rnn)
    assert rule.differentiable == (0, 1, 2, 3, 4)
    x, h0, w_x, w_h, _ = arguments((2, 3, 4, 5, False), jnp.float64)
    with pytest.raises(ValueError, match=r"`w_h` must have shape \(5, 5\)"):
        elman_rnn(x, h0, w_x, w_h[:4])
    with pytest.raises(ValueError, match=r"`x` must have shape \(N, T, D\)"):
        elman_rnn(x[0], h0, w_x, w_h)
    with pytest.raises(ValueError, match=r"`dy` must have shape \(2, 3, 5\)"):
        elman_rnn_vjp(x, h0, w_x, w_h, None, jnp.zeros((2, 3, 4)))
