"""Helpers for tests that run `python -m jaxcnn` in real processes (signals, locks, resource limits).

Every process of a test run shares the run's JAX persistent compilation cache (set up in conftest.py), so only
the first run of a given step compiles it (about 10 s on a small CPU); the others load it in well under a second.
The cache holds the same executables a compile would give, so results stay bit for bit the same.
"""

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="session")
def compile_cache():
    """The environment for `python -m jaxcnn` processes: unbuffered output (and the run's compilation cache)."""
    return dict(os.environ, PYTHONUNBUFFERED="1")


def start(env, *args, **kwargs):
    """`python -m jaxcnn ARGS` as a Popen with text pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "jaxcnn", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def run(env, *args, timeout=300, **kwargs):
    """`python -m jaxcnn ARGS` to the end: a CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, "-m", "jaxcnn", *args], capture_output=True, text=True, env=env, timeout=timeout, **kwargs
    )


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (from /proc/PID/status, SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def wait_until(condition, process, timeout=120.0, what="the condition"):
    """Poll ``condition()`` until true; fail if ``process`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) before {what}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def read_until(process, prefix: str) -> list[str]:
    """Read ``process``'s stdout lines up to and including the first that starts with ``prefix``."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    pytest.fail(f"no line starting with {prefix!r} in {''.join(lines)!r}; stderr: {process.stderr.read()[-2000:]}")


def assert_one_line(stderr: str, *fragments: str) -> None:
    """stderr is exactly one line, no traceback, and holds every fragment."""
    assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.endswith("\n"), stderr[-3000:]
    for fragment in fragments:
        assert fragment in stderr, stderr


SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


# `python -m jaxcnn` in a wrapper that sends SIGNAL to its own process at SIGNAL_AT: "step:N" as the Nth train
# step is called (once the checkpoints written in the background before it are finished), "save" as orbax starts
# writing a checkpoint (the first of this process). SIGSTOP holds it there,
# at a known point, until a SIGCONT.
SIGNALLING = """
import os, sys
signum, where = int(os.environ["SIGNAL"]), os.environ["SIGNAL_AT"]
if where == "save":
    import orbax.checkpoint as ocp
    save = ocp.CheckpointManager.save
    def signalling_save(self, *args, **kwargs):
        ocp.CheckpointManager.save = save
        os.kill(os.getpid(), signum)
        return save(self, *args, **kwargs)
    ocp.CheckpointManager.save = signalling_save
else:
    from jaxcnn.train import feed
    from jaxcnn.train.checkpoint import Checkpointer
    compiled, calls, writers, save = feed.compiled_steps, [], [], Checkpointer.save
    def remembered_save(self, *args, **kwargs):
        writers.append(self)
        return save(self, *args, **kwargs)
    Checkpointer.save = remembered_save
    def signalling_steps(run, mesh):
        train_step, eval_step = compiled(run, mesh)
        def counted(state, x, y):
            calls.append(1)
            if len(calls) == int(where.split(":")[1]):
                for writer in writers:  # the checkpoints of the steps before are on disk when the signal comes
                    writer.finish()
                os.kill(os.getpid(), signum)
            return train_step(state, x, y)
        return counted, eval_step
    feed.compiled_steps = signalling_steps
from jaxcnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def signalling(environment, signum, where, *args):
    """The command line and environment of `python -m jaxcnn ARGS` in the SIGNALLING wrapper."""
    return [sys.executable, "-c", SIGNALLING, *args], dict(environment, SIGNAL=str(int(signum)), SIGNAL_AT=where)


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (by SIGSTOP; from /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and line.split()[1] == "T" for line in status)
    except OSError:
        return False
