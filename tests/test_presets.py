"""The ImageNet recipe (issue 15, item 9): `jaxcnn train --preset imagenet-resnet50`, laid under the flags given;
label smoothing (the softmax cross-entropy's option, its hand-derived VJP, the train and eval steps' loss); weight
decay on kernels only (a mask that keeps the optimizer state's structure)."""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn as jc
import jaxcnn.functional as F
from conftest import DTYPES, assert_trees_close, normal, relative_error
from jaxcnn import _train_flags, backprop, cli, gradcheck, train
from jaxcnn.train.config import Config, ConfigError, decayed_leaves, ignored_fields, make_loss, make_optimizer
from jaxcnn.train.run import step_options

PRESET = "imagenet-resnet50"
ROOT = "/data/imagenet"


def resolve(given, saved=None, preset=PRESET):
    notes = []
    return _train_flags.resolve(given, saved, notes.append, preset=preset), notes


# -- the preset ------------------------------------------------------------------------------------------------

RECIPE = {
    "model": "resnet50",
    "dataset": "folder",
    "image_size": 224,
    "optimizer": "nesterov",
    "momentum": 0.9,
    "learning_rate": 0.1,
    "batch_size": 256,
    "schedule": "warmup_cosine",
    "warmup_epochs": 5,
    "label_smoothing": 0.1,
    "weight_decay": 1e-4,
    "decay_norms_and_biases": False,
    "dtype": "bfloat16",
    "epochs": 90,
}


def test_the_preset_is_the_recipe():
    config, notes = resolve({"data_dir": ROOT})
    assert {name: getattr(config, name) for name in RECIPE} == RECIPE and config.data_dir == ROOT
    assert notes == []  # nothing inferred, nothing dropped
    assert jc.train.presets.PRESETS[PRESET].config(data_dir=ROOT) == config  # the same in Python
    untouched = set(Config.__dataclass_fields__) - set(RECIPE) - {"data_dir"}
    assert all(getattr(config, name) == getattr(Config(), name) for name in untouched)


# a value other than the recipe's for every field it sets
OTHER = {
    "model": "resnet18_cifar",
    "dataset": "cifar10",
    "image_size": 160,
    "optimizer": "adamw",
    "momentum": 0.8,
    "learning_rate": 0.3,
    "batch_size": 128,
    "schedule": "cosine",
    "warmup_epochs": 2,
    "label_smoothing": 0.0,
    "weight_decay": 5e-5,
    "decay_norms_and_biases": True,
    "dtype": "float32",
    "epochs": 30,
}


@pytest.mark.parametrize("field", sorted(OTHER))
def test_every_setting_yields_to_its_flag(field):
    given = {"data_dir": ROOT, "schedule": "warmup_cosine", "optimizer": "nesterov", field: OTHER[field]}
    config, _ = resolve(given)
    assert getattr(config, field) == OTHER[field]
    expected_rate = 0.3 if field == "learning_rate" else 0.1 * config.batch_size / 256
    assert config.learning_rate == pytest.approx(expected_rate)
    assert all(getattr(config, name) == RECIPE[name] for name in RECIPE if name not in (*given, "learning_rate"))


def test_the_learning_rate_follows_the_batch_size_unless_given():
    config, notes = resolve({"data_dir": ROOT, "batch_size": 1024})
    assert config.learning_rate == 0.4
    assert notes == [
        f"jaxcnn train: note: --preset {PRESET} scales the learning rate with the batch size: --learning-rate 0.4 "
        "(0.1 x 1024/256)"
    ]
    assert resolve({"data_dir": ROOT, "batch_size": 64})[0].learning_rate == 0.025
    config, notes = resolve({"data_dir": ROOT, "batch_size": 1024, "learning_rate": 0.25})
    assert config.learning_rate == 0.25 and notes == []
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1, got 0"):  # not a learning-rate error
        resolve({"data_dir": ROOT, "batch_size": 0})


def test_a_preset_flag_the_run_ignores_is_not_warned_about_but_a_typed_one_is():
    config, notes = resolve({"model": "mnist_cnn", "dataset": "digits"})
    assert (config.dataset, config.image_size, config.label_smoothing) == ("digits", 224, 0.1) and notes == []
    config, notes = resolve({"data_dir": ROOT, "weight_decay": 0.0, "decay_norms_and_biases": True})
    assert not config.decay_norms_and_biases  # dropped: the preset's value stays
    assert notes == [
        "jaxcnn train: warning: --decay-norms-and-biases has no effect with --weight-decay 0.0 (ignored, not saved)"
    ]


@pytest.mark.parametrize(
    "given,saved,preset,message",
    [
        ({}, None, "imagenet", "unknown preset 'imagenet'; known: imagenet-resnet50"),
        ({"data_dir": ROOT}, Config(), PRESET, f"--preset {PRESET} only starts runs, and this workdir holds one"),
        ({}, None, PRESET, f"--preset {PRESET} trains on an image folder: give --data-dir ROOT"),
        ({"data_path": "x.npz"}, None, PRESET, None),  # --data-path implies npz, which the preset does not override
    ],
)
def test_refused(given, saved, preset, message):
    if message is None:
        assert resolve(given, saved, preset)[0].dataset == "npz"
        return
    with pytest.raises(ValueError, match=message) as error:
        resolve(given, saved, preset)
    assert "\n" not in str(error.value)


def test_the_command_refuses_a_preset_on_a_workdir_that_holds_a_run_and_lists_presets(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    saved = Config(epochs=2).to_json()
    (workdir / "config.json").write_text(saved)
    assert cli.main(["train", "--preset", PRESET, "--data-dir", str(tmp_path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only starts runs" in err
    assert (workdir / "config.json").read_text() == saved and sorted(p.name for p in workdir.iterdir()) == [
        "config.json"
    ]
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert f"Presets: {PRESET}: ResNet-50" in " ".join(capsys.readouterr().out.split())


def test_the_command_gives_fit_the_preset_under_its_flags(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_fit(config, workdir, **kwargs):
        calls.append(config)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(train, "fit", fake_fit)
    flags = ["--preset", PRESET, "--model", "mnist_cnn", "--dataset", "digits", "--epochs", "1", "--batch-size", "64"]
    assert cli.main(["train", *flags, "--workdir", str(tmp_path / "w"), "--no-progress"]) == 2
    (config,) = calls
    assert (config.model, config.dataset, config.epochs, config.batch_size) == ("mnist_cnn", "digits", 1, 64)
    assert (config.learning_rate, config.label_smoothing, config.dtype) == (0.025, 0.1, "bfloat16")
    assert "--learning-rate 0.025 (0.1 x 64/256)" in capsys.readouterr().err


# -- label smoothing: the loss and its hand-derived VJP --------------------------------------------------------


def smoothed_reference(logits, labels, e):
    """The smoothed cross-entropy written out in NumPy float64: targets ``(1 - e) onehot + e / K``."""
    z = np.asarray(logits, np.float64)
    log_probs = z - z.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    targets = (1 - e) * np.eye(z.shape[1])[np.asarray(labels)] + e / z.shape[1]
    return -np.mean(np.sum(targets * log_probs, axis=1))


@functools.partial(jax.jit, static_argnames="e")
def loss_and_cotangents(logits, labels, e):
    """The loss, and for dloss 0.37 the hand VJP next to jax.vjp's, in one compiled program per case."""
    loss, pullback = jax.vjp(lambda z: F.softmax_cross_entropy(z, labels, label_smoothing=e), logits)
    hand, no_labels = F.softmax_cross_entropy_vjp(logits, labels, 0.37, label_smoothing=e)
    assert no_labels is None
    return loss, hand, pullback(jnp.asarray(0.37, loss.dtype))[0]


@pytest.mark.sample(2)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("batch,classes,e", [(1, 2, 0.1), (5, 10, 0.5), (4, 1000, 0.9)])
def test_smoothed_cross_entropy_and_its_vjp(batch, classes, e, dtype):
    logits = 4 * normal(batch, (batch, classes), dtype)
    labels = jnp.asarray(np.random.default_rng(classes).integers(0, classes, batch))
    loss, hand, autodiff = loss_and_cotangents(logits, labels, e)
    # float32: the log-sum-exp rounds at the size of the logits, large against a small loss
    assert float(loss) == pytest.approx(
        smoothed_reference(logits, labels, e), rel=1e-12 if dtype == jnp.float64 else 1e-5
    )
    assert hand.dtype == dtype
    assert_trees_close(hand, autodiff, dtype, "smoothed xent")


def test_smoothed_cross_entropy_against_finite_differences():
    logits, labels = normal(0, (3, 5)), jnp.array([0, 4, 2])
    report = gradcheck.check_op(F.softmax_cross_entropy, logits, labels, label_smoothing=0.2)
    assert report.ok and any("finite" in check.method for check in report.checks), report.table()


def test_no_smoothing_is_the_plain_loss_bit_for_bit():
    logits, labels = normal(1, (6, 4), jnp.float32), jnp.array([0, 1, 2, 3, 0, 1])

    @jax.jit
    def both(logits, labels):
        plain = F.softmax_cross_entropy(logits, labels), F.softmax_cross_entropy_vjp(logits, labels)[0]
        zero = (
            F.softmax_cross_entropy(logits, labels, label_smoothing=0.0),
            F.softmax_cross_entropy_vjp(logits, labels, label_smoothing=0)[0],
        )
        return plain, zero, F.softmax_cross_entropy(logits, labels, label_smoothing=0.3)

    plain, zero, smoothed = both(logits, labels)
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero, strict=True)) and smoothed != plain[0]


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.1", float("nan")])
def test_a_bad_smoothing_is_refused_in_one_line(bad):
    logits, labels = normal(1, (2, 3)), jnp.array([0, 1])
    for op in (F.softmax_cross_entropy, F.softmax_cross_entropy_vjp):
        with pytest.raises(ValueError, match=r"`label_smoothing` must be a number in \[0, 1\)"):
            op(logits, labels, label_smoothing=bad)
    with pytest.raises(ConfigError, match=r"label_smoothing must be a number in \[0, 1\)"):
        Config(label_smoothing=bad)


def filled(model, input_shape, seed=0):
    """``(params, state)`` of ``model`` in float32, drawn from a normal distribution without running its init
    eagerly (only its shapes are traced)."""
    shapes = jax.eval_shape(lambda key: model.init(key, input_shape, dtype=jnp.float32), jax.random.key(0))
    leaves, tree = jax.tree.flatten(shapes)
    return jax.tree.unflatten(tree, [normal(seed + i, leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)])


def tiny_model():
    return jc.nn.Sequential([jc.nn.Dense(3)])


def test_the_train_step_loss_is_smoothed_in_every_gradient_mode_and_dtype():
    from jaxcnn.train.step import loss_and_grads_fn

    loss_fn = step_options(Config(label_smoothing=0.2)).loss_fn
    assert isinstance(loss_fn, functools.partial) and loss_fn.keywords == {"label_smoothing": 0.2}
    model = tiny_model()
    params, state = filled(model, (5,), seed=0)
    x, y = normal(2, (6, 5), jnp.float32), jnp.array([0, 1, 2, 0, 1, 2])
    # the three modes in float32; in bfloat16 (the loss and its hand VJP taken in float32) the engine, against the
    # float32 gradients within bf16 rounding
    runs = [(mode, "float32") for mode in jc.backprop.GRADIENTS] + [("engine", "bfloat16")]

    @jax.jit
    def every_run(params, x, y):
        results = {}
        for mode, dtype in runs:
            step = loss_and_grads_fn(model, loss_fn, mode, dtype=None if dtype == "float32" else dtype)
            results[f"{mode} {dtype}"] = step(params, state, x, y, None)
        return results

    results = every_run(params, x, y)
    reference = results["autodiff float32"]
    for mode, dtype in runs:
        result = results[f"{mode} {dtype}"]
        expected = F.softmax_cross_entropy(result.predictions.astype(jnp.float32), y, label_smoothing=0.2)
        # bf16: XLA may keep the logits in float32 where the loss reads them (excess precision)
        assert float(result.loss) == pytest.approx(float(expected), rel=1e-6 if dtype == "float32" else 1e-3)
        tolerance = 1e-4 if dtype == "float32" else 2e-2
        for a, b in zip(jax.tree.leaves(result.grads), jax.tree.leaves(reference.grads), strict=True):
            assert relative_error(a, b) <= tolerance, (mode, dtype)


def test_the_hand_vjp_of_a_bound_loss_is_found():
    vjp = backprop.loss_vjp_of(make_loss(Config(label_smoothing=0.3)))
    logits, labels = normal(3, (4, 5)), jnp.array([1, 2, 3, 4])
    found, expected = jax.jit(
        lambda z, y: (vjp(z, y, 0.5), F.softmax_cross_entropy_vjp(z, y, 0.5, label_smoothing=0.3)[0])
    )(logits, labels)
    assert np.array_equal(found, expected)
    assert make_loss(Config()) is F.softmax_cross_entropy


@pytest.mark.parametrize("path", ["in memory", "streamed", "ensemble", "data parallel"])
def test_the_run_train_and_eval_steps_take_the_run_loss(path, monkeypatch):
    """Every path of the run's compiled steps gets the smoothed loss, for the train step and the test loss."""
    from jaxcnn.train import data_parallel, ensemble
    from jaxcnn.train import run as run_module

    losses = {}

    def record(kind):
        def factory(model, *args, **kwargs):
            options = kwargs.get("options", args[-1] if args else None)
            losses[kind] = options.loss_fn if kind == "train" else kwargs["loss_fn"]
            return kind

        return factory

    for module, train_name, eval_name in (
        (run_module, "make_train_step", "make_eval_step"),
        (ensemble, "make_ensemble_train_step", "make_ensemble_eval_step"),
        (data_parallel, "make_data_parallel_train_step", "make_data_parallel_eval_step"),
    ):
        monkeypatch.setattr(module, train_name, record("train"))
        monkeypatch.setattr(module, eval_name, record("eval"))
    monkeypatch.setattr(run_module, "_CACHE", {})  # these stand-in steps are shared with no other test
    config = Config(label_smoothing=0.3, ensemble=2 if path == "ensemble" else 1)
    run = types.SimpleNamespace(
        config=config,
        model=tiny_model(),
        steps_per_epoch=1,
        input_scaling=None,
        streamed=path == "streamed",
        privacy=None,
    )
    mesh = ("a mesh",) if path == "data parallel" else None
    assert run_module.compiled_steps(run, mesh) == ("train", "eval")
    for kind in ("train", "eval"):
        assert isinstance(losses[kind], functools.partial), kind
        assert losses[kind].func is F.softmax_cross_entropy and losses[kind].keywords == {"label_smoothing": 0.3}


# -- weight decay on kernels only ------------------------------------------------------------------------------


def bn_model():
    return jc.nn.Sequential(
        [
            jc.nn.Conv2D(4, 3, padding="SAME"),
            jc.nn.BatchNorm(),
            jc.nn.ReLU(),
            jc.nn.Conv2D(4, 3),
            jc.nn.GroupNorm(2),
            jc.nn.Flatten(),
            jc.nn.LayerNorm(),
            jc.nn.Dense(3),
        ]
    )


def paths(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_the_mask_picks_the_kernels_of_resnet50():
    shapes = jax.eval_shape(lambda key: jc.models.build("resnet50", 1000).init(key, (224, 224, 3)), jax.random.key(0))
    mask = paths(decayed_leaves(shapes[0]))
    assert sum(mask.values()) == 54 and len(mask) == 161  # 53 convolutions and the classifier's kernel
    assert all(decayed == path.endswith("['kernel']") for path, decayed in mask.items())


def bn_params():
    """The parameters of :func:`bn_model`, all 0.5 (no zero parameter: each decayed one moves)."""
    return jax.tree.map(lambda leaf: jnp.full_like(leaf, 0.5), filled(bn_model(), (6, 6, 2))[0])


def test_weight_decay_leaves_out_norms_and_biases():
    params = bn_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    cases = [(optimizer, everything) for optimizer in ("nesterov", "adamw") for everything in (True, False)]
    transforms = {}
    for optimizer, everything in cases:
        config = Config(optimizer=optimizer, learning_rate=1.0, weight_decay=0.5, schedule="constant")
        transforms[f"{optimizer} {everything}"] = make_optimizer(config.replace(decay_norms_and_biases=everything), 1)[
            0
        ]

    @jax.jit
    def updates(params):
        return {name: tx.update(zeros, tx.init(params), params)[0] for name, tx in transforms.items()}

    for name, update in updates(params).items():
        moved = {path: bool(jnp.any(u != 0)) for path, u in paths(update).items()}
        kernels = {path for path in moved if path.endswith("['kernel']")}
        assert len(kernels) == 3 and any("BatchNorm" in path for path in moved) and any("bias" in p for p in moved)
        assert {path for path, on in moved.items() if on} == (set(moved) if name.endswith("True") else kernels), name


def test_the_mask_keeps_the_optimizer_state_and_the_old_updates():
    """Either value gives one state structure with the leaf paths of the chain before the mask existed (so old
    checkpoints restore), and decaying everything updates bit for bit as that chain did."""
    params = bn_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    config = Config(schedule="constant", weight_decay=1e-2)
    states = {}
    for everything in (True, False):
        tx, schedule = make_optimizer(config.replace(decay_norms_and_biases=everything), 1)
        states[everything] = tx.init(params)
    old = optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(schedule, momentum=0.9, nesterov=True))
    assert jax.tree.structure(states[True]) == jax.tree.structure(states[False])
    assert set(paths(states[True])) == set(paths(old.init(params)))
    tx, _ = make_optimizer(config, 1)

    @jax.jit
    def both(grads, params):
        return tx.update(grads, tx.init(params), params)[0], old.update(grads, old.init(params), params)[0]

    ours, theirs = both(grads, params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True))


def test_an_old_config_without_the_new_fields_keeps_their_defaults():
    values = json.loads(Config().to_json())
    del values["label_smoothing"], values["decay_norms_and_biases"]
    config = Config.from_dict(values)
    assert (config.label_smoothing, config.decay_norms_and_biases) == (0.0, True)
    assert "decay_norms_and_biases" in ignored_fields(Config(weight_decay=0.0))
