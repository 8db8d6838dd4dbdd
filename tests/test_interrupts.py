"""SIGINT and SIGTERM stop `jaxcnn train` cleanly at any moment: at start-up, while XLA compiles, mid-epoch and
mid-checkpoint. Each gives exit 130 / 143 and one line on stderr (never a traceback, never a segfault, never
ignored), keeps the last checkpoint, and the run resumes to the same bits as one never interrupted."""

import os
import signal
import subprocess

import pytest

from conftest import same_bits
from jaxcnn import _signals, cli, train
from processes import (
    SIGNAL_EXIT,
    assert_one_line,
    catches,
    compile_cache,
    read_until,
    run,
    signalling,
    start,
    wait_until,
)

assert compile_cache  # a fixture, used by name below

FLAGS = ("--batch-size", "4", "--no-progress")  # 360 steps an epoch on the digits: long enough to land in one
STEPS = 360
# where the length of an epoch does not matter, the default batch size: the train step that the runs of
# test_cli_train.py and test_workdir.py compile (each other batch size is another compile, about 12 s of CPU)
DEFAULT_FLAGS = ("--no-progress",)
DEFAULT_STEPS = 45


def stop(process, signum):
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    assert process.returncode == SIGNAL_EXIT[signum], (process.returncode, err[-3000:])  # not -11, not 0
    return out, err


# -- in-process: the handlers and what library users keep -------------------------------------------------------


def test_inside_stop_on_signals_a_signal_sets_a_flag_and_check_raises():
    before = {s: signal.getsignal(s) for s in _signals.SIGNALS}
    for signum, code in SIGNAL_EXIT.items():
        with _signals.stop_on_signals():
            os.kill(os.getpid(), signum)  # neither KeyboardInterrupt nor death
            assert _signals.received() == signum
            with pytest.raises(train.Interrupted, match=f"interrupted by {signum.name} at step 7") as caught:
                _signals.check("at step 7")
            assert caught.value.exit_code == code
        assert _signals.received() is None
        assert {s: signal.getsignal(s) for s in _signals.SIGNALS} == before  # library users keep Python's default


def test_the_cli_in_process_gives_the_handlers_back(tmp_path, capsys):
    # Python's default handlers first: an xdist worker starts with SIGINT ignored (it passed only when another test
    # had run before it in the same worker)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {s: signal.getsignal(s) for s in _signals.SIGNALS}
        assert cli.main(["plot", "--workdir", str(tmp_path / "missing")]) == 2
        assert cli.main(["train", "--workdir", str(tmp_path / "bad"), "--batch-size", "0"]) == 2
        capsys.readouterr()
        assert {s: signal.getsignal(s) for s in _signals.SIGNALS} == before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


# -- real processes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_at_start_up_stops_before_anything_is_written(signum, compile_cache, tmp_path):
    workdir = tmp_path / "run"
    process = start(compile_cache, "train", "--workdir", str(workdir), *FLAGS)
    wait_until(lambda: catches(process.pid, signal.SIGTERM), process, what="the handlers")  # still importing JAX
    out, err = stop(process, signum)
    assert_one_line(err, f"jaxcnn train: interrupted by {signum.name} while starting; nothing was written")
    assert not workdir.exists() and "epoch" not in out


def test_a_second_signal_leaves_at_once(compile_cache, tmp_path):
    process = start(compile_cache, "train", "--workdir", str(tmp_path / "run"), *FLAGS)
    wait_until(lambda: catches(process.pid, signal.SIGTERM), process, what="the handlers")
    process.send_signal(signal.SIGINT)
    try:  # a moment for the first to be handled (two signals pending at once are one), still importing JAX
        process.wait(timeout=0.1)
    except subprocess.TimeoutExpired:
        pass
    _, err = stop(process, signal.SIGINT)
    assert_one_line(err, "jaxcnn: SIGINT again: stopped at once")


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_while_xla_compiles_stops_after_the_compile(signum, tmp_path):
    """Python's KeyboardInterrupt raised inside XLA's compile and GC callbacks segfaulted or was swallowed."""
    workdir = tmp_path / "run"
    # no compilation cache: this process must compile (the run's cache holds this step once another test of the run
    # has trained with these flags, and the process then trained 199 steps in the half second below)
    environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"PYTHONUNBUFFERED": "1"}
    process = start(environment, "train", "--workdir", str(workdir), *FLAGS)
    read_until(process, "workdir:")  # the train step compiles right after this line, for seconds
    try:
        process.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        pass
    _, err = stop(process, signum)
    assert_one_line(err, f"jaxcnn train: interrupted by {signum.name} at epoch 1, step 1; no checkpoint was written")
    assert train.read_metrics(workdir) == [] and train.read_config(workdir).batch_size == 4


@pytest.fixture(scope="module")
def uninterrupted(compile_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("interrupts") / "straight"
    result = run(compile_cache, "train", "--epochs", "2", "--workdir", str(workdir), *FLAGS)
    assert result.returncode == 0, result.stderr
    return train.restore(workdir)


def signalled(environment, signum, where, *args):
    command, environment = signalling(environment, signum, where, *args)
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == SIGNAL_EXIT[signum], result.stderr[-3000:]  # not -11, not 0
    return result


# both signals slow (two training processes and a resumed one, about 35 s): the default suite stops runs by a signal
# while XLA compiles and mid-checkpoint (below), resumes after SIGKILL (test_cli_train.py) and from a mid-epoch
# checkpoint (test_folder.py)
@pytest.mark.parametrize("signum", [pytest.param(s, marks=pytest.mark.slow) for s in (signal.SIGTERM, signal.SIGINT)])
def test_a_signal_mid_epoch_keeps_the_last_checkpoint_and_the_run_resumes_exactly(
    signum, uninterrupted, compile_cache, tmp_path
):
    workdir = tmp_path / "run"
    result = signalled(compile_cache, signum, "step:400", "train", "--epochs", "2", "--workdir", str(workdir), *FLAGS)
    assert_one_line(
        result.stderr,
        f"jaxcnn train: interrupted by {signum.name} at epoch 2, step 400; the last checkpoint (step {STEPS}) is "
        "kept; run the same command to resume",
    )
    assert train.restore(workdir).step == STEPS and [r["epoch"] for r in train.read_metrics(workdir)] == [1]
    resumed = run(compile_cache, "train", "--workdir", str(workdir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert same_bits(train.restore(workdir), uninterrupted)


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])
def test_a_signal_mid_checkpoint_finishes_that_checkpoint(signum, compile_cache, tmp_path):
    """(orbax once printed a 45-line "cannot schedule new futures after shutdown" traceback here.)"""
    workdir = tmp_path / "run"
    flags = ("--epochs", "2", "--workdir", str(workdir), *DEFAULT_FLAGS)
    result = signalled(compile_cache, signum, "save", "train", *flags)
    assert_one_line(
        result.stderr, f"interrupted by {signum.name} after epoch 1; the last checkpoint (step {DEFAULT_STEPS}) is kept"
    )
    assert train.restore(workdir).step == DEFAULT_STEPS and [r["epoch"] for r in train.read_metrics(workdir)] == [1]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(DEFAULT_STEPS)]  # no temporary left
