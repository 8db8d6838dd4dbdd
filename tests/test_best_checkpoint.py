"""Early stopping keeps the best checkpoint (issue 13, defect 7): the checkpoint of the lowest test loss is kept
next to the latest ones (a resume still starts from the latest), and ``restore``, ``load_model`` and
``jaxcnn eval`` read it by default and say so."""

import jax
import numpy as np
import optax
import pytest

import jaxcnn as jc
from jaxcnn import train
from jaxcnn.cli import main
from jaxcnn.train.checkpoint import Checkpointer

STEPS = 45  # steps per epoch of the digits at the default batch size
# a small user model: which checkpoints are kept and read is under test, the same for any model (mnist_cnn cost
# these two runs about 5 s of CPU)
SMALL = "models_for_tests:small_digits_cnn"


def script(monkeypatch, losses):
    """Replace the test-set evaluation of ``fit`` by the scripted ``losses``, one per epoch."""
    scripted = iter(losses)
    monkeypatch.setattr(train.feed.Replicas, "evaluate", lambda self, state: {"loss": next(scripted), "count": 1})


def leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.replace(key=jax.random.key_data(state.key)))]


def kept(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_an_early_stopped_run_keeps_and_reads_its_best_checkpoint(tmp_path, monkeypatch, capsys):
    """The test loss is best at epoch 2 and rises after: the run stops at epoch 4 with keep=1, and still holds
    epoch 2's checkpoint, which restore, load_model and eval read by default."""
    script(monkeypatch, [0.5, 0.3, 0.35, 0.4])
    config = train.Config(epochs=6, early_stopping=2, keep=1, model=SMALL)
    lines = []
    state, history = train.fit(config, tmp_path, log=lines.append)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert "(best 0.3000 at epoch 2; its checkpoint is kept, and eval and predict read it)" in lines[-1]
    assert kept(tmp_path) == [2 * STEPS, 4 * STEPS]  # the best, and the latest (keep=1)

    best = train.restore(tmp_path)
    assert int(best.step) == 2 * STEPS
    assert all(
        np.array_equal(a, b) for a, b in zip(leaves(best), leaves(train.restore(tmp_path, step=2 * STEPS)), strict=True)
    )
    assert all(
        np.array_equal(a, b) for a, b in zip(leaves(train.restore(tmp_path, step="latest")), leaves(state), strict=True)
    )
    _, _, _, meta = train.restore_run(tmp_path)
    assert meta["epoch"] == 2 and meta["chosen"] == "best test loss"

    model, params, model_state, preprocess = train.load_model(tmp_path)
    digits = jc.data.load("digits")
    accuracy = train.evaluate(model, params, model_state, digits.x_test, digits.y_test)["accuracy"]
    assert main(["eval", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {accuracy:.4f}" in out
    assert f"(checkpoint of epoch 2 (best test loss), step {2 * STEPS})" in out
    assert main(["eval", "--workdir", str(tmp_path), "--step", "latest"]) == 0
    assert f"(checkpoint of epoch 4 (latest), step {4 * STEPS})" in capsys.readouterr().out
    assert main(["predict", "--workdir", str(tmp_path), "--step", "best", _npy(tmp_path, digits)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}: checkpoint of epoch 2 (best test loss), step {2 * STEPS}")


def _npy(directory, digits):
    path = directory / "one.npy"
    np.save(path, digits.x_test[0])
    return str(path)


def test_a_run_resumes_from_its_latest_checkpoint_not_its_best(tmp_path, monkeypatch):
    script(monkeypatch, [0.5, 0.3, 0.4, 0.2])
    config = train.Config(epochs=3, early_stopping=3, keep=1, model=SMALL)
    train.fit(config, tmp_path, log=None)
    assert kept(tmp_path) == [2 * STEPS, 3 * STEPS]
    state, history = train.fit(config.replace(epochs=4), tmp_path, log=None)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4] and int(state.step) == 4 * STEPS
    assert kept(tmp_path) == [4 * STEPS]  # the new best is the latest: the old best goes
    assert train.restore_run(tmp_path)[3]["chosen"] == "best test loss"


def tiny_state(step):
    model = jc.nn.Sequential([jc.nn.Flatten(), jc.nn.Dense(2)])
    state = train.create_train_state(model, optax.sgd(0.1), jax.random.key(0), (2, 2, 1))
    return state.replace(step=jax.numpy.asarray(step, state.step.dtype))


@pytest.mark.parametrize(
    "losses, keep, best, steps",
    [
        ([0.5, 0.4, 0.45, 0.4, 0.42], 2, 2, [2, 4, 5]),  # equal losses: the earliest is the best, as early stopping
        ([0.5, None, float("nan"), 0.6], 1, 1, [1, 4]),  # no finite loss: never the best
        ([None, None, None], 1, None, [3]),  # none ranked: the latest only
        ([0.3, 0.2, 0.1], 2, 3, [2, 3]),  # improving: the best is among the latest
    ],
)
def test_checkpointer_keeps_the_latest_and_the_best(tmp_path, losses, keep, best, steps):
    with Checkpointer(tmp_path, keep=keep, best="test_loss") as checkpointer:
        for step, loss in enumerate(losses, start=1):
            checkpointer.save(tiny_state(step), {"epoch": step}, metrics={"test_loss": loss})
        assert checkpointer.steps() == steps and checkpointer.best_step() == best
    with Checkpointer(tmp_path, keep=keep, best="test_loss") as reopened:
        assert reopened.best_step() == best and reopened.latest_step() == len(losses)
