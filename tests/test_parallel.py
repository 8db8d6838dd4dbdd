"""jaxcnn.parallel: per-example gradients, their statistics and DP-SGD; ensembles (jaxcnn.train.ensemble); data
parallelism (jaxcnn.distributed, jaxcnn.train.data_parallel: in process on the one CPU device; over 4 simulated
devices and 2 processes in subprocesses)."""

import json
import operator
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn.functional as F
from conftest import relative_error
from jaxcnn import distributed, nn, parallel, train
from jaxcnn.train import create_train_state, data_parallel, ensemble, make_train_step
from models_for_tests import every_layer_model, random_variables

# -- per-example gradients -------------------------------------------------------------------------------------


def small_cnn():
    return nn.Sequential(
        [
            nn.Conv2D(4, 3, padding="SAME"),
            nn.ReLU(),
            nn.MaxPool2D(2),
            nn.Conv2D(6, 3, padding="VALID"),
            nn.Tanh(),
            nn.GlobalAvgPool2D(),
            nn.Flatten(),
            nn.Dense(3),
        ]
    )


def dropout_cnn():
    return nn.Sequential(
        [
            nn.Conv2D(4, 3, padding="VALID"),
            nn.GroupNorm(groups=2),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Flatten(),
            nn.Dense(3),
        ]
    )


def batchnorm_cnn():
    return nn.Sequential([nn.Conv2D(4, 3, padding="VALID"), nn.BatchNorm(), nn.ReLU(), nn.Flatten(), nn.Dense(3)])


# name -> (model, input shape, classes); every model is checked in each gradient mode
MODELS = {
    "cnn": (small_cnn, (8, 8, 2), 3),
    "every_layer": (every_layer_model, (12, 11, 3), 4),
    "groupnorm_dropout": (dropout_cnn, (6, 6, 2), 3),
}
CASES = [
    ("cnn", "autodiff"),
    ("cnn", "manual"),
    ("cnn", "engine"),
    pytest.param("every_layer", "manual", marks=pytest.mark.slow),
    pytest.param("every_layer", "autodiff", marks=pytest.mark.slow),
    ("groupnorm_dropout", "manual"),
    ("groupnorm_dropout", "autodiff"),
]


def single_example_grad(model, loss_fn, params, state, x, y, key, train_mode=True):
    """The reference: jax.grad of the loss of one example as a batch of one (plain autodiff, no vmap)."""

    def loss(p):
        return loss_fn(model.apply(p, state, x[None], train=train_mode, key=key)[0], y[None])

    return jax.grad(loss)(params)


def batch_grad(model, loss_fn, params, state, x, y, train_mode=True):
    return jax.grad(lambda p: loss_fn(model.apply(p, state, x, train=train_mode)[0], y))(params)


def assert_close(actual, expected, tolerance, what):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        error = relative_error(a, b)
        assert error <= tolerance, f"{what}: relative error {error:.2e}"


@pytest.mark.sample(2)
@pytest.mark.parametrize(("name", "gradients"), CASES)
def test_per_example_grads_equal_single_example_grads_and_average_to_the_batch_grad(name, gradients):
    build, shape, classes = MODELS[name]
    model = build()
    params, state = random_variables(model, shape, seed=1)
    n = 5
    x = jnp.asarray(np.random.default_rng(2).standard_normal((n, *shape)))
    y = jnp.asarray(np.arange(n) % classes)
    key = jax.random.key(3)
    uses_key = name == "groupnorm_dropout"
    run = jax.jit(
        lambda p, x, y, k: parallel.per_example_grads(
            model, F.softmax_cross_entropy, p, state, x, y, gradients=gradients, key=k
        )
    )
    grads = run(params, x, y, key if uses_key else None)
    for leaf, param in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert leaf.shape == (n, *param.shape) and leaf.dtype == jnp.float64
    keys = jax.random.split(key, n)
    reference = jax.jit(lambda p, xi, yi, k: single_example_grad(model, F.softmax_cross_entropy, p, state, xi, yi, k))
    for i in range(n):
        expected = reference(params, x[i], y[i], keys[i] if uses_key else None)
        assert_close(jax.tree.map(operator.itemgetter(i), grads), expected, 1e-10, f"example {i}")
    if not uses_key:  # with dropout the batch gradient draws other masks
        mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        assert_close(mean, batch_grad(model, F.softmax_cross_entropy, params, state, x, y), 1e-10, "mean")


def test_per_example_grads_of_a_batchnorm_model_in_inference_mode_average_to_the_batch_grad():
    model = batchnorm_cnn()
    params, state = random_variables(model, (5, 5, 2), seed=4)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 5, 5, 2)))
    y = jnp.array([0, 1, 2, 1])
    for gradients in ("autodiff", "manual"):
        per_example = jax.jit(
            lambda p, mode=gradients: parallel.per_example_grads(
                model, F.softmax_cross_entropy, p, state, x, y, gradients=mode, train=False
            )
        )
        grads = per_example(params)
        mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        expected = batch_grad(model, F.softmax_cross_entropy, params, state, x, y, train_mode=False)
        assert_close(mean, expected, 1e-10, gradients)


def test_per_example_grads_with_mean_squared_error_targets():
    model = nn.Sequential([nn.Dense(4), nn.Tanh(), nn.Dense(2)])
    params, state = random_variables(model, (3,), seed=6)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((6, 3)))
    y = jnp.asarray(np.random.default_rng(8).standard_normal((6, 2)))
    grads = parallel.per_example_grads(model, F.mean_squared_error, params, state, x, y, gradients="manual")
    for i in range(6):
        expected = single_example_grad(model, F.mean_squared_error, params, state, x[i], y[i], None)
        assert_close(jax.tree.map(operator.itemgetter(i), grads), expected, 1e-10, f"example {i}")


def test_per_example_grads_reject_bad_batches_and_modes():
    model = small_cnn()
    params, state = random_variables(model, (8, 8, 2))
    x = jnp.zeros((3, 8, 8, 2))
    with pytest.raises(ValueError, match="same leading batch size"):
        parallel.per_example_grads(model, F.softmax_cross_entropy, params, state, x, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="empty batch"):
        parallel.per_example_grads(model, F.softmax_cross_entropy, params, state, x[:0], jnp.zeros(0, jnp.int32))
    with pytest.raises(ValueError, match="unknown gradients 'jvp'"):
        parallel.per_example_grads(
            model, F.softmax_cross_entropy, params, state, x, jnp.zeros(3, jnp.int32), gradients="jvp"
        )


def fake_per_example(seed=0, n=7):
    rng = np.random.default_rng(seed)
    return {"a": jnp.asarray(rng.standard_normal((n, 3, 2))), "b": jnp.asarray(rng.standard_normal((n, 4)))}


def test_norms_variance_and_noise_scale_match_numpy():
    grads = fake_per_example()
    flat = np.concatenate([np.asarray(grads["a"]).reshape(7, -1), np.asarray(grads["b"])], axis=1)
    np.testing.assert_allclose(parallel.per_example_norms(grads), np.linalg.norm(flat, axis=1), rtol=1e-12)
    variance = parallel.gradient_variance(grads, ddof=1)
    np.testing.assert_allclose(variance["a"], np.var(np.asarray(grads["a"]), axis=0, ddof=1), rtol=1e-12)
    stats = parallel.gradient_noise_scale(grads)
    mean = flat.mean(axis=0)
    total = np.sum(np.var(flat, axis=0, ddof=1))
    np.testing.assert_allclose(stats["mean_norm"], np.linalg.norm(mean), rtol=1e-12)
    np.testing.assert_allclose(stats["total_variance"], total, rtol=1e-12)
    np.testing.assert_allclose(stats["noise_scale"], total / np.sum(mean**2), rtol=1e-12)
    with pytest.raises(ValueError, match="ddof"):
        parallel.gradient_variance(jax.tree.map(lambda g: g[:1], grads), ddof=1)


# -- DP-SGD ----------------------------------------------------------------------------------------------------


def test_clip_per_example_bounds_every_norm_and_leaves_small_ones_alone():
    grads = fake_per_example(n=9)
    norms = np.asarray(parallel.per_example_norms(grads))
    bound = float(np.median(norms))
    clipped = parallel.clip_per_example(grads, bound)
    after = np.asarray(parallel.per_example_norms(clipped))
    assert np.all(after <= bound * (1 + 1e-12))
    small = norms <= bound
    np.testing.assert_allclose(after[small], norms[small], rtol=1e-12)  # below the bound: untouched
    np.testing.assert_allclose(after[~small], bound, rtol=1e-12)  # above: scaled onto it, direction kept
    direction = np.asarray(clipped["b"])[~small] / after[~small, None]
    np.testing.assert_allclose(direction, np.asarray(grads["b"])[~small] / norms[~small, None], rtol=1e-12)
    zero = parallel.clip_per_example(jax.tree.map(jnp.zeros_like, grads), 1.0)
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(zero))
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="l2_norm_clip"):
            parallel.clip_per_example(grads, bad)


def test_dp_optimizer_is_the_mean_of_clipped_gradients_plus_noise_of_the_stated_size():
    grads = fake_per_example(n=8)
    params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
    noiseless = parallel.dp_optimizer(optax.sgd(1.0), l2_norm_clip=0.5, noise_multiplier=0.0, key=jax.random.key(0))
    updates, _ = noiseless.update(grads, noiseless.init(params), params)
    expected = jax.tree.map(lambda g: -jnp.mean(g, axis=0), parallel.clip_per_example(grads, 0.5))
    assert_close(updates, expected, 1e-12, "noiseless DP update")
    # the noise: zero gradients, std = clip * multiplier / N, fresh every step from the key in the state
    zeros = {"w": jnp.zeros((4, 20000))}
    noisy = parallel.dp_optimizer(optax.sgd(1.0), l2_norm_clip=2.0, noise_multiplier=1.5, key=jax.random.key(1))
    opt_state = noisy.init({"w": jnp.zeros(20000)})
    first, opt_state = noisy.update(zeros, opt_state)
    second, _ = noisy.update(zeros, opt_state)
    # 20,000 draws: the sample standard deviation is good to about 1/sqrt(2n) = 0.5%
    assert np.std(np.asarray(first["w"])) == pytest.approx(2.0 * 1.5 / 4, rel=0.02)
    assert not np.array_equal(first["w"], second["w"])
    with pytest.raises(ValueError, match="noise_multiplier"):
        parallel.dp_optimizer(optax.sgd(1.0), l2_norm_clip=1.0, noise_multiplier=-1.0, key=jax.random.key(0))


def test_dp_train_step_clips_updates_and_refuses_batchnorm():
    with jax.enable_x64(False):
        model = small_cnn()
        clip = 0.01
        optimizer = parallel.dp_optimizer(
            optax.sgd(1.0), l2_norm_clip=clip, noise_multiplier=0.0, key=jax.random.key(0)
        )
        state = create_train_state(model, optimizer, jax.random.key(1), (8, 8, 2))
        x = jax.random.normal(jax.random.key(2), (6, 8, 8, 2))
        y = jnp.arange(6) % 3
        before = jax.tree.map(np.asarray, state.params)  # the step donates the state
        step = parallel.make_dp_train_step(model, gradients="manual", l2_norm_clip=clip)
        new, metrics = step(state, x, y)
        assert int(new.step) == 1 and set(metrics) == {"loss", "count", "grad_norm", "clipped", "accuracy"}
        assert float(metrics["clipped"]) == 1.0 and float(metrics["grad_norm"]) > clip
        moved = np.sqrt(
            sum(
                np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                for a, b in zip(*map(jax.tree.leaves, (new.params, before)), strict=True)
            )
        )
        # float32: the clipped mean and the distance moved each round by a few 1e-7
        assert moved <= clip * (1 + 1e-5)  # the mean of gradients each clipped to `clip` is no longer than `clip`
        bn = batchnorm_cnn()
        bn_state = create_train_state(bn, optimizer, jax.random.key(1), (5, 5, 2))
        with pytest.raises(ValueError, match="BatchNorm"):
            parallel.make_dp_train_step(bn)(bn_state, x[:, :5, :5], y)


# -- ensembles -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # the step level; fit's ensemble against separate runs runs by default
def test_an_ensemble_of_k_equals_k_separate_runs_with_the_same_seeds():
    with jax.enable_x64(False):
        model = dropout_cnn()
        optimizer = optax.sgd(0.1, momentum=0.9)
        seeds = [4, 9]
        states = ensemble.create_ensemble_state(model, optimizer, seeds, (6, 6, 2))
        assert states.step.shape == (2,)
        xs = jax.random.normal(jax.random.key(0), (2, 2, 8, 6, 6, 2))  # (steps, members, batch, ...)
        ys = jax.random.randint(jax.random.key(1), (2, 2, 8), 0, 3)
        step = ensemble.make_ensemble_train_step(model, gradients="manual")
        for t in range(2):
            states, metrics = step(states, xs[t], ys[t])
        assert metrics["loss"].shape == (2,)
        single = make_train_step(model, gradients="manual")
        for k, seed in enumerate(seeds):
            state = create_train_state(model, optimizer, jax.random.key(seed), (6, 6, 2))
            for t in range(2):
                state, _ = single(state, xs[t, k], ys[t, k])
            # float32, two momentum steps: the vmapped ensemble step is another compiled program, which may round
            # otherwise
            assert_close(jax.tree.map(operator.itemgetter(k), states.params), state.params, 1e-6, f"member {k}")
        # the ensemble predicts with the mean of its members' probabilities
        members, mean = ensemble.ensemble_predictions(model, states.params, states.model_state, xs[0, 0])
        for k in range(2):
            member = jax.tree.map(operator.itemgetter(k), (states.params, states.model_state))
            logits = model.apply(*member, xs[0, 0])[0]
            # float32: the members' probabilities come from a vmapped forward, compiled otherwise than this one
            np.testing.assert_allclose(members[k], jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mean, np.mean(np.asarray(members), axis=0), rtol=1e-6)


def test_an_ensemble_with_a_learning_rate_per_member_matches_runs_with_those_rates():
    with jax.enable_x64(False):
        model = small_cnn()
        rates = [0.2, 0.05]
        states = ensemble.create_ensemble_state(model, optax.adam(1.0), [3, 3], (8, 8, 2))
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
        y = jnp.array([0, 1, 2, 0])
        step = ensemble.make_ensemble_train_step(model, lr_scales=rates, shared_batch=True)
        for _ in range(3):
            states, _ = step(states, x, y)
        for k, rate in enumerate(rates):
            optimizer = optax.adam(rate)
            state = create_train_state(model, optimizer, jax.random.key(3), (8, 8, 2))
            single = make_train_step(model)
            for _ in range(3):
                state, _ = single(state, x, y)
            # float32 Adam: the member's update is adam(1.0) scaled by its rate, the run's adam(rate) rounds the
            # same numbers in another order; three steps through Adam's division by sqrt(v) reach about 1e-5
            assert_close(jax.tree.map(operator.itemgetter(k), states.params), state.params, 3e-5, f"rate {rate}")
        with pytest.raises(ValueError, match="lr_scales"):
            ensemble.make_ensemble_train_step(model, lr_scales=[0.1, -1.0])
        with pytest.raises(TypeError, match="options must be a StepOptions"):  # the members' optimizer is states.tx
            ensemble.make_ensemble_train_step(model, optax.adam(1.0))
        wrong = ensemble.make_ensemble_train_step(model, lr_scales=[1.0, 1.0, 1.0], shared_batch=True)
        with pytest.raises(ValueError, match="2 members but lr_scales has 3"):
            wrong(states, x, y)


def test_ensemble_keys_are_checked():
    model = small_cnn()
    with pytest.raises(ValueError, match="not a single int"):
        ensemble.create_ensemble_state(model, optax.sgd(0.1), 3, (8, 8, 2))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        ensemble.create_ensemble_state(model, optax.sgd(0.1), [1, -2], (8, 8, 2))


# a small user model (a factory path, as `jaxcnn train --model` takes one): what is under test is the ensemble's
# bookkeeping, which is the same for any model; mnist_cnn made these three tests about 20 s of CPU
SMALL_MODEL = "models_for_tests:small_digits_cnn"
ENSEMBLE = train.Config(epochs=2, ensemble=2, keep=1, model=SMALL_MODEL)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ensemble")
    state, history = train.fit(ENSEMBLE, workdir, log=None)
    return workdir, state, history


def test_fit_ensemble_members_equal_separate_runs(ensemble_run):
    _, state, history = ensemble_run
    assert state.step.shape == (2,)
    separate, separate_history = train.fit(ENSEMBLE.replace(ensemble=1, seed=1), None, log=None)
    member = jax.tree.map(operator.itemgetter(1), state.params)
    # float32 after two epochs: the vmapped member and the lone run are other compiled programs, which may round
    # otherwise
    assert_close(member, separate.params, 1e-6, "member 1 against the run with seed 1")
    record = history[-1]
    assert len(record["members"]) == 2
    assert record["members"][1]["test_accuracy"] == pytest.approx(separate_history[-1]["test_accuracy"], abs=1e-9)
    assert record["test_accuracy"] >= min(m["test_accuracy"] for m in record["members"])
    assert record["train_loss"] == pytest.approx(np.mean([m["train_loss"] for m in record["members"]]))


def test_ensemble_workdir_resumes_evaluates_and_refuses_another_size(ensemble_run, tmp_path):
    workdir, state, history = ensemble_run
    train.fit(ENSEMBLE.replace(epochs=1), tmp_path, log=None)
    resumed, resumed_history = train.fit(ENSEMBLE, tmp_path, log=None)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(state.params), strict=True):
        assert np.array_equal(a, b)
    assert resumed_history[-1]["members"] == history[-1]["members"]
    result = train.evaluate_workdir(workdir)
    assert result["accuracy"] == pytest.approx(history[-1]["test_accuracy"])
    assert [m["accuracy"] for m in result["members"]] == [m["test_accuracy"] for m in history[-1]["members"]]
    with pytest.raises(ValueError, match="ensemble: 2 -> 3"):
        train.fit(ENSEMBLE.replace(ensemble=3), workdir, log=None)


def test_ensemble_config_errors():
    with pytest.raises(ValueError, match="ensemble must be an int >= 1"):
        train.Config(ensemble=0)
    with pytest.raises(ValueError, match="past 2\\*\\*32 - 1"):
        train.Config(seed=2**32 - 1, ensemble=2)
    with pytest.raises(ValueError, match="cannot be combined with --devices"):
        train.fit(train.Config(ensemble=2, epochs=1), None, log=None, devices=1)


# -- data parallelism ------------------------------------------------------------------------------------------


def test_the_moved_names_are_still_importable_from_parallel():
    for name in ("AXIS", "data_mesh", "initialize", "replicate", "shard_batch", "sharded_batches"):
        assert getattr(parallel, name) is getattr(distributed, name)
    for name in ("create_ensemble_state", "make_ensemble_train_step", "make_ensemble_eval_step", "evaluate_ensemble"):
        assert getattr(parallel, name) is getattr(ensemble, name)
    for name in ("make_data_parallel_train_step", "make_data_parallel_eval_step"):
        assert getattr(parallel, name) is getattr(data_parallel, name)
    with pytest.raises(AttributeError, match="'jaxcnn.parallel' has no attribute 'make_ensemble'"):
        parallel.make_ensemble  # noqa: B018


def test_data_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="only 1 are available.*xla_force_host_platform_device_count"):
        distributed.data_mesh(2)
    with pytest.raises(ValueError, match="devices must be an int >= 1"):
        distributed.data_mesh(0)
    assert distributed.data_mesh(None).shape == {"data": 1}


def test_initialize_does_nothing_without_arguments_and_checks_partial_ones(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    with pytest.raises(ValueError, match="missing --num-processes, --process-id"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"--process-id must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        distributed.initialize()


def test_one_device_mesh_step_equals_the_plain_step():
    with jax.enable_x64(False):
        model = batchnorm_cnn()
        optimizer = optax.sgd(0.1, momentum=0.9)
        mesh = distributed.data_mesh(1)
        plain = create_train_state(model, optimizer, jax.random.key(0), (5, 5, 2))
        sharded = distributed.replicate(create_train_state(model, optimizer, jax.random.key(0), (5, 5, 2)), mesh)
        x = np.asarray(jax.random.normal(jax.random.key(1), (8, 5, 5, 2)))
        y = np.arange(8) % 3
        plain, _ = make_train_step(model)(plain, x, y)
        step = data_parallel.make_data_parallel_train_step(model, mesh)
        sharded, _ = step(sharded, distributed.shard_batch(x, mesh), distributed.shard_batch(y, mesh))
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            # float32, one momentum step through BatchNorm: the mesh step is another compiled program, which may round
            # otherwise
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def run_script(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run ``code`` in a fresh Python (its own XLA flags, its own processes); return stdout, fail with stderr."""
    environment = dict(os.environ, **(env or {}))
    environment.pop("JAX_ENABLE_X64", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


FOUR_DEVICES = """
    import json, jax, numpy as np, optax
    from jaxcnn import distributed, nn, train
    from jaxcnn.train import data_parallel

    def rel(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    out = {"devices": jax.device_count()}
    if WHOLE_LOOP:
        # the whole loop: 1 device against 4 (the last batch of each epoch, 29 images, is replicated)
        config = train.Config(epochs=2, seed=3)  # the README's commands, one epoch shorter
        one, one_history = train.fit(config, None, log=None)
        four, four_history = train.fit(config, None, log=None, devices=4)
        out["fit"] = rel(four.params, one.params)
        out["test_loss"] = [one_history[-1]["test_loss"], four_history[-1]["test_loss"]]
        # resume under data parallelism: 1 epoch on 4 devices, then resumed to 2 on 4 devices
        train.fit(config.replace(epochs=1), "WORKDIR", log=None, devices=4)
        resumed, _ = train.fit(config, "WORKDIR", log=None, devices=4)
        out["resume"] = rel(resumed.params, four.params)
    # BatchNorm: the statistics of the global batch, moments and running averages as on one device
    model = nn.Sequential([nn.Conv2D(4, 3), nn.BatchNorm(), nn.ReLU(), nn.Flatten(), nn.Dense(3)])
    optimizer = optax.sgd(0.1, momentum=0.9)
    mesh = distributed.data_mesh(4)
    plain = train.create_train_state(model, optimizer, jax.random.key(0), (5, 5, 2))
    sharded = distributed.replicate(plain, mesh)
    step = train.make_train_step(model, gradients="manual")
    sharded_step = data_parallel.make_data_parallel_train_step(model, mesh, gradients="manual")
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((16, 5, 5, 2)).astype(np.float32) * 3 + 1
        y = rng.integers(0, 3, 16)
        plain, _ = step(plain, x, y)
        sharded, metrics = sharded_step(sharded, distributed.shard_batch(x, mesh), distributed.shard_batch(y, mesh))
    # relative to the largest entry of the whole tree: the conv bias before BatchNorm has a zero gradient in
    # exact arithmetic (the normalisation removes it), so its own scale is rounding noise
    def tree_rel(a, b):
        scale = max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(b))
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b))) / scale

    out["batchnorm_params"] = tree_rel(sharded.params, plain.params)
    out["batchnorm_state"] = tree_rel(sharded.model_state, plain.model_state)
    out["sharding"] = list(distributed.shard_batch(x, mesh).sharding.spec)
    print(json.dumps(out))
"""


def four_devices_script(tmp_path_factory, whole_loop: bool) -> dict:
    """Run FOUR_DEVICES on four simulated CPU devices (the whole-loop part or not); its JSON result."""
    workdir = tmp_path_factory.mktemp("four") / "run"
    code = FOUR_DEVICES.replace("WORKDIR", str(workdir)).replace("WHOLE_LOOP", str(whole_loop))
    output = run_script(code, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    return four_devices_script(tmp_path_factory, whole_loop=False)


# three trainings of mnist_cnn (about 25 s); the data-parallel step runs on four devices by default (below), and
# the one-device mesh step equals the plain step in this process
@pytest.mark.slow
def test_four_simulated_devices_reach_the_one_device_parameters(tmp_path_factory):
    four_devices = four_devices_script(tmp_path_factory, whole_loop=True)
    assert four_devices["devices"] == 4
    # float32 over two epochs: four devices add their shares of each batch's gradient in another order than one
    assert four_devices["fit"] <= 1e-5
    one, four = four_devices["test_loss"]
    assert four == pytest.approx(one, rel=1e-5)
    assert four_devices["resume"] == 0.0  # a resumed data-parallel run repeats the straight one bit for bit


def test_batchnorm_statistics_cover_the_whole_batch_across_devices(four_devices):
    assert four_devices["devices"] == 4
    assert four_devices["sharding"] == ["data"]
    # float32, three steps through BatchNorm's division by the batch spread: the devices' partial sums of the
    # moments and the gradients add in another order
    assert four_devices["batchnorm_params"] <= 1e-5
    assert four_devices["batchnorm_state"] <= 1e-5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# the README's 2-process command
TWO_PROCESS_FLAGS = ["--epochs", "3", "--seed", "3", "--no-progress"]


def test_the_readme_gives_the_commands_these_tests_run():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flags = " ".join(TWO_PROCESS_FLAGS[:-1])
    assert (
        f"XLA_FLAGS=--xla_force_host_platform_device_count=4 jaxcnn train --devices 4 {flags} --workdir runs/four"
        in readme
    )
    assert f"jaxcnn train {flags} --workdir runs/one\n" in readme
    for rank in (0, 1):
        process = f"--coordinator 127.0.0.1:4712 --num-processes 2 --process-id {rank}"
        assert f"jaxcnn train {flags} --workdir runs/two {process}" in readme


# two processes through jax.distributed (about 50 s); data parallelism on four simulated devices runs by default
@pytest.mark.slow
def test_two_processes_on_one_machine_match_one_process(tmp_path):
    environment = dict(os.environ)
    environment.pop("XLA_FLAGS", None)
    port = free_port()
    command = [sys.executable, "-m", "jaxcnn.cli", "train", *TWO_PROCESS_FLAGS, "--workdir", str(tmp_path / "two")]
    processes = [
        subprocess.Popen(
            [*command, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert "[Gloo]" not in stdout + stderr  # gloo's "Rank 0 is connected to 1 peer ranks" lines
    assert "data parallel over 2 devices in 2 processes" in outputs[0][0]
    assert "epoch" not in outputs[1][0] and "done" not in outputs[1][0]  # only the first process reports
    # the one-process run is the README's command too, in a process of its own: compiled as the two were (the
    # test processes compile without XLA's optimisations, which rounds otherwise; 135 steps grow that to 1e-2)
    single = subprocess.run(
        [*command[:-1], str(tmp_path / "one")], capture_output=True, text=True, env=environment, timeout=300
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert train.read_config(tmp_path / "one") == train.read_config(tmp_path / "two")
    one, one_history = train.restore(tmp_path / "one"), train.read_metrics(tmp_path / "one")
    two = train.restore(tmp_path / "two")
    # float32 over three epochs: the two processes add their halves of each batch's gradient in another order
    assert_close(two.params, one.params, 1e-5, "2 processes against 1")
    two_history = train.read_metrics(tmp_path / "two")
    assert len(two_history) == len(one_history) and two_history[-1]["test_loss"] == pytest.approx(
        one_history[-1]["test_loss"], rel=1e-5
    )
    # each checkpoint was written once, by orbax's primary process
    assert sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()) == [45, 90, 135]
    assert not list((tmp_path / "two" / "checkpoints" / "135" / "state").glob("ocdbt.process_1"))


def test_the_cli_reports_each_ensemble_member(ensemble_run, capsys):
    from jaxcnn.cli import main

    workdir, _, history = ensemble_run  # trained as `jaxcnn train --ensemble 2 --epochs 2 --keep 1 --model ...` would
    flags = ["--ensemble", "2", "--epochs", "2", "--model", SMALL_MODEL, "--workdir", str(workdir), "--no-progress"]
    assert main(["train", *flags]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2" in out
    for k, member in enumerate(history[-1]["members"]):
        assert f"member {k} (seed {k}): test accuracy {member['test_accuracy']:.4f}" in out
    assert f"done: ensemble test accuracy {history[-1]['test_accuracy']:.4f}" in out
    record = json.loads(Path(workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record == history[-1]
    assert main(["eval", "--workdir", str(workdir)]) == 0
    assert f"test accuracy {history[-1]['test_accuracy']:.4f}" in capsys.readouterr().out


def test_the_cli_rejects_bad_scaling_flags(tmp_path, capsys):
    from jaxcnn.cli import main

    assert main(["train", "--devices", "3", "--workdir", str(tmp_path / "a")]) == 2
    assert "asked for 3 devices but only 1 are available" in capsys.readouterr().err
    assert main(["train", "--devices", "0", "--workdir", str(tmp_path / "b")]) == 2
    assert "--devices must be >= 1" in capsys.readouterr().err
    assert main(["train", "--coordinator", "127.0.0.1:9", "--workdir", str(tmp_path / "c")]) == 2
    assert "missing --num-processes, --process-id" in capsys.readouterr().err


def test_gloo_connection_lines_are_dropped_and_nothing_else(capfd):
    from jaxcnn import _gloo

    connected = b"[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\n"
    missing = b"[Gloo] Rank 0 is connected to 2 peer ranks. Expected number of connected peer ranks is : 3\n"
    assert _gloo.without_connection_lines(b"a\n" + connected + b"b [Gloo] c\n" + missing + connected) == (
        b"a\nb [Gloo] c\n" + missing
    )
    print("before", flush=True)
    with _gloo.quietly():  # what gloo's C++ writes goes to file descriptor 1, past sys.stdout
        os.write(1, b"kept\n" + connected + b"also kept")
        os.write(2, connected)  # stderr is not touched
    print("after")
    captured = capfd.readouterr()
    assert captured.out == "before\nkept\nalso keptafter\n" and captured.err == connected.decode()
