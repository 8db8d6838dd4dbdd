"""Training models with state (BatchNorm) and branches: ResNets from the command line, BatchNorm statistics
checkpointed and resumed bit for bit, and the gradient check of the ResNets from the command line."""

import jax
import numpy as np
import pytest

from data_files import write_cifar
from jaxcnn import cli, data, nn, train


def tiny_bn_net(num_classes: int = 10) -> nn.Sequential:
    block = nn.Sequential([nn.Conv2D(4, 3, padding=1, use_bias=False), nn.BatchNorm(momentum=0.9), nn.ReLU()])
    return nn.Sequential(
        [nn.Conv2D(4, 3, padding=1), nn.BatchNorm(momentum=0.9), nn.ReLU(), nn.Residual(block), nn.Dropout(0.2),
         nn.GlobalAvgPool2D(), nn.Dense(num_classes)]
    )  # fmt: skip


def leaves(state):
    tree = (state.params, state.model_state, state.opt_state, state.step)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_batchnorm_statistics_are_checkpointed_and_resumed_bit_for_bit(tmp_path):
    """A user's own model (fit(model=...)): trained, resumed and restored bit for bit; another model refused."""
    dataset = data.load("synthetic", shape=(8, 8, 3), num_classes=10, sizes=(40, 12))
    config = train.Config(dataset="synthetic", epochs=3, batch_size=16, gradients="engine")
    straight, _ = train.fit(config, None, model=tiny_bn_net(), data=dataset, log=None)
    train.fit(config.replace(epochs=1), tmp_path, model=tiny_bn_net(), data=dataset, log=None)
    wider = nn.Sequential([nn.Conv2D(5, 3, padding=1), nn.BatchNorm(), nn.ReLU(), nn.GlobalAvgPool2D(), nn.Dense(10)])
    with pytest.raises(ValueError, match=r"does not match .*differ at array 0 \(checkpoint: .*\(4,\) .*\(5,\)"):
        train.fit(config, tmp_path, model=wider, data=dataset, log=None)
    resumed, history = train.fit(config, tmp_path, model=tiny_bn_net(), data=dataset, log=None)
    for a, b in zip(leaves(straight), leaves(resumed), strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"was trained with a model object .*restore\(workdir, model=\.\.\.\)"):
        train.restore(tmp_path)
    restored = train.restore(tmp_path, model=tiny_bn_net())
    assert set(restored.model_state) == {"BatchNorm_0", "Residual_0"}
    for a, b in zip(leaves(restored), leaves(resumed), strict=True):
        assert np.array_equal(a, b)
    initial = train.create_train_state(tiny_bn_net(), train.make_optimizer(config, 3)[0], jax.random.key(0), (8, 8, 3))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), restored.model_state, initial.model_state)
    assert all(jax.tree.leaves(moved))  # training moved every running statistic
    assert len(history) == 3


def test_the_hand_modes_train_a_batchnorm_net_as_autodiff_does():
    dataset = data.load("synthetic", shape=(8, 8, 3), num_classes=10, sizes=(32, 8))
    config = train.Config(dataset="synthetic", epochs=1, batch_size=16, gradients="autodiff")
    reference, _ = train.fit(config, None, model=tiny_bn_net(), data=dataset, log=None)
    for gradients in ("manual", "engine"):
        state, _ = train.fit(config.replace(gradients=gradients), None, model=tiny_bn_net(), data=dataset, log=None)
        # float32: the hand rules sum in another order than autodiff (about 1e-7 relative per gradient), and two
        # momentum steps through BatchNorm's division by the batch spread grow that to about 1e-5
        for a, b in zip(leaves(state), leaves(reference), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=gradients)


@pytest.mark.slow
def test_train_resnet20_on_cifar10_files_from_the_command_line(tmp_path, capsys):
    write_cifar(tmp_path / "cifar", train_counts=(6,), test_count=3)
    workdir = tmp_path / "run"
    flags = ["--model", "resnet20_cifar", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar")]
    assert cli.main(["train", *flags, "--epochs", "1", "--batch-size", "4", "--workdir", str(workdir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("done: test accuracy")
    state = train.restore(workdir)
    assert len(jax.tree.leaves(state.model_state)) == 2 * 19  # mean and var of 19 BatchNorm layers
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.model_state))
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    assert "on 3 images" in capsys.readouterr().out


# the CLI's gradcheck of a whole autoencoder; the engine's mean squared error runs by default in test_backprop.py
@pytest.mark.slow
def test_gradcheck_command_on_the_autoencoder_uses_mean_squared_error(capsys):
    code = cli.main(["gradcheck", "--model", "conv_autoencoder", "--batch-size", "2", "--no-finite-differences"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ConvTranspose_1" in out and out.strip().endswith("all checks passed")


def test_autoencoders_are_not_trained_as_classifiers(capsys):
    assert cli.main(["train", "--model", "conv_autoencoder"]) == 2
    assert "reconstructs its input" in capsys.readouterr().err
