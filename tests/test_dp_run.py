"""jaxcnn train with DP-SGD (--dp-clip ...): epsilon in the log, metrics.jsonl and the final line, equal to the
accountant's figure recomputed with dp_accounting; exact resume with the privacy ledger; Poisson sampling; a
target epsilon met; every refused flag or combination one line with exit code 2."""

import contextlib
import io
import math
import types

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from jaxcnn import _train_flags, cli, train
from jaxcnn.data import poisson
from jaxcnn.train import dp_run, privacy
from jaxcnn.train.checkpoint import Checkpointer

N, BATCH, STEPS = 1437, 479, 3  # the digits' training set, a batch dividing it (one shape to compile), steps/epoch
RATE = BATCH / N
TINY = ["--model", "image_folders:tiny", "--batch-size", str(BATCH), "--optimizer", "sgd", "--no-progress"]
# the noise that spends epsilon 2 in one epoch: the target-epsilon run reuses the compiled step of the others
NOISE = privacy.noise_for_epsilon(2, sampling_rate=RATE, steps=STEPS, delta=1e-4, sampling="shuffle")
DP = ["--dp-clip", "1", "--dp-noise", repr(NOISE)]


def train_cli(workdir, *flags) -> tuple[int, list[str]]:
    """``jaxcnn train`` in this process: (exit code, stdout lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["train", *TINY, *flags, "--workdir", str(workdir)])
    return code, out.getvalue().splitlines()


def rdp_epsilon(event, neighbours) -> float:
    """Epsilon at delta 1e-4 straight from dp_accounting's RDP accountant (not through jaxcnn.train.privacy)."""
    accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=neighbours)
    return accountant.compose(event).get_epsilon(1e-4)


def state_leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves((state.params, state.opt_state, state.step))]


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """A 2-epoch DP run with the default (shuffle) sampling: the reference of most tests here."""
    workdir = tmp_path_factory.mktemp("dp") / "shuffled"
    code, lines = train_cli(workdir, *DP, "--epochs", "2")
    assert code == 0
    return workdir, lines


def test_epsilon_is_logged_written_and_reported(shuffled):
    workdir, lines = shuffled
    assert lines[1].startswith(f"DP-SGD: clip 1, noise {NOISE:.6g}, delta 0.0001, ghost norms; shuffled fixed batches")
    records = train.read_metrics(workdir)
    assert [r["delta"] for r in records] == [1e-4, 1e-4]
    epochs = [line for line in lines if line.startswith("epoch ")]
    for line, record in zip(epochs, records, strict=True):
        assert f"  epsilon {record['epsilon']:.4g} (delta 0.0001)  " in line
    assert lines[-1].endswith(f"(6 steps), epsilon {records[-1]['epsilon']:.4g} (delta 0.0001); workdir {workdir}")
    # shuffle: each started epoch is one Gaussian of sigma on an example (zero-out), E of them one of sigma/sqrt(E)
    zero_out = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    for epoch, record in enumerate(records, start=1):
        expected = rdp_epsilon(dp_event.GaussianDpEvent(NOISE / math.sqrt(epoch)), zero_out)
        assert record["epsilon"] == expected
        settings = dict(noise_multiplier=NOISE, sampling_rate=RATE, delta=1e-4, sampling="shuffle")
        assert record["epsilon"] == privacy.epsilon(steps=STEPS * epoch, **settings)


def test_resume_continues_params_and_ledger_bit_for_bit(shuffled, tmp_path):
    straight, _ = shuffled
    workdir = tmp_path / "resumed"
    assert train_cli(workdir, *DP, "--epochs", "1")[0] == 0  # stopped after epoch 1
    code, lines = train_cli(workdir, "--epochs", "2")  # resumed with the saved DP settings
    assert code == 0 and any(line.startswith("resuming") for line in lines)
    for a, b in zip(state_leaves(train.restore(workdir)), state_leaves(train.restore(straight)), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    ledgers = [Checkpointer(w / "checkpoints").read_meta(2 * STEPS)["privacy"] for w in (workdir, straight)]
    assert (
        ledgers[0]
        == ledgers[1]
        == dict(
            noise_multiplier=NOISE,
            sampling_rate=RATE,
            delta=1e-4,
            accountant="rdp",
            sampling="shuffle",
            steps=2 * STEPS,
        )
    )
    resumed, reference = train.read_metrics(workdir), train.read_metrics(straight)
    assert resumed == [dict(r, seconds=s["seconds"]) for r, s in zip(reference, resumed, strict=True)]


def test_poisson_sampling_is_accounted_as_poisson(tmp_path):
    code, lines = train_cli(tmp_path / "poisson", *DP, "--dp-sampling", "poisson", "--epochs", "1")
    assert code == 0
    padded = poisson.padded_batch_size(N, RATE, STEPS)
    assert f"Poisson sampling, rate 0.3333 (batches padded to {padded}, mean 479): the accountant's epsilon" in lines[1]
    (record,) = train.read_metrics(tmp_path / "poisson")
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(RATE, dp_event.GaussianDpEvent(NOISE)), STEPS)
    assert record["epsilon"] == rdp_epsilon(event, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    assert record["step"] == STEPS and record["train_accuracy"] is not None


def test_target_epsilon_is_met_and_fixes_the_epochs(tmp_path):
    workdir = tmp_path / "target"
    code, lines = train_cli(workdir, "--dp-clip", "1", "--dp-target-epsilon", "2", "--epochs", "1")
    assert code == 0
    assert f"noise {NOISE:.6g} (chosen for epsilon 2 over {STEPS} steps)" in lines[1]
    epsilon = train.read_metrics(workdir)[-1]["epsilon"]
    assert 2 * (1 - 1e-3) < epsilon <= 2
    code, _ = train_cli(workdir, "--epochs", "2")  # more steps would spend more than the target
    assert code == 2


def test_a_target_epsilon_is_met_at_the_given_delta():
    config = train.Config(dp_clip=1.0, dp_target_epsilon=3.0, dp_delta=1e-5, epochs=2, batch_size=32)
    plan = dp_run.plan_of(config, 1437, privacy.steps_per_epoch(32 / 1437))
    assert plan.delta == 1e-5 and plan.target_epsilon == 3.0
    options = dict(sampling_rate=32 / 1437, delta=1e-5, accountant="rdp", sampling="shuffle")
    assert plan.noise == privacy.noise_for_epsilon(3.0, steps=plan.planned_steps, **options)


def test_resuming_with_other_dp_settings_is_refused(shuffled, capsys):
    workdir, _ = shuffled
    changes = ((["--dp-noise", "2"], f"dp_noise: {NOISE!r} -> 2.0"), (["--dp-sampling", "poisson"], "poisson"))
    for flags, message in changes:
        assert cli.main(["train", "--workdir", str(workdir), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot resume" in err and message in err


REFUSED = {
    "clip 0": (["--dp-clip", "0", "--dp-noise", "1"], "--dp-clip must be a finite number > 0, got 0.0"),
    "noise < 0": (["--dp-clip", "1", "--dp-noise", "-1"], "--dp-noise must be a finite number > 0, got -1.0"),
    "delta 1": (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "1"], "--dp-delta must be a number in (0, 1)"),
    "delta 0": (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "0"], "--dp-delta must be a number in (0, 1)"),
    "noise and target": (
        ["--dp-clip", "1", "--dp-noise", "1", "--dp-target-epsilon", "3"],
        "give --dp-noise or --dp-target-epsilon, not both",
    ),
    "target without clip": (["--dp-target-epsilon", "3"], "--dp-target-epsilon is for DP-SGD: give --dp-clip"),
    "noise without clip": (["--dp-noise", "1"], "--dp-noise is for DP-SGD: give --dp-clip"),
    "sampling without clip": (["--dp-sampling", "poisson"], "--dp-sampling is for DP-SGD: give --dp-clip"),
    "clip alone": (["--dp-clip", "1"], "--dp-clip needs --dp-noise (the noise multiplier) or --dp-target-epsilon"),
    "batchnorm": ([*DP, "--model", "resnet20_cifar"], "model resnet20_cifar keeps running statistics (BatchNorm)"),
    "ensemble": ([*DP, "--ensemble", "2"], "DP-SGD (--dp-clip) cannot train with --ensemble 2"),
    "bfloat16": ([*DP, "--dtype", "bfloat16"], "cannot train with --dtype 'bfloat16'"),
    "remat": ([*DP, "--remat"], "DP-SGD (--dp-clip) cannot train with --remat"),
    "folder": ([*DP, "--dataset", "folder", "--data-dir", "."], "cannot train with --dataset 'folder'"),
    "devices": ([*DP, "--devices", "1"], "DP-SGD trains on one device: --dp-clip cannot be combined with --devices"),
    "ghost gradients": ([*DP, "--gradients", "manual"], "--dp-method ghost runs the hand reverse pass"),
    "method": ([*DP, "--dp-method", "exact"], "unknown --dp-method 'exact'; known: ghost, vmap"),
    "sampling": ([*DP, "--dp-sampling", "uniform"], "unknown --dp-sampling 'uniform'; known: shuffle, poisson"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_dp_flags_are_one_line_and_exit_2(case, tmp_path, capsys):
    flags, message = REFUSED[case]
    workdir = tmp_path / "run"
    assert cli.main(["train", *flags, "--workdir", str(workdir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxcnn train: error: ") and message in err, err
    assert not workdir.exists()


def test_log_grad_norms_is_dropped_with_a_warning():
    """Per-layer gradient norms of a DP run would publish what its noise hides."""
    said = []
    config = _train_flags.resolve({"dp_clip": 1.0, "dp_noise": 1.0, "log_grad_norms": True}, None, said.append)
    assert config.log_grad_norms is False  # config.json keeps describing the run
    assert said == ["jaxcnn train: warning: --log-grad-norms has no effect with --dp-clip 1.0 (ignored, not saved)"]


def test_poisson_batches_resume_mid_epoch_with_the_same_draws(monkeypatch):
    # step s draws from fold_in(data key, s): the batches after a mid-epoch stop are those of the straight epoch
    from jaxcnn.train import feed

    monkeypatch.setattr(feed, "compiled_steps", lambda run, mesh: (None, None))
    x, y = np.arange(40 * 3, dtype=np.float32).reshape(40, 3), np.arange(40) % 4
    plan = types.SimpleNamespace(sampling_rate=0.25, padded_batch=24)
    run = types.SimpleNamespace(
        privacy=plan, steps_per_epoch=4, data=types.SimpleNamespace(y_train=y, train=(x, y)), config=None
    )
    driver = feed.Poisson(run)
    driver.order_key = jax.random.key(5)
    straight = [tuple(map(np.asarray, batch)) for batch in driver.batches(2)]
    resumed = [tuple(map(np.asarray, batch)) for batch in driver.batches(2, start=2)]
    assert len(straight) == 4 and len(resumed) == 2 and driver.position == {"epoch": 2, "batch": 4}
    for a, b in zip(straight[2:], resumed, strict=True):
        assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    for xb, yb, mask in straight:  # included rows first, padding masked out
        count = int(mask.sum())
        assert mask[:count].all() and not mask[count:].any() and np.array_equal(xb[:count, 0] // 3 % 4, yb[:count])
    assert not all(np.array_equal(a[2], straight[0][2]) for a in straight[1:])  # fresh draws each step
