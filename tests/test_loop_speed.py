"""The loop's fast paths change no bits: batches gathered on the device are the host path's batches, the
periodic loss reads leave the newest step alone, and the test labels are checked once per run."""

import jax
import numpy as np
import pytest

from jaxcnn import data as data_lib
from jaxcnn import train
from jaxcnn.train import feed
from jaxcnn.train.progress import LossWatch


@pytest.mark.parametrize("n,size,start", [(10, 3, 0), (10, 3, 2), (12, 4, 0), (7, 7, 0), (5, 8, 0), (9, 2, 4)])
def test_batches_gathered_on_the_device_are_the_host_batches(n, size, start):
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3, 1)
    y = np.arange(n, dtype=np.int32) % 3
    key = jax.random.key(4)
    with jax.enable_x64(False):  # as fit runs
        on_device = jax.device_put((x, y))
        device = [tuple(map(np.asarray, b)) for b in feed.device_batches(*on_device, size, key=key, skip=start)]
        host = [tuple(map(np.asarray, b)) for b in data_lib.batches(x, y, size, key=key, skip=start)]
    assert len(device) == len(host) == data_lib.num_batches(n, size) - start
    for (dx, dy), (hx, hy) in zip(device, host, strict=True):
        assert dx.dtype == hx.dtype and dy.dtype == hy.dtype
        np.testing.assert_array_equal(dx, hx)
        np.testing.assert_array_equal(dy, hy)


def test_fit_gives_the_same_bits_with_the_training_set_on_the_device_or_on_the_host(monkeypatch, tmp_path):
    config = train.Config(model="models_for_tests:small_digits_cnn", epochs=2, batch_size=200, keep=1)
    on_device, history = train.fit(config, tmp_path / "device", log=None)
    monkeypatch.setattr(feed, "ON_DEVICE_BYTES", 0)  # every batch gathered on the host and sent
    on_host, host_history = train.fit(config, tmp_path / "host", log=None)
    same = lambda s: (s.params, s.model_state, s.opt_state, jax.random.key_data(s.key))  # noqa: E731
    for a, b in zip(jax.tree.leaves(same(on_device)), jax.tree.leaves(same(on_host)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in host_history]


def test_a_periodic_loss_read_leaves_the_newest_step_pending():
    watch = LossWatch(epoch=1, step=0, checkpointer=None)
    for k in range(4):
        watch.add({"loss": np.float32(k), "count": np.int32(2)})
    assert watch.check(keep=1) == 2.0 and watch.pending == 1 and watch.step == 3
    assert watch.check() == 3.0 and watch.pending == 0 and watch.step == 4


def test_the_test_labels_are_checked_once_per_run(monkeypatch):
    import importlib

    evaluate_module = importlib.import_module("jaxcnn.train.evaluate")  # jaxcnn.train.evaluate is also a function

    calls = []
    real = evaluate_module.check_class_labels
    monkeypatch.setattr(evaluate_module, "check_class_labels", lambda *a: calls.append(1) or real(*a))
    config = train.Config(model="models_for_tests:small_digits_cnn", epochs=3, batch_size=400)
    train.fit(config, log=None)
    assert len(calls) == 1


def test_a_background_checkpoint_is_read_back_whole_and_the_next_save_waits_for_it(tmp_path):
    import optax

    from jaxcnn.train.checkpoint import Checkpointer
    from models_for_tests import small_digits_cnn

    model = small_digits_cnn()
    state = train.create_train_state(model, optax.sgd(0.1, 0.9), jax.random.key(0), (8, 8, 1))
    writer = Checkpointer(tmp_path, keep=2, background=True)
    writer.save(state, {"epoch": 1})
    later = state.replace(step=state.step + 1, params=jax.tree.map(lambda a: a + 1, state.params))
    writer.save(later, {"epoch": 2})  # waits for the first write before it starts
    assert writer.steps() == [0, 1]  # a read waits for the write in flight
    restored, meta = writer.restore(state)
    assert meta["epoch"] == 2
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(later.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    writer.close()


def test_a_background_save_returns_while_orbax_writes_and_its_failure_is_raised_by_finish(tmp_path, monkeypatch):
    """The caller does not wait for orbax (its own async save still took ~10 ms of the caller's time per save):
    save() returns while the write is held; finish() waits for it; a write that fails is one CheckpointError,
    raised by finish(), and the earlier checkpoint is kept."""
    import threading

    import optax

    from jaxcnn.train.checkpoint import Checkpointer, CheckpointError
    from models_for_tests import small_digits_cnn

    state = train.create_train_state(small_digits_cnn(), optax.sgd(0.1), jax.random.key(0), (8, 8, 1))
    writer = Checkpointer(tmp_path, keep=3, background=True)
    writer.save(state, {"epoch": 1})
    writer.finish()
    manager = writer._open()
    release, entered, real_save = threading.Event(), threading.Event(), manager.save

    def held_save(*args, **kwargs):
        entered.set()
        assert release.wait(60)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(manager, "save", held_save)
    try:
        writer.save(state.replace(step=state.step + 1), {"epoch": 2})  # returns with the write held in its thread
        assert entered.wait(60) and not (tmp_path / "1").exists()
    finally:
        release.set()
    writer.finish()
    assert writer.steps() == [0, 1]

    def failing_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager, "save", failing_save)
    writer.save(state.replace(step=state.step + 2), {"epoch": 3})  # the failure is not raised here
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint .*2: .*the previous checkpoints are kept$"):
        writer.finish()
    writer.finish()  # raised once
    assert writer.steps() == [0, 1]
    writer.close()
