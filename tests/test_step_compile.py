"""jaxcnn's train steps on XLA:CPU: float32/bfloat16 steps compile with YNNPACK's fusions limited to dots and
reductions (jaxcnn._xla_flags.STEP_COMPILER_OPTIONS, the flag study's winner), float64 steps with XLA's defaults;
JAXCNN_XLA_CPU_FLAGS, XLA_FLAGS and --no-xla-cpu-flags turn it off (jaxcnn._step_jit)."""

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import unset_env
from jaxcnn import _step_jit, _xla_flags, nn, train
from jaxcnn.functional import conv
from jaxcnn.train.step import StepOptions, train_step_function

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the compile option is XLA:CPU's")
# this process's backend started with the YNNPACK flag in XLA_FLAGS (JAXCNN_XLA_CPU_FLAGS=recommended, or the
# user's own): then every program has it, and plain jits cannot show XLA's defaults
STARTED_WITH_THE_FLAG = _xla_flags.YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", "")

INPUT = (12, 12, 16)


def _model() -> nn.Sequential:
    # convolutions big enough that XLA:CPU's defaults hand them to YNNPACK
    return nn.Sequential([nn.Conv2D(32, 5, padding="SAME"), nn.ReLU(), nn.Flatten(), nn.Dense(3)])


@pytest.fixture
def default_flags(monkeypatch):
    """The default setting: JAXCNN_XLA_CPU_FLAGS unset, no XLA_FLAGS naming YNNPACK's fusions."""
    unset_env(monkeypatch, _xla_flags.ENV, "XLA_FLAGS", "JAXCNN_DW_METHOD")
    return monkeypatch


def _state_and_batch(dtype):
    model = _model()
    state = train.create_train_state(model, optax.sgd(0.05, 0.9), jax.random.key(0), INPUT)
    state = state.replace(params=jax.tree.map(lambda a: a.astype(dtype), state.params))
    x = jax.random.normal(jax.random.key(1), (16, *INPUT), dtype)
    y = jnp.arange(16, dtype=jnp.int32) % 3
    return model, state, x, y


def ynn_fused_convolutions(hlo: str) -> int:
    """How many of the compiled program's YNNPACK fusions hold a convolution."""
    bodies = dict(re.findall(r"^%?(\S+) \([^\n]*\{\n(.*?)\n\}", hlo, flags=re.M | re.S))
    called = re.findall(r"fusion\([^\n]*calls=%?([\w.\-]+)[^\n]*\"__ynn_fusion\"", hlo)
    return sum(" convolution(" in bodies.get(name, "") for name in called)


@pytest.mark.skipif(STARTED_WITH_THE_FLAG, reason="the backend runs every program under the flag")
def test_float32_steps_keep_convolutions_out_of_ynnpack_and_float64_steps_do_not(default_flags):
    model, state, x, y = _state_and_batch(jnp.float32)
    step = train.make_train_step(model, gradients="manual")
    assert isinstance(step, _step_jit.ScopedStep) and step.pick(state, x, y) is step.tuned
    tuned = step.lower(state, x, y).compile().as_text()
    plain = jax.jit(train_step_function(model, StepOptions(gradients="manual"))).lower(state, x, y)
    assert ynn_fused_convolutions(tuned) == 0 < ynn_fused_convolutions(plain.compile().as_text())
    assert tuned.count(" convolution(") == 2  # forward, and dw as one convolution (no dx for the input layer)

    _, wide, x64, y64 = _state_and_batch(jnp.float64)
    assert step.pick(wide, x64, y64) is step.plain
    assert step.pick(state, x64, y) is step.plain  # any float64 array takes XLA's defaults
    assert ynn_fused_convolutions(step.lower(wide, x64, y64).compile().as_text()) > 0


@pytest.mark.parametrize("gradients", ["manual", pytest.param("autodiff", marks=pytest.mark.slow)])
def test_a_scoped_step_trains_as_the_plain_step_does(default_flags, gradients):
    """Same parameters as the same step compiled with XLA's defaults, to float32 round-off, over 3 steps."""
    model, state, x, y = _state_and_batch(jnp.float32)
    step = train.make_train_step(model, gradients=gradients)
    plain = jax.jit(train_step_function(model, StepOptions(gradients=gradients)))
    a = b = state
    for _ in range(3):
        b, metrics_b = plain(b, x, y)  # first: the scoped step donates its state
        a, metrics_a = step(a, x, y)
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
    for leaf_a, leaf_b in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(leaf_a, leaf_b, rtol=2e-4, atol=2e-6)


def test_float64_steps_give_the_bits_of_a_plain_jit(default_flags):
    model, state, x, y = _state_and_batch(jnp.float64)
    step = train.make_train_step(model, gradients="manual")
    plain = jax.jit(train_step_function(model, StepOptions(gradients="manual")))
    (b, _), (a, _) = plain(state, x, y), step(state, x, y)  # plain first: the step donates its state
    for leaf_a, leaf_b in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(leaf_a, leaf_b)


@pytest.mark.parametrize(
    "setting,xla_flags,scoped",
    [
        (None, "", True),
        ("steps", "", True),
        ("", "", False),
        ("off", "", False),
        ("recommended", "--xla_cpu_experimental_ynn_fusion_type=dot,reduce", False),  # process-wide, at import
        ("recommended", "", True),  # too late for XLA_FLAGS (a backend had started): per compile still
        ("OFF", "", False),
        ("--xla_cpu_use_fusion_emitters=false", "", False),
        (None, "--xla_cpu_experimental_ynn_fusion_type=reduce", False),  # the user's own setting wins
        (None, "--xla_force_host_platform_device_count=2", True),
    ],
)
def test_who_turns_the_step_options_on_and_off(default_flags, setting, xla_flags, scoped):
    if setting is not None:
        default_flags.setenv(_xla_flags.ENV, setting)
    if xla_flags:
        default_flags.setenv("XLA_FLAGS", xla_flags)
    assert _xla_flags.steps_scoped() is scoped
    assert (_step_jit.step_compiler_options() == _xla_flags.STEP_COMPILER_OPTIONS) is scoped
    step = train.make_train_step(_model())
    assert isinstance(step, _step_jit.ScopedStep) is scoped


def test_no_xla_cpu_flags_turns_the_step_options_off(default_flags):
    default_flags.setattr(_xla_flags, "_state", {"original": None, "added": ""})
    assert _xla_flags.revert()
    assert _xla_flags.steps_scoped() is False and _step_jit.step_compiler_options() is None


def test_dw_auto_is_one_convolution_while_a_scoped_step_traces(default_flags):
    assert conv.dw_method_for("cpu") == "taps"
    with _xla_flags.tracing_scoped_step():
        assert conv.dw_method_for("cpu") == "conv" and _xla_flags.ynn_convolutions_off()
        assert not _xla_flags.ynn_convolutions_off("")  # explicit flags are judged as given
    assert conv.dw_method_for("cpu") == "taps"


def test_a_jaxlib_that_refuses_the_option_compiles_with_defaults_and_says_so(default_flags):
    default_flags.setattr(_xla_flags, "STEP_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    _step_jit._options_accepted.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="refuses the train steps' compile option"):
            assert _step_jit.step_compiler_options() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per process
            step = train.make_train_step(_model())
        assert not isinstance(step, _step_jit.ScopedStep)
    finally:
        _step_jit._options_accepted.cache_clear()


def test_every_train_step_maker_is_scoped(default_flags):
    from jaxcnn import parallel
    from jaxcnn.train import dp, ensemble

    model = _model()
    assert isinstance(train.make_train_step(model, gradients="manual", steps_per_call=2), _step_jit.ScopedStep)
    assert isinstance(dp.make_dp_train_step(model, l2_norm_clip=1.0, noise_multiplier=1.0), _step_jit.ScopedStep)
    assert isinstance(ensemble.make_ensemble_train_step(model), _step_jit.ScopedStep)
    assert isinstance(parallel.make_dp_train_step(model, l2_norm_clip=1.0), _step_jit.ScopedStep)


def test_has_float64_looks_at_every_array_leaf():
    """(In 64-bit mode, as the suite runs; without it jit makes float64 float32, and nothing counts.)"""
    assert not _step_jit.has_float64((jnp.ones(2, jnp.float32), jax.random.key(0), np.int64(3), {"a": 1.0}))
    assert _step_jit.has_float64({"a": [jnp.ones(2, jnp.float32), np.ones(2)]})
    assert _step_jit.has_float64(np.complex128(1))


def test_without_64_bit_mode_float64_numpy_batches_take_the_tuned_step():
    with jax.enable_x64(False):
        assert not _step_jit.has_float64(np.ones(3))


def test_a_scoped_step_traces_and_copies_as_a_jitted_function_does(default_flags):
    import copy

    model, state, x, y = _state_and_batch(jnp.float32)
    step = train.make_train_step(model, gradients="manual")
    assert "conv" in str(step.trace(state, x, y).jaxpr) and step.eval_shape(state, x, y)[1]["loss"].shape == ()
    assert copy.copy(step).tuned is step.tuned
    step.clear_cache()
    assert step._cache_size() == 0
