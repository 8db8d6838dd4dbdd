"""Clean stops on SIGINT and SIGTERM: handlers that only set a flag, which long-running code polls.

Python's default SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread happens to be, including
inside callbacks that XLA and orbax run from C++ (a compile, a garbage-collection hook, a checkpoint's
threads), where it can crash the process or be swallowed. Inside :func:`stop_on_signals` the handlers raise
nothing: they record the signal, and the training loop checks :func:`received` between steps, before and after
evaluating and checkpointing, and after each start-up phase, then raises :class:`Interrupted` from a safe place.
A second signal leaves at once (``os._exit``), for the case where a phase does not return soon enough.

This module imports nothing heavy, so the command can install the handlers before it imports JAX. Library code
that never enters :func:`stop_on_signals` keeps Python's default behaviour.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None
_prefix = "jaxcnn"


class Interrupted(Exception):
    """A run stopped on SIGINT or SIGTERM (inside :func:`stop_on_signals`).

    Attributes:
      signum: the signal's number; ``exit_code`` is ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, where: str):
        super().__init__(f"interrupted by {signal_name(signum)} {where}".rstrip())
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``"SIGINT"`` for 2, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def received() -> int | None:
    """The signal received inside :func:`stop_on_signals` and not yet acted on, or None."""
    return _received


def check(where: str = "") -> None:
    """Raise :class:`Interrupted` (its message ending in ``where``) if a signal has been received."""
    if _received is not None:
        raise Interrupted(_received, where)


def _handler(signum: int, frame: object) -> None:
    global _received
    if _received is not None:  # a second signal: whatever the run is doing has not returned; leave now
        os.write(2, f"{_prefix}: {signal_name(signum)} again: stopped at once\n".encode())
        os._exit(128 + signum)
    _received = signum


@contextmanager
def stop_on_signals(prefix: str = "jaxcnn") -> Iterator[None]:
    """Within this block SIGINT and SIGTERM set a flag instead of raising: code that polls :func:`check` (the
    training loop does) raises :class:`Interrupted` at its next safe point. A second signal exits at once with
    ``128 + signum`` after one line on stderr starting with ``prefix``. The previous handlers come back on exit.

    Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    global _received, _prefix
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _received, _prefix = None, prefix
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _received = None
