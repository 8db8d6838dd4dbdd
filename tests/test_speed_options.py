"""The train step's speed and memory options: mixed precision, remat, several steps per call (lax.scan).

Each option must leave the arithmetic it promises: bf16 compute with float32 master weights and loss, remat
with the same gradients, K scanned steps with the same parameters as K calls. Speed itself is measured in
benchmarks (``jaxcnn bench``), never asserted here.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn import bench, cli, nn, train
from jaxcnn.train.step import ScanOnCPUWarning, compute_dtype, loss_and_grads_fn, scan_is_slow

# a small model with every kind of state and parameter the options must carry: conv, BatchNorm, a residual
MODEL = nn.Sequential(
    [
        nn.Conv2D(4, 3, padding="SAME"),
        nn.BatchNorm(),
        nn.ReLU(),
        nn.Residual(nn.Sequential([nn.Conv2D(4, 3, padding="SAME"), nn.BatchNorm(), nn.ReLU()])),
        nn.AvgPool2D(2),
        nn.Flatten(),
        nn.Dense(10),
    ]
)
SHAPE = (8, 8, 1)
MODES = ("autodiff", "manual", "engine")


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, *SHAPE)), jnp.float32), jnp.asarray(rng.integers(0, 10, n), jnp.int32)


def _state():
    return train.create_train_state(MODEL, optax.sgd(0.1, 0.9), jax.random.key(0), SHAPE, dtype=jnp.float32)


def _params_equal(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)


@pytest.mark.sample(2)
@pytest.mark.parametrize("gradients", MODES)
def test_bfloat16_computes_in_bf16_and_keeps_float32_weights_loss_and_state(gradients):
    params, model_state = MODEL.init(jax.random.key(0), SHAPE, dtype=jnp.float32)
    x, y = _batch()
    key = jax.random.key(1)
    from jaxcnn.functional import softmax_cross_entropy

    low = loss_and_grads_fn(MODEL, softmax_cross_entropy, gradients, dtype="bfloat16")
    high = loss_and_grads_fn(MODEL, softmax_cross_entropy, gradients)
    loss, predictions, new_state, grads = jax.jit(low)(params, model_state, x, y, key)
    loss32, _, state32, grads32 = jax.jit(high)(params, model_state, x, y, key)
    assert loss.dtype == jnp.float32 and predictions.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(new_state))
    # bf16 keeps 8 bits of mantissa: the loss agrees with float32 to about 1e-2, and each gradient to a few
    # per cent of the gradient's norm (BatchNorm's backward over a batch of 8 amplifies the rounding; a conv bias
    # before a BatchNorm has a true gradient of 0, which bf16 rounds to noise of that size)
    assert abs(float(loss) - float(loss32)) < 2e-2 * abs(float(loss32))
    scale = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads32))))
    for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32), strict=True):
        assert float(jnp.linalg.norm(g - g32)) <= 0.05 * scale
    _params_equal(new_state, state32, 2e-2)
    # the convolutions really run in bf16
    convs = _equations(jax.make_jaxpr(low)(params, model_state, x, y, key).jaxpr, "conv_general_dilated")
    assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)


def _equations(jaxpr, primitive):
    """Every equation of ``primitive`` in a jaxpr, inner jaxprs (jit, custom_vjp, ...) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn)
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _equations(inner, primitive)
    return found


def test_bfloat16_manual_engine_and_autodiff_agree_with_each_other():
    state = _state()
    x, y = _batch()
    ends = {}
    for gradients in MODES:
        step = train.make_train_step(MODEL, gradients=gradients, dtype="bfloat16")
        current = jax.tree.map(jnp.copy, state)
        for _ in range(3):
            current, metrics = step(current, x, y)
        assert metrics["loss"].dtype == jnp.float32
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(current.params))
        ends[gradients] = current.params
    # bf16 keeps 8 bits of mantissa, and the hand rules and autodiff round at other points; three steps carry that
    _params_equal(ends["manual"], ends["autodiff"], 2e-2)
    _params_equal(ends["engine"], ends["manual"], 1e-6)  # the same hand rules, the same bf16 arithmetic


@pytest.mark.parametrize("bad", ["int32", "nope", 3])
def test_compute_dtype_rejects_what_is_not_a_float(bad):
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        compute_dtype(bad)
    assert compute_dtype(None) is None and compute_dtype("bfloat16") == jnp.bfloat16


@pytest.mark.parametrize("gradients", ["autodiff", "manual"])
def test_remat_gives_the_same_steps(gradients):
    state = _state()
    x, y = _batch()
    ends = {}
    for remat in (False, True):
        step = train.make_train_step(MODEL, gradients=gradients, remat=remat)
        current = jax.tree.map(jnp.copy, state)
        for _ in range(2):
            current, _ = step(current, x, y)
        ends[remat] = current
    # float32, two steps: the recomputing step is another compiled program, which may round otherwise
    _params_equal(ends[True].params, ends[False].params, 1e-6)
    _params_equal(ends[True].model_state, ends[False].model_state, 1e-6)


def test_remat_recomputes_each_blocks_forward_in_the_backward_pass():
    """The remat step's program holds each block's forward twice (once more, behind an optimization barrier, in
    the backward pass) and the plain step's once. Whether that saves memory is the backend's scheduling: on
    XLA:CPU (jaxlib 0.10) the compiled temp size is the same with and without remat, as its scheduler runs the
    recomputation early; the test once compared temp sizes and passed only on a 34 KB accident of the per-tap
    weight-gradient formulation."""
    model = nn.Sequential([nn.Sequential([nn.Conv2D(8, 3, padding="SAME"), nn.Tanh()]) for _ in range(8)] + [
        nn.GlobalAvgPool2D(), nn.Dense(10)])  # fmt: skip
    state = train.create_train_state(model, optax.sgd(0.1), jax.random.key(0), (16, 16, 8), dtype=jnp.float32)
    x, y = jnp.ones((16, 16, 16, 8), jnp.float32), jnp.zeros((16,), jnp.int32)
    for gradients in ("manual", "autodiff"):
        text = {
            remat: train.make_train_step(model, gradients=gradients, remat=remat).lower(state, x, y).as_text()
            for remat in (False, True)
        }
        convolutions = {remat: t.count("stablehlo.convolution") for remat, t in text.items()}
        assert convolutions[True] == convolutions[False] + 8  # the 8 blocks' forward convolutions, again
        assert "optimization_barrier" in text[True] and "optimization_barrier" not in text[False]


def test_remat_errors_name_the_problem():
    with pytest.raises(ValueError, match="remat works with gradients='autodiff' or 'manual'"):
        train.make_train_step(MODEL, gradients="engine", remat=True)
    with pytest.raises(ValueError, match="remat checkpoints a container's children; Dense has none"):
        train.make_train_step(nn.Dense(3), remat=True)
    with pytest.raises(ValueError, match="remat must be a bool"):
        MODEL.apply(*MODEL.init(jax.random.key(0), SHAPE), _batch()[0], remat="yes")


@pytest.mark.sample(2)
@pytest.mark.parametrize("gradients", MODES)
def test_steps_per_call_equals_that_many_calls(gradients):
    state = _state()
    xs = jnp.stack([_batch(seed=s)[0] for s in range(3)])
    ys = jnp.stack([_batch(seed=s)[1] for s in range(3)])
    one = train.make_train_step(MODEL, gradients=gradients)
    with warnings.catch_warnings():  # the CPU warning for autodiff is test_scanned_autodiff_warns_on_cpu's
        warnings.simplefilter("ignore", ScanOnCPUWarning)
        three = train.make_train_step(MODEL, gradients=gradients, steps_per_call=3)
    looped = jax.tree.map(jnp.copy, state)
    losses = []
    for k in range(3):
        looped, metrics = one(looped, xs[k], ys[k])
        losses.append(float(metrics["loss"]))
    scanned, metrics = three(jax.tree.map(jnp.copy, state), xs, ys)
    assert metrics["loss"].shape == (3,) and metrics["accuracy"].shape == (3,)
    # float32, three steps: the scanned steps are one compiled program, which may round otherwise than three calls
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=1e-5)
    assert int(scanned.step) == int(looped.step) == 3
    _params_equal(scanned.params, looped.params, 1e-5)


def test_scanned_autodiff_warns_on_cpu():
    # XLA:CPU leaves autodiff's transposed convolutions inside a while loop on a naive kernel (~30x slower)
    assert scan_is_slow("autodiff", "cpu") and not scan_is_slow("manual", "cpu")
    assert not scan_is_slow("autodiff", "gpu") and not scan_is_slow("engine", "cpu")
    if jax.default_backend() != "cpu":
        pytest.skip("the warning is for XLA:CPU")
    with pytest.warns(ScanOnCPUWarning, match="steps_per_call > 1 with autodiff gradients .* XLA:CPU .*RESULTS.md"):
        train.make_train_step(MODEL, steps_per_call=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScanOnCPUWarning)
        train.make_train_step(MODEL, gradients="manual", steps_per_call=2)
        train.make_train_step(MODEL, steps_per_call=1)


def test_bench_notes_scan_on_cpu(capsys):
    from jaxcnn._cli_tools import _note_scan_on_cpu

    _note_scan_on_cpu(1)
    assert capsys.readouterr().err == ""
    _note_scan_on_cpu(10)
    expected = "note: steps_per_call > 1 with autodiff" if jax.default_backend() == "cpu" else ""
    assert capsys.readouterr().err.startswith(expected)


def test_steps_per_call_errors():
    state = _state()
    with pytest.raises(ValueError, match="steps_per_call must be an int >= 1, got 0"):
        train.make_train_step(MODEL, steps_per_call=0)
    three = train.make_train_step(MODEL, gradients="manual", steps_per_call=3)
    x, y = _batch()
    with pytest.raises(ValueError, match="a 3-step call takes x and y with a leading axis of 3"):
        three(state, jnp.stack([x, x]), jnp.stack([y, y]))


def test_config_and_cli_take_dtype_and_remat(tmp_path, capsys):
    assert train.Config(dtype="bfloat16", remat=True).dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        train.Config(dtype="float16")
    with pytest.raises(ValueError, match="remat needs gradients 'autodiff' or 'manual'"):
        train.Config(remat=True, gradients="engine")
    with pytest.raises(ValueError, match="remat must be true or false"):
        train.Config(remat="yes")
    workdir = tmp_path / "run"
    args = ["train", "--epochs", "1", "--dtype", "bfloat16", "--remat", "--workdir", str(workdir), "--no-progress"]
    assert cli.main([*args, "--model", "models_for_tests:small_digits_cnn"]) == 0  # the flags, not the model
    out = capsys.readouterr().out
    assert "bfloat16, remat" in out and "test accuracy" in out
    saved = train.read_config(workdir)
    assert (saved.dtype, saved.remat) == ("bfloat16", True)
    assert cli.main(["train", "--dtype", "float64", "--workdir", str(tmp_path / "bad")]) == 2
    assert "unknown --dtype 'float64'" in capsys.readouterr().err


def test_bench_options_reach_every_contender_and_the_settings(tiny):
    result = bench.run(
        [tiny], batch_size=4, rounds=2, steps=2, warmup=0, dtype="bfloat16", steps_per_call=2, remat=True,
        contenders=["jaxcnn-manual", "jaxcnn-engine", "flax"], log=None,
    )  # fmt: skip
    settings = result["settings"]
    assert (settings["dtype"], settings["steps_per_call"], settings["remat"]) == ("bfloat16", 2, True)
    for row in result["results"]:
        assert len(row["rounds_images_per_second"]) == 2
        if row["memory"] is not None:  # XLA's analysis, where the backend gives one
            assert row["memory"]["temp_bytes"] >= 0 and row["memory"]["argument_bytes"] > 0
    assert "2 steps per JAX call (lax.scan)" in bench.markdown(result)
    with pytest.raises(ValueError, match=r"steps_per_call must be an int >= 1 dividing steps \(=3\)"):
        bench.run([tiny], steps=3, steps_per_call=2, log=None)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        bench.run([tiny], dtype="float16", log=None)
