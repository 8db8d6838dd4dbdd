"""Training diagnostics: early stopping (--early-stopping) and per-layer gradient norms and update ratios
(--log-grad-norms) in metrics.jsonl."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn import data, models, nn, train
from jaxcnn.train.progress import early_stopping_epoch
from jaxcnn.train.step import layer_norms, layer_order

NAN = float("nan")


@pytest.mark.parametrize(
    ("losses", "patience", "expected"),
    [
        ([1.0, 0.9, 0.8, 0.7], 1, None),  # always improving: never stops
        ([1.0, 0.9, 0.95], 1, 3),  # one epoch without improvement
        ([1.0, 0.9, 0.95, 0.96, 0.97], 2, 4),  # best at 2, two epochs after it
        ([1.0, 0.9, 0.95, 0.85, 0.86, 0.87, 0.88], 3, 7),  # a late improvement resets the count
        ([1.0, 0.9, 0.9], 1, 3),  # equal is not an improvement
        ([NAN, NAN], 2, 2),  # NaN never improves on the start
        ([None, 1.0, 2.0], 1, 1),  # a missing loss neither: the first epoch already counts as one without
        ([1.0, 2.0, 3.0], 5, None),  # not enough epochs yet
        ([1.0, 2.0, 3.0], None, None),  # switched off
    ],
)
def test_early_stopping_epoch_on_scripted_losses(losses, patience, expected):
    assert early_stopping_epoch(losses, patience) == expected


def test_fit_stops_early_and_a_resumed_run_stays_stopped(tmp_path, monkeypatch):
    """A scripted test-loss sequence (evaluate is replaced): the run stops at the right epoch, says why, and
    asking it for more epochs trains nothing."""
    scripted = iter([0.5, 0.4, 0.45, 0.41, 0.42, 0.1, 0.1])

    def fake_evaluate(self, state):
        return {"loss": next(scripted), "accuracy": 0.5, "count": 1}

    monkeypatch.setattr(train.feed.Replicas, "evaluate", fake_evaluate)
    config = train.Config(epochs=7, early_stopping=3, learning_rate=0.01, batch_size=64)
    digits = data.load("digits")
    few = dataclasses.replace(digits, x_train=digits.x_train[:128], y_train=digits.y_train[:128])  # 2 steps an epoch
    lines = []
    state, history = train.fit(config, tmp_path, data=few, log=lines.append)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]  # best 0.4 at epoch 2, no improvement in 3-5
    assert "early stopping at epoch 5" in lines[-1] and "best 0.4000 at epoch 2" in lines[-1]
    lines = []
    again, history = train.fit(config.replace(epochs=9), tmp_path, data=few, log=lines.append)
    assert len(history) == 5 and "already stopped at epoch 5" in lines[-1]
    assert int(again.step) == int(state.step)


def test_early_stopping_is_validated():
    with pytest.raises(ValueError, match="early_stopping must be an int >= 1"):
        train.Config(early_stopping=0)


def test_layer_norms_and_their_order():
    model = models.get("mnist_cnn")
    params, _ = model.init(jax.random.key(0), (8, 8, 1))
    norms = layer_norms(params)
    assert set(norms) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
    expected = np.sqrt(np.sum(np.square(params["Conv_1"]["kernel"])) + np.sum(np.square(params["Conv_1"]["bias"])))
    np.testing.assert_allclose(norms["Conv_1"], expected, rtol=1e-6)
    assert [n for n in layer_order(model) if n in norms] == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    resnet = models.get("resnet20_cifar")
    shapes = jax.eval_shape(lambda k: resnet.init(k, (32, 32, 3))[0], jax.random.key(0))
    nested = set(jax.eval_shape(layer_norms, shapes))  # the names alone: traced, nothing compiled
    ordered = [n for n in layer_order(resnet) if n in nested]
    assert set(ordered) == nested and len(ordered) > 20  # every layer found, in forward order


def test_step_reports_grad_norms_and_update_ratios():
    with jax.enable_x64(False):
        model = nn.Sequential([nn.Conv2D(3, 3, padding="VALID"), nn.ReLU(), nn.Flatten(), nn.Dense(2)])
        optimizer = optax.sgd(0.1)
        state = train.create_train_state(model, optimizer, jax.random.key(0), (5, 5, 1))
        params = jax.tree.map(np.asarray, state.params)
        x = jax.random.normal(jax.random.key(1), (4, 5, 5, 1))
        y = jnp.array([0, 1, 0, 1])
        grads = jax.grad(lambda p: train.step.softmax_cross_entropy(model.apply(p, {}, x)[0], y))(state.params)
        new, metrics = train.make_train_step(model, log_grad_norms=True)(state, x, y)
        for name in ("Conv_0", "Dense_0"):
            # float32: the step's gradients come from a jitted program, which rounds otherwise than this eager jax.grad
            np.testing.assert_allclose(metrics["grad_norms"][name], layer_norms(grads)[name], rtol=1e-5)
            weight = np.sqrt(sum(np.sum(np.square(a)) for a in jax.tree.leaves(params[name])))
            np.testing.assert_allclose(
                metrics["update_ratios"][name], 0.1 * metrics["grad_norms"][name] / weight, rtol=1e-5
            )


def test_fit_writes_grad_norms_in_layer_order(tmp_path):
    _, history = train.fit(train.Config(epochs=1, log_grad_norms=True), tmp_path, log=None)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record == history[-1]
    assert list(record["grad_norms"]) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    assert all(value > 0 for value in record["grad_norms"].values())
    assert all(0 < value < 1 for value in record["update_ratios"].values())


def test_the_cli_flags(tmp_path, capsys):
    from jaxcnn.cli import main

    workdir = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--log-grad-norms", "--early-stopping", "2", "--workdir", str(workdir)]) == 0
    saved = train.read_config(workdir)
    assert saved.log_grad_norms is True and saved.early_stopping == 2
    assert "grad_norms" in train.read_metrics(workdir)[-1]
    assert main(["plot", "--workdir", str(workdir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-2:] == [str(workdir / "curves.png"), str(workdir / "grad_norms.png")]
    assert (workdir / "grad_norms.png").stat().st_size > 10_000
    assert main(["train", "--early-stopping", "0", "--workdir", str(tmp_path / "bad")]) == 2
    assert "--early-stopping must be an int >= 1" in capsys.readouterr().err
