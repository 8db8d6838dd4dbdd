"""XLA flag sets as contenders: the JAX contenders of :func:`jaxcnn.bench.run` built again in one worker process
per flag set (:mod:`jaxcnn.bench._flagset_worker`), each started with its own ``XLA_FLAGS`` (XLA reads them once
per process, so a flag set cannot be switched inside one), and timed round by round with the contenders of the
main process.

A flag set is written ``NAME=FLAGS`` (``jaxcnn bench --xla-flags NAME=FLAGS``, repeatable), ``FLAGS`` being what
``XLA_FLAGS`` would hold, e.g. ``ynn-dot=--xla_cpu_experimental_ynn_fusion_type=dot``. Two pseudo-flags set
jaxcnn's own switches in that worker instead of XLA's: ``--jaxcnn_dw_method=taps|conv`` (how the hand-derived
convolution backward forms the weight gradient, :func:`jaxcnn.functional.conv.dw_method_for`) and
``--jaxcnn_cpu_flags=...`` (jaxcnn's default XLA:CPU flags, :mod:`jaxcnn._xla_flags`; default in a worker: off,
so a flag set's figures are those of exactly its flags). The worker speaks one JSON object per line on its
stdin and stdout; :func:`start` and :class:`Worker` are the parent's side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple

JAX_CONTENDERS = ("jaxcnn-manual", "jaxcnn-autodiff", "jaxcnn-engine", "flax")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_GLOG_PREFIX = re.compile(r"^[FEWI]\d{4} [\d:.]+\s+\d+ [^\]]+\] ")  # XLA's log-line prefix
_PSEUDO = {"--jaxcnn_dw_method": "JAXCNN_DW_METHOD", "--jaxcnn_cpu_flags": "JAXCNN_XLA_CPU_FLAGS"}


class FlagSet(NamedTuple):
    """One worker's settings: its ``name`` (the contenders' suffix, ``jaxcnn-manual@NAME``), its ``XLA_FLAGS``
    and jaxcnn's environment switches (``JAXCNN_DW_METHOD``, ``JAXCNN_XLA_CPU_FLAGS``) from the pseudo-flags."""

    name: str
    xla_flags: str
    environment: dict[str, str]

    @property
    def spec(self) -> str:
        """The flag set as it was written (``NAME=FLAGS``), pseudo-flags included."""
        pseudo = [f"{flag}={self.environment[var]}" for flag, var in _PSEUDO.items() if var in self.environment]
        return f"{self.name}=" + " ".join([self.xla_flags, *pseudo]).strip()


def parse(spec: str) -> FlagSet:
    """A :class:`FlagSet` from ``NAME=FLAGS``; ValueError, in one line, for a malformed one.

    ``FLAGS`` is split on whitespace; every item must look like ``--name`` or ``--name=value``. The pseudo-flags
    ``--jaxcnn_dw_method`` and ``--jaxcnn_cpu_flags`` are taken out of ``XLA_FLAGS`` into the worker's
    environment (see the module docstring). ``NAME=`` with no flags is a worker with XLA's defaults.
    """
    from jaxcnn.functional.conv import DW_METHODS

    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not _NAME.match(name):
        raise ValueError(f"an XLA flag set is NAME=FLAGS with NAME of letters, digits, '_.+-' (got {spec!r})")
    xla, environment = [], {}
    for item in flags.split():
        key, _, value = item.partition("=")
        if not key.startswith("--") or len(key) < 3:
            raise ValueError(f"flag set {name!r}: {item!r} is not a flag (--name or --name=value)")
        if key in _PSEUDO:
            if key == "--jaxcnn_dw_method" and value not in DW_METHODS:
                raise ValueError(f"flag set {name!r}: --jaxcnn_dw_method must be one of {', '.join(DW_METHODS)}")
            environment[_PSEUDO[key]] = value
        else:
            xla.append(item)
    return FlagSet(name, " ".join(xla), environment)


def check_names(flag_sets: Sequence[FlagSet]) -> None:
    """ValueError if two flag sets share a name (their contenders would share one)."""
    names = [flag_set.name for flag_set in flag_sets]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"XLA flag set names must differ; given twice: {', '.join(twice)}")


class Worker:
    """The parent's handle on one flag set's worker process (see :func:`start`)."""

    def __init__(self, flag_set: FlagSet, process: subprocess.Popen, stderr: Any):
        self.flag_set, self.process, self._stderr = flag_set, process, stderr
        self._greeting: dict[str, Any] | None = None
        self._memory: dict[str, Any] = {}

    def send(self, message: dict[str, Any]) -> None:
        """Send one request (its reply is read by :meth:`reply`)."""
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker died: reply() says how

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return the worker's reply; ValueError, in one line, when the worker died."""
        self.send(message)
        return self.reply()

    def greet(self) -> dict[str, Any]:
        """The reply to the greeting :func:`start` sent (the worker's backend and flags), read once; ValueError
        when XLA refused the flags (the worker died starting its backend)."""
        if self._greeting is None:
            self._greeting = self.reply()
        return self._greeting

    def reply(self) -> dict[str, Any]:
        """The worker's next reply; ValueError, in one line, when the worker died or answered an error."""
        try:
            line = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise ValueError(f"XLA flag set {self.flag_set.name!r}: its worker process died: {self._last_words()}")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(f"XLA flag set {self.flag_set.name!r}: {reply['error']}")
        return reply

    def _last_words(self) -> str:
        """The last meaningful line the worker wrote on stderr (XLA's 'Unknown flags in XLA_FLAGS: ...')."""
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().splitlines() if line.strip()]
        lines = [_GLOG_PREFIX.sub("", line) for line in lines]
        useful = [line for line in lines if "flag" in line.lower() or "error" in line.lower()] or lines
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                died = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                died = f"killed by signal {-code}"
            useful = [line for line in useful if "Warning" not in line]
        else:
            died = f"exit code {code}"
        return died + (f": {useful[-1][:300]}" if useful else "")

    def runner(self, contender: str):
        """``runner(steps) -> seconds`` for one of this worker's contenders (the worker times the steps itself,
        so the pipe's round trip is not counted); ``runner.memory()`` as the worker reported it."""
        memory = self._memory.get(contender)

        def run(steps: int) -> float:
            return float(self.ask({"run": contender, "steps": steps})["seconds"])

        run.memory = lambda: memory  # type: ignore[attr-defined]
        return run

    def build(self, request: dict[str, Any]) -> dict[str, Any]:
        """Build and warm up the contenders in ``request`` (see :func:`main`); the worker's reply."""
        reply = self.ask({"build": request})
        self._memory = {c: info.get("memory") for c, info in reply["ready"].items()}
        return reply

    def close(self) -> None:
        """Ask the worker to quit (kill it if it does not) and drop its stderr file."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def start(flag_set: FlagSet) -> Worker:
    """Start the worker of ``flag_set``: ``python -m jaxcnn.bench._flagset_worker`` with ``XLA_FLAGS`` set to
    exactly its flags (the parent's ``XLA_FLAGS`` are not inherited) and jaxcnn's CPU flags off unless it sets
    them. It starts its backend at once; :meth:`Worker.greet` waits for that (and raises if XLA refused)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the parent's jaxcnn and the user's modules
    env["XLA_FLAGS"] = flag_set.xla_flags
    env["JAXCNN_XLA_CPU_FLAGS"] = ""
    env.pop("JAXCNN_DW_METHOD", None)
    env.update(flag_set.environment)
    stderr = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxcnn.bench._flagset_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    worker = Worker(flag_set, process, stderr)
    worker.send({"hello": True})  # the backend starts while the parent builds; greet() reads the answer
    return worker


def model_request(name: str) -> dict[str, Any]:
    """What a worker needs to build the model registered as ``name`` (built-in or the user's): its name, and
    for a builder registered at run time its import path and input shape (ValueError when it has none)."""
    from jaxcnn import models

    spec = models.spec(name)
    builder = spec.builder
    path = f"{getattr(builder, '__module__', '')}:{getattr(builder, '__qualname__', '')}"
    if "<" in path or path.startswith(":") or path.endswith(":"):
        path = None  # a lambda or a local function: only the parent can build it
    shape = list(spec.input_shape) if spec.input_shape is not None else None
    return {"model": name, "builder": path, "input_shape": shape}


def import_builder(path: str | None, name: str):
    """The builder at ``module:qualname`` (see :func:`model_request`)."""
    import importlib

    if path is None:
        raise ValueError(
            f"model {name!r} was registered with a lambda or local function, which a flag set's worker process "
            "cannot import; register a module-level function"
        )
    module, _, qualname = path.partition(":")
    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"model {name!r}: its builder {path} cannot be imported in a worker process: {error}"
        ) from None
    return target
