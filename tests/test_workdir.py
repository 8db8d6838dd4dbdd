"""A workdir's files: one writer at a time (an OS lock that dies with its process; readers ignore it), files
written without following planted symbolic links, and one-line errors (no traceback) for a checkpoint that
cannot be written, an empty checkpoints/ and a checkpoints/ that is a file."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import same_bits
from jaxcnn import cli, train
from jaxcnn.train import loop, workdir
from processes import assert_one_line, compile_cache, run, signalling, stopped, wait_until

assert compile_cache  # a fixture, used by name below

# the default batch size: the same compiled steps as the runs of test_cli_train.py and test_interrupts.py (each
# other batch size is another compile of the train step, about 12 s of CPU in a process that starts cold)
FLAGS = ("--no-progress",)
STEPS = 45


# -- files that do not follow symbolic links ---------------------------------------------------------------------


def plant(link, target):
    target.write_text("precious\n")
    link.symlink_to(target)


def test_atomic_writes_replace_planted_links_and_never_write_their_targets(tmp_path):
    victims = tmp_path / "victims"
    victims.mkdir()
    directory = tmp_path / "run"
    directory.mkdir()
    # the old temporary names were predictable: .NAME.tmp-PID
    for name in ("config.json", "metrics.jsonl"):
        plant(directory / f".{name}.tmp-{os.getpid()}", victims / f"tmp-{name}")
        plant(directory / name, victims / name)
    loop.write_atomically(directory / "config.json", "{}\n")
    loop.write_atomically(directory / "metrics.jsonl", '{"epoch": 1}\n')
    for name in ("config.json", "metrics.jsonl"):
        assert not (directory / name).is_symlink() and (directory / name).stat().st_mode & 0o777 == 0o644
        assert (victims / name).read_text() == "precious\n" and (victims / f"tmp-{name}").read_text() == "precious\n"
    assert train.read_metrics(directory) == [{"epoch": 1}]
    assert sorted(p.name for p in directory.iterdir() if not p.is_symlink()) == ["config.json", "metrics.jsonl"]


@pytest.mark.parametrize("kind", ["symlink", "hard link", "fifo", "missing", "directory"])
def test_the_metrics_append_never_writes_through_what_is_planted_there(kind, tmp_path):
    path = tmp_path / "metrics.jsonl"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "hard link":
        os.link(victim, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    records = [{"epoch": 1}, {"epoch": 2}]
    if kind == "directory":  # os.replace cannot put a file in a directory's place: one line naming the file
        with pytest.raises(OSError, match=f"cannot write {path}: Is a directory"):
            workdir.append_line(path, json.dumps(records[-1]) + "\n", workdir.metrics_text(records))
        return
    workdir.append_line(path, json.dumps(records[-1]) + "\n", workdir.metrics_text(records))
    assert victim.read_text() == "precious\n" and not path.is_symlink() and path.is_file()
    assert train.read_metrics(tmp_path) == records
    workdir.append_line(path, '{"epoch": 3}\n', "unused")  # its own regular file: appended in place
    assert [r["epoch"] for r in train.read_metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.slow  # compiles in this process; the append itself is tested above
def test_a_run_leaves_a_metrics_link_planted_between_epochs_alone(tmp_path):
    """In process: fit's log callback runs after each epoch's files are written; it plants the link there."""
    directory = tmp_path / "run"
    victim = tmp_path / "victim"

    def log(line):
        if line.startswith("epoch 1/"):
            (directory / "metrics.jsonl").unlink()
            plant(directory / "metrics.jsonl", victim)

    config = train.Config(epochs=2, learning_rate=0.05, keep=2, model="models_for_tests:small_digits_cnn")  # SHORT's
    _, history = train.fit(config, directory, log=log)
    assert victim.read_text() == "precious\n"
    assert not (directory / "metrics.jsonl").is_symlink() and train.read_metrics(directory) == history


# -- the writer's lock -------------------------------------------------------------------------------------------


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with workdir.WorkdirLock(tmp_path) as held:
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(train.WorkdirBusyError, match=f"process {os.getpid()} is training into it") as refused:
            workdir.WorkdirLock(tmp_path).acquire()  # another open file: refused even in the same process
        assert refused.value.pid == os.getpid() and str(refused.value).count("\n") == 0
    assert (tmp_path / ".lock").read_text() == ""
    held.acquire()  # free again
    held.release()


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    plant(tmp_path / ".lock", tmp_path / "victim")
    with pytest.raises(OSError, match="is a symbolic link"):
        workdir.WorkdirLock(tmp_path).acquire()
    assert (tmp_path / "victim").read_text() == "precious\n"


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    code = "import sys; from jaxcnn.train import workdir; workdir.WorkdirLock(sys.argv[1]).acquire(); print(1); input()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline() == b"1\n"
    with pytest.raises(train.WorkdirBusyError, match=f"process {holder.pid} "):
        workdir.WorkdirLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    with workdir.WorkdirLock(tmp_path):  # the PID left in the file does not matter: the OS dropped the lock
        pass


def test_two_trains_on_one_workdir_one_is_refused_and_readers_keep_working(compile_cache, tmp_path, capsys):
    directory = tmp_path / "run"
    # the run stops itself (SIGSTOP) as it starts epoch 2: held mid-run, lock held, epoch 1 on disk, so that the
    # rest happens while it writes
    flags = ("--epochs", "2", "--workdir", str(directory), *FLAGS)
    command, environment = signalling(compile_cache, signal.SIGSTOP, f"step:{STEPS + 1}", "train", *flags)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        wait_until(lambda: stopped(first.pid), first, what="the run to stop itself in epoch 2")
        # a resume of the same run, in a process of its own (in this one, cli.main would see its own lock)
        second = run(compile_cache, "train", "--workdir", str(directory), "--no-progress")
        assert second.returncode == 2
        assert_one_line(second.stderr, f"workdir {directory} is in use: process {first.pid} is training into it")
        assert cli.main(["eval", "--workdir", str(directory)]) == 0  # readers take no lock
        assert f"(checkpoint of epoch 1, step {STEPS})" in capsys.readouterr().out
        assert cli.main(["plot", "--workdir", str(directory), "--output", str(tmp_path / "curves.png")]) == 0
        assert (tmp_path / "curves.png").is_file()
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert train.read_config(directory).seed == 0 and [r["epoch"] for r in train.read_metrics(directory)] == [1, 2]
    assert train.restore(directory).step == 2 * STEPS


# -- one line, never a traceback ---------------------------------------------------------------------------------


def test_a_checkpoint_write_that_fails_is_one_line_and_keeps_the_previous_checkpoint(compile_cache, tmp_path, capsys):
    directory = tmp_path / "run"
    # the run before and the resume after are the same command in this process (only the failing one needs its
    # own process, for its file-size limit)
    assert cli.main(["train", "--epochs", "1", "--workdir", str(directory), *FLAGS]) == 0
    before = train.restore(directory)

    # what a full disk does to a checkpoint, without filling one: a file-size limit (and SIGXFSZ ignored), set
    # by a small Python that then becomes `python -m jaxcnn` (limits and ignored signals survive exec)
    limited = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'jaxcnn', *sys.argv[1:]])"
    )
    command = [sys.executable, "-c", limited, "train", "--epochs", "2", "--workdir", str(directory), *FLAGS]
    result = subprocess.run(command, capture_output=True, text=True, env=compile_cache, timeout=300)
    assert result.returncode == 2
    assert_one_line(
        result.stderr,
        f"jaxcnn train: error: cannot write checkpoint {directory / 'checkpoints' / str(2 * STEPS)}: File too large; "
        "the previous checkpoints are kept",
    )
    assert same_bits(train.restore(directory), before)
    assert cli.main(["train", "--workdir", str(directory), "--no-progress"]) == 0  # room again: it goes on
    capsys.readouterr()
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == [str(STEPS), str(2 * STEPS)]


def test_eval_of_an_empty_or_a_file_checkpoints_is_one_line(compile_cache, tmp_path, capsys):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "config.json").write_text(train.Config(batch_size=4).to_json())
    (directory / "checkpoints").mkdir()
    result = run(compile_cache, "eval", "--workdir", str(directory))  # orbax's clean-up thread once died loudly
    assert result.returncode == 2
    assert_one_line(result.stderr, f"jaxcnn eval: error: no checkpoint in {directory / 'checkpoints'}")
    (directory / "checkpoints").rmdir()
    (directory / "checkpoints").write_text("not a directory")
    for command in (["eval"], ["train", "--epochs", "1", *FLAGS]):  # in this process: the one above was real
        assert cli.main([*command, "--workdir", str(directory)]) == 2
        assert_one_line(capsys.readouterr().err, f"{directory / 'checkpoints'} is not a directory")
    assert (directory / "checkpoints").read_text() == "not a directory"
    shutil.rmtree(directory)
