"""jaxcnn.train: config validation, optimizers, the compiled step (modes agree, no recompilation, donation),
evaluation, the loop, exact resume, checkpoints (corrupt ones reported) and non-finite stops."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn as jc
from conftest import corrupt_latest
from jaxcnn import train
from jaxcnn.train.config import make_schedule
from models_for_tests import MODELS

# -- Config ----------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
    ({"epochs": 2.5}, "epochs must be an int >= 1"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"batch_size": True}, "batch_size must be an int >= 1"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite positive number, got nan"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite positive number, got inf"),
    ({"learning_rate": 0.0}, "learning_rate must be a finite positive number, got 0.0"),
    ({"learning_rate": -1e-3}, "learning_rate must be a finite positive number"),
    ({"learning_rate": "0.1"}, "learning_rate must be a finite positive number"),
    ({"momentum": 1.0}, "momentum must be a number in [0, 1)"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
    ({"decay_rate": 0.0}, "decay_rate must be a number in (0, 1]"),
    ({"model": "resnet9000"}, "unknown model 'resnet9000'; known: conv_autoencoder, digits_cnn, lenet5, mnist_cnn"),
    ({"model": "conv_autoencoder"}, "model 'conv_autoencoder' reconstructs its input (mean squared error)"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; known: cifar10, digits, fashion_mnist, folder, mnist, npz"),
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; known: adam, adamw, momentum, nesterov, rmsprop, sgd"),
    ({"schedule": "step"}, "unknown schedule 'step'; known: constant, cosine, exponential, warmup_cosine"),
    ({"gradients": "numeric"}, "unknown gradients 'numeric'; known: autodiff, engine, manual"),
    ({"keep": 0}, "keep must be an int >= 1, got 0"),
    ({"seed": -1}, "seed must be an int >= 0, got -1"),
    ({"seed": 2**32}, "seed must be an int in [0, 2**32)"),
    ({"warmup_epochs": -1}, "warmup_epochs must be an int >= 0"),
    ({"normalize": "yes"}, "normalize must be true or false"),
    ({"optimizer": "momentum", "momentum": 0.0}, "optimizer 'momentum' needs momentum > 0"),
    ({"dataset": "npz"}, "dataset 'npz' needs data_path"),
    ({"dataset": "mnist"}, "dataset 'mnist' needs data_dir"),
    ({"dataset": "cifar10", "data_dir": ""}, "data_dir must be a non-empty path string"),
]


@pytest.mark.parametrize("changes,message", BAD_CONFIGS)
def test_config_rejects_bad_values_with_one_line(changes, message):
    with pytest.raises(ValueError) as error:
        train.Config(**changes)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_config_json_round_trip_and_unknown_fields():
    config = train.Config(optimizer="adamw", learning_rate=3e-4, epochs=7, data_dir="/data")
    assert train.Config.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match=r"unknown config fields \['learningrate'\]"):
        train.Config.from_dict({"learningrate": 0.1})
    with pytest.raises(ValueError, match="not valid JSON"):
        train.Config.from_json("{")
    with pytest.raises(ValueError, match="epochs must be"):
        config.replace(epochs=0)


def test_resume_conflicts_name_the_fixed_fields():
    saved = train.Config()
    assert saved.replace(epochs=80, learning_rate=0.01, gradients="autodiff").resume_conflicts(saved) == []
    conflicts = saved.replace(model="lenet5", seed=3, batch_size=8).resume_conflicts(saved)
    assert conflicts == ["model: 'mnist_cnn' -> 'lenet5'", "seed: 0 -> 3", "batch_size: 32 -> 8"]


def test_config_takes_numpy_scalars_and_rejects_huge_numbers():
    config = train.Config(epochs=np.int64(3), learning_rate=np.float32(0.5), normalize=np.bool_(False))
    assert type(config.epochs) is int and type(config.learning_rate) is float and config.normalize is False
    assert train.Config.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="learning_rate must be a finite positive number"):
        train.Config(learning_rate=10**400)


# -- optimizers and schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
@pytest.mark.parametrize("schedule", train.SCHEDULES)
def test_every_optimizer_and_schedule_builds_and_steps(optimizer, schedule):
    config = train.Config(optimizer=optimizer, schedule=schedule, weight_decay=1e-3, epochs=3, learning_rate=0.1)
    transform, rate = train.make_optimizer(config, steps_per_epoch=5)
    params = {"w": jnp.ones((3,), jnp.float32)}
    state = transform.init(params)
    updates, state2 = transform.update({"w": jnp.full((3,), 0.5, jnp.float32)}, state, params)
    assert jax.tree.structure(state2) == jax.tree.structure(state)
    assert bool(jnp.all(jnp.isfinite(updates["w"])))
    assert 0 <= float(rate(7)) <= float(np.float32(0.1))
    assert rate(7).dtype == jnp.float32


def test_schedules_have_the_documented_shape():
    steps = 10
    base = train.Config(learning_rate=0.2, epochs=4, decay_rate=0.5, warmup_epochs=1)
    constant = make_schedule(base.replace(schedule="constant"), steps)
    assert float(constant(0)) == float(constant(39)) == pytest.approx(0.2)
    exponential = make_schedule(base.replace(schedule="exponential"), steps)
    assert [float(exponential(s)) for s in (0, 9, 10, 25)] == pytest.approx([0.2, 0.2, 0.1, 0.05])
    cosine = make_schedule(base.replace(schedule="cosine"), steps)
    assert float(cosine(0)) == pytest.approx(0.2) and float(cosine(40)) == pytest.approx(0.0, abs=1e-9)
    warmup = make_schedule(base.replace(schedule="warmup_cosine"), steps)
    assert float(warmup(0)) == 0.0 and float(warmup(10)) == pytest.approx(0.2)
    assert float(warmup(40)) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_is_l2_for_sgd_and_decoupled_for_adamw():
    params = {"w": jnp.array([2.0])}
    zero = {"w": jnp.array([0.0])}
    sgd, _ = train.make_optimizer(train.Config(optimizer="sgd", learning_rate=0.1, weight_decay=0.5), 1)
    updates, _ = sgd.update(zero, sgd.init(params), params)
    assert float(updates["w"][0]) == pytest.approx(-0.1 * 0.5 * 2.0)
    adamw, _ = train.make_optimizer(train.Config(optimizer="adamw", learning_rate=0.1, weight_decay=0.5), 1)
    updates, _ = adamw.update(zero, adamw.init(params), params)
    assert float(updates["w"][0]) == pytest.approx(-0.1 * 0.5 * 2.0)


# -- the train state and the compiled step ---------------------------------------------------------------------


def small_problem(name="unseen", batch=6, dtype=jnp.float64):
    build, shape, classes = MODELS[name]
    model = build()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, *shape)), dtype)
    y = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
    return model, shape, x, y


def test_create_train_state_fields_and_keys():
    model, shape, _, _ = small_problem()
    optimizer = optax.sgd(0.1, 0.9)
    state = train.create_train_state(model, optimizer, jax.random.key(0), shape)
    assert set(state.__dataclass_fields__) == {"params", "model_state", "opt_state", "step", "key", "tx"}
    assert state.tx is optimizer  # static: part of the tree's structure, not a leaf
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves((state.params, state.opt_state, state.step))) + 1
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    legacy = train.create_train_state(model, optimizer, jax.random.PRNGKey(0), shape)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(legacy.params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="must be a JAX random key"):
        train.create_train_state(model, optimizer, 0, shape)
    with pytest.raises(ValueError, match="input_shape"):
        train.create_train_state(model, optimizer, jax.random.key(0), "28x28")


@pytest.mark.parametrize(
    "name", [*(pytest.param(n, marks=pytest.mark.slow) for n in ("unseen", "every_layer")), "nested"]
)
def test_three_gradient_modes_reach_the_same_parameters(name):
    model, shape, x, y = small_problem(name)
    optimizer = optax.sgd(0.05, momentum=0.9)
    finals = {}
    for gradients in train.GRADIENTS:
        state = train.create_train_state(model, optimizer, jax.random.key(3), shape, dtype=jnp.float64)
        step = train.make_train_step(model, gradients=gradients)
        for _ in range(4):
            state, metrics = step(state, x, y)
        finals[gradients] = state
        assert set(metrics) == {"loss", "accuracy", "count"}
    for gradients in ("manual", "engine"):
        for a, b in zip(
            jax.tree.leaves(finals[gradients].params), jax.tree.leaves(finals["autodiff"].params), strict=True
        ):
            scale = float(jnp.max(jnp.abs(b)))
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-12 * scale, gradients


@pytest.mark.parametrize("gradients", train.GRADIENTS)
def test_step_never_recompiles_and_donates_the_state(gradients):
    model, shape, x, y = small_problem(dtype=jnp.float32)
    optimizer = optax.adam(1e-3)
    state = train.create_train_state(model, optimizer, jax.random.key(0), shape)
    step = train.make_train_step(model, gradients=gradients)
    old = state
    state, metrics = step(state, x, y)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params))  # donated
    assert all(isinstance(value, jax.Array) for value in metrics.values())  # kept on device
    for _ in range(3):
        state, metrics = step(state, x, y)
    assert step._cache_size() == 1
    assert int(state.step) == 4 and int(metrics["count"]) == x.shape[0]


def test_step_keys_differ_per_step_and_come_from_the_state_key():
    """Step s draws from fold_in(state.key, s): a model that returns its noise shows it."""

    class Noise(jc.nn.Layer):
        def forward_with_state(self, params, state, x, *, train=False, key=None):
            return x + jax.random.normal(key, x.shape, x.dtype), None, state

        def backward(self, params, residuals, dy):
            return dy, {}

    model = jc.nn.Sequential([Noise(), jc.nn.Flatten(), jc.nn.Dense(2)])
    optimizer = optax.sgd(0.0)
    step = train.make_train_step(model, gradients="autodiff")
    x, y = jnp.zeros((4, 3), jnp.float32), jnp.zeros((4,), jnp.int32)
    fresh = lambda: train.create_train_state(model, optimizer, jax.random.key(1), (3,))
    _, first = step(fresh(), x, y)
    _, again = step(fresh(), x, y)
    _, second = step(fresh().replace(step=jnp.ones((), jnp.int32)), x, y)
    assert float(first["loss"]) == float(again["loss"])  # same key, same step: same draw
    assert float(first["loss"]) != float(second["loss"])  # next step: another draw


def test_evaluate_adds_partial_batches_exactly():
    model, shape, x, y = small_problem(batch=11)
    params, model_state = model.init(jax.random.key(0), shape, dtype=jnp.float64)
    logits, _ = model.apply(params, model_state, x)
    expected_loss = float(jc.functional.softmax_cross_entropy(logits, y))
    expected_accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y))
    for batch_size in (1, 4, 11, 64):
        result = train.evaluate(model, params, model_state, np.asarray(x), np.asarray(y), batch_size=batch_size)
        assert result["count"] == 11
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-12)
        assert result["accuracy"] == pytest.approx(expected_accuracy)


def test_mse_step_has_loss_but_no_accuracy():
    model = jc.nn.Sequential([jc.nn.Flatten(), jc.nn.Dense(3)])
    optimizer = optax.sgd(0.1)
    state = train.create_train_state(model, optimizer, jax.random.key(0), (2, 2, 1))
    step = train.make_train_step(model, loss_fn=jc.functional.mean_squared_error, gradients="engine")
    x, y = jnp.ones((5, 2, 2, 1), jnp.float32), jnp.zeros((5, 3), jnp.float32)
    state, metrics = step(state, x, y)
    assert set(metrics) == {"loss", "count"}


def test_evaluate_with_a_reconstruction_eval_step_takes_image_targets():
    """examples/autoencoder.py's call: an eval step made for mean squared error, image targets, no loss_fn given
    (the label check of the default loss once refused the images as labels)."""
    model = jc.nn.Sequential([jc.nn.Flatten(), jc.nn.Dense(4)])
    params, model_state = model.init(jax.random.key(0), (2, 2, 1))
    x = np.random.default_rng(0).normal(size=(5, 2, 2, 1)).astype(np.float32)
    target = x.reshape(5, 4)  # the image itself, flattened
    step = train.make_eval_step(model, loss_fn=jc.functional.mean_squared_error)
    result = train.evaluate(model, params, model_state, x, target, eval_step=step)
    expected = float(jc.functional.mean_squared_error(model.apply(params, model_state, x)[0], target))
    assert result["count"] == 5 and result["loss"] == pytest.approx(expected, rel=1e-6) and "accuracy" not in result
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        train.evaluate(model, params, model_state, x, target)  # the default loss: class labels are checked


def test_unknown_gradients_mode_is_an_error():
    model, _, _, _ = small_problem()
    with pytest.raises(ValueError, match="unknown gradients 'fast'"):
        train.make_train_step(model, gradients="fast")


def test_the_step_takes_its_optimizer_from_the_state_and_refuses_one_given():
    model = jc.nn.Sequential([jc.nn.Flatten(), jc.nn.Dense(3)])  # small: the reference below runs eagerly
    shape, x, y = (2, 2, 1), jnp.asarray(np.random.default_rng(0).normal(size=(5, 2, 2, 1))), jnp.arange(5) % 3
    with pytest.raises(TypeError, match="make_train_step takes the model and StepOptions; got GradientTransformation"):
        train.make_train_step(model, optax.sgd(0.1))
    with pytest.raises(TypeError, match="options must be a StepOptions"):
        train.StepOptions.of(optax.sgd(0.1))
    options = train.StepOptions(gradients="manual")
    assert train.StepOptions.of(options, gradients="engine") == train.StepOptions(gradients="engine")
    # one step of the compiled step is apply_gradients on the step's gradients, with the state's own optimizer
    state = train.create_train_state(model, optax.sgd(0.1, 0.9), jax.random.key(0), shape, dtype=jnp.float64)
    loss = lambda params: jc.functional.softmax_cross_entropy(model.apply(params, state.model_state, x)[0], y)
    grads = jax.grad(loss)(state.params)
    expected = state.apply_gradients(grads=grads)
    stepped, _ = train.make_train_step(model, options)(jax.tree.map(jnp.copy, state), x, y)
    assert int(expected.step) == int(stepped.step) == 1
    for a, b in zip(jax.tree.leaves(stepped.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)  # float64; manual rules against autodiff
    updates, opt_state = state.optimizer_update(grads)
    assert_bitwise_equal(state.apply_updates(updates, opt_state), expected)


# -- the loop, checkpoints and resume --------------------------------------------------------------------------

# the loop's runs train a small user model (a factory path): fit's files, resumes and schedules are under test,
# which are the same for any model (mnist_cnn cost these tests about 20 s of CPU); the command's runs, in
# test_cli_train.py, train mnist_cnn
SMALL = "models_for_tests:small_digits_cnn"
SHORT = train.Config(epochs=4, learning_rate=0.05, keep=2, model=SMALL)


def leaves(state):
    tree = (state.params, state.model_state, state.opt_state, state.step)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def assert_bitwise_equal(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    state, history = train.fit(SHORT, workdir, log=None)
    return workdir, state, history


def test_fit_writes_config_metrics_and_the_last_checkpoints(straight_run):
    workdir, state, history = straight_run
    assert train.read_config(workdir) == SHORT
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records == history and [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) == set(train.loop.METRIC_FIELDS)
    steps_per_epoch = jc.data.num_batches(1437, SHORT.batch_size)
    assert [r["step"] for r in records] == [steps_per_epoch * e for e in (1, 2, 3, 4)]
    assert records[-1]["test_accuracy"] > 0.8 and records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[1]["learning_rate"] == pytest.approx(0.05 * 0.9)  # the rate of the epoch's last step
    with train.Checkpointer(workdir / "checkpoints") as checkpointer:
        assert checkpointer.steps() == [steps_per_epoch * 3, steps_per_epoch * 4]  # keep=2
    assert_bitwise_equal(train.restore(workdir), state)


def test_resumed_runs_match_a_straight_run_bit_for_bit(straight_run, tmp_path):
    _, straight, straight_history = straight_run
    train.fit(SHORT.replace(epochs=1), tmp_path, log=None)
    train.fit(SHORT.replace(epochs=3), tmp_path, log=None)
    lines = []
    state, history = train.fit(SHORT, tmp_path, log=lines.append)
    assert lines[1].startswith(f"resuming {tmp_path} from epoch 3")
    assert_bitwise_equal(state, straight)
    assert [r["test_loss"] for r in history] == [r["test_loss"] for r in straight_history]
    # asking for fewer epochs than done returns the run as it is
    again, history = train.fit(SHORT.replace(epochs=2), tmp_path, log=None)
    assert_bitwise_equal(again, straight)
    assert len(history) == 4
    assert train.read_config(tmp_path).epochs == 4  # asking for fewer epochs trains nothing and changes nothing


def test_in_memory_fit_matches_the_workdir_run(straight_run):
    _, straight, _ = straight_run
    state, history = train.fit(SHORT, None, log=None)
    assert_bitwise_equal(state, straight)
    assert len(history) == 4


def test_resume_refuses_another_model_or_data_set(straight_run):
    workdir, _, _ = straight_run
    with pytest.raises(ValueError, match=f"cannot resume .*model: '{SMALL}' -> 'lenet5'"):
        train.fit(SHORT.replace(model="lenet5"), workdir, log=None)
    with pytest.raises(ValueError, match="dataset: 'digits' -> 'synthetic'"):
        train.fit(SHORT.replace(dataset="synthetic"), workdir, log=None)


# after orbax fails to read, its storage threads may hit its closed event loop; the command filters that noise
# (checkpoint._silence_closed_loop_noise), but pytest installs its own hook for every test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupt_checkpoint_is_reported_by_name_and_left_in_place(straight_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    latest = corrupt_latest(workdir)
    with pytest.raises(train.CheckpointError, match=f"checkpoint {latest} is corrupt"):
        train.restore(workdir)
    with pytest.raises(train.CheckpointError, match=f"checkpoint {latest}"):
        train.fit(SHORT.replace(epochs=5), workdir, log=None)
    assert latest.is_dir()
    (latest / "meta" / "metadata").write_text("not json")
    with pytest.raises(train.CheckpointError, match=f"checkpoint {latest} is corrupt or unreadable"):
        train.restore(workdir)


def test_restore_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.restore(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="not a jaxcnn workdir"):
        train.restore(tmp_path)
    (tmp_path / "config.json").write_text(train.Config().to_json())
    with pytest.raises(train.CheckpointError, match="no checkpoint in"):
        train.restore(tmp_path)
    (tmp_path / "config.json").write_text('{"epochs": 0}')
    with pytest.raises(ValueError, match="config.json is not a valid config: epochs must be"):
        train.restore(tmp_path)


def test_checkpointer_refuses_non_finite_state(tmp_path):
    model, shape, _, _ = small_problem(dtype=jnp.float32)
    state = train.create_train_state(model, optax.sgd(0.1), jax.random.key(0), shape)
    bad = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params))
    with train.Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(ValueError, match="non-finite"):
            checkpointer.save(bad, {})
        assert checkpointer.steps() == []


def test_divergence_stops_naming_epoch_and_step_and_keeps_the_good_checkpoint(tmp_path):
    train.fit(train.Config(epochs=2, optimizer="sgd", learning_rate=0.05, model=SMALL), tmp_path, log=None)
    good = train.restore(tmp_path)
    with pytest.raises(train.NonFiniteError, match=r"training diverged: .* at epoch 3, step \d+") as error:
        train.fit(train.Config(epochs=4, optimizer="sgd", learning_rate=1e9, model=SMALL), tmp_path, log=None)
    assert error.value.epoch == 3 and error.value.step > int(good.step)
    assert "the last good checkpoint (step 90) is kept" in str(error.value)
    assert_bitwise_equal(train.restore(tmp_path), good)
    assert [r["epoch"] for r in train.read_metrics(tmp_path)] == [1, 2]
    assert train.read_config(tmp_path).learning_rate == 0.05  # the failed resume did not replace the config
    assert all(np.isfinite(leaf).all() for leaf in leaves(train.restore(tmp_path)))


def test_synthetic_data_trains(tmp_path):
    # a tiny model (one 3x3 convolution, pooling, a dense layer): the data set's path through fit, not mnist_cnn
    config = train.Config(
        dataset="synthetic", model="image_folders:tiny", epochs=2, optimizer="adam", learning_rate=1e-2, batch_size=64
    )
    state, history = train.fit(config, None, log=None)
    assert history[-1]["test_accuracy"] > 0.5


def test_images_the_model_cannot_take_are_a_clear_error():
    with pytest.raises(ValueError, match=r"model lenet5 cannot take digits images of shape \(8, 8, 1\)"):
        train.fit(train.Config(model="lenet5"), None, log=None)


def test_labels_beyond_the_model_outputs_are_an_error():
    data = jc.data.load("synthetic", shape=(8, 8, 1), num_classes=3, sizes=(12, 6))
    wrong = jc.data.Dataset(data.name, data.x_train, data.y_train + 5, data.x_test, data.y_test, 3)
    message = r"train labels must lie in \[0, 3\) \(the model.s 3 outputs\); found 7 at index"
    with pytest.raises(ValueError, match=message):
        train.fit(train.Config(dataset="synthetic", epochs=1), None, data=wrong, log=None)


def test_results_do_not_depend_on_64_bit_mode():
    """fit runs in 32-bit mode whatever jax_enable_x64 says (the tests turn it on; the command leaves it off)."""
    config = train.Config(epochs=1, schedule="cosine", optimizer="adam", learning_rate=1e-3, model=SMALL)
    with jax.enable_x64(False):
        narrow, _ = train.fit(config, None, log=None)
    assert jax.config.jax_enable_x64
    wide, _ = train.fit(config, None, log=None)
    assert_bitwise_equal(narrow, wide)


def test_a_cosine_run_in_stages_matches_one_run_with_the_same_horizon(tmp_path):
    config = train.Config(epochs=3, schedule="warmup_cosine", schedule_epochs=3, optimizer="adam", learning_rate=1e-3)
    config = config.replace(model=SMALL)
    straight, _ = train.fit(config, None, log=None)
    train.fit(config.replace(epochs=1), tmp_path, log=None)
    staged, _ = train.fit(config, tmp_path, log=None)
    assert_bitwise_equal(staged, straight)


def test_resume_refuses_other_data(straight_run):
    workdir, _, _ = straight_run
    with pytest.raises(ValueError, match="data differ from those checkpoint .* was trained on"):
        train.fit(SHORT.replace(epochs=5, normalize=False), workdir, log=None)
    assert train.read_config(workdir) == SHORT


def test_more_steps_than_the_step_counter_holds_is_an_error():
    with pytest.raises(ValueError, match="exceeds the int32 step counter"):
        train.fit(train.Config(epochs=2**26, batch_size=32), None, log=None)


def test_an_in_memory_run_resumes_mid_epoch_bit_for_bit(tmp_path):
    import shutil

    dataset = jc.data.load("synthetic", shape=(8, 8, 1), num_classes=3, sizes=(40, 8))
    config = train.Config(
        dataset="synthetic", model="image_folders:tiny", epochs=2, batch_size=8, checkpoint_every=2, keep=10
    )
    straight, history = train.fit(config, None, data=dataset, log=None)
    train.fit(config, tmp_path, data=dataset, log=None)
    for step in (8, 10):  # keep steps 2, 4, 5 and 6 (epoch 2, batch 1 of 5): as if killed after its save
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    lines = []
    resumed, again = train.fit(config, tmp_path, data=dataset, log=lines.append)
    assert "from epoch 2, batch 1 of 5 (step 6)" in lines[1]
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
        assert np.array_equal(a, b)
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in history]
