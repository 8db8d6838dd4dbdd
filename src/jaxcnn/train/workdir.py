"""A workdir's own files: ``config.json``, ``metrics.jsonl`` and the writer's lock, written safely.

Every file is replaced through a temporary file that ``tempfile.mkstemp`` creates exclusively under an
unpredictable name in the same directory, then fsynced and renamed over the old one: readers see the old or the
new file, never half of one, and a symbolic link planted at any path a run writes is replaced, never followed.
The per-epoch append to ``metrics.jsonl`` opens the file with ``O_NOFOLLOW``; a path that is not the run's own
regular file (a link, a FIFO, a second hard link, a file removed) is rewritten whole instead.

A run that writes a workdir holds :class:`WorkdirLock`: an exclusive ``flock`` on ``WORKDIR/.lock``, which holds
the writer's PID. The OS drops the lock when the process ends, however it ends (SIGKILL too), so a lock is
never stale; a second writer is refused at once with :class:`WorkdirBusyError`. Readers (``eval``, ``plot``,
``restore``) take no lock.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxcnn.train.config import Config

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking
    fcntl = None

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"


def _cannot(action: str, path: Path, error: OSError) -> OSError:
    """An OSError whose one-line message names the file and the problem (errno kept)."""
    reason = error.strerror or str(error)
    return OSError(error.errno, f"cannot {action} {path}: {reason}")


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through an exclusively created temporary file and a rename.

    Readers see the old or the new file; a symbolic link at ``path`` is replaced, its target left untouched.

    Raises:
      OSError: the directory cannot be written (full disk, file-size limit, permissions), naming the file.
    """
    path = Path(path)
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _cannot("write", path, error) from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o644)  # mkstemp makes 0600; the workdir's files are readable like any other
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        _remove_quietly(temporary)
        raise _cannot("write", path, error) from None
    except BaseException:
        _remove_quietly(temporary)
        raise
    _sync_directory(path.parent)


def append_line(path: str | os.PathLike, line: str, whole: str) -> None:
    """Append ``line`` (ending in a newline) to ``path`` and fsync, without following a symbolic link.

    ``whole`` is the file's full intended content (ending with ``line``): it replaces ``path`` atomically when
    ``path`` is not a regular file of its own (a link, a FIFO, a second hard link) or has gone.

    Raises:
      OSError: the write failed (full disk, file-size limit), naming the file.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EACCES):
            write_atomically(path, whole)  # not ours to append to: put the whole file back in its place
            return
        raise _cannot("write", path, error) from None
    try:
        info = os.fstat(descriptor)
        ours = stat.S_ISREG(info.st_mode) and info.st_nlink == 1
        if ours:
            data = line.encode("utf-8")
            while data:
                data = data[os.write(descriptor, data) :]
            os.fsync(descriptor)
    except OSError as error:
        raise _cannot("write", path, error) from None
    finally:
        os.close(descriptor)
    if not ours:
        write_atomically(path, whole)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sync_directory(directory: Path) -> None:
    """fsync a directory so that a rename in it survives a power cut (where the system allows it)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# -- reading -----------------------------------------------------------------------------------------------------


def read_config(workdir: str | os.PathLike) -> Config:
    """The :class:`Config` saved in ``workdir/config.json``."""
    path = Path(workdir) / CONFIG_FILE
    if Path(workdir).exists() and not Path(workdir).is_dir():
        raise ValueError(f"workdir {workdir} is not a directory")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {workdir} is not a jaxcnn workdir") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read: {error}") from None
    try:
        return Config.from_json(text)
    except ValueError as error:
        raise ValueError(f"{path} is not a valid config: {error}") from None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of ``workdir/metrics.jsonl``, in order (a torn last line from a kill is skipped)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def metrics_text(records: list[dict[str, Any]]) -> str:
    """The content of ``metrics.jsonl`` holding ``records``: one JSON object per line."""
    return "".join(json.dumps(record) + "\n" for record in records)


# -- the writer's lock -------------------------------------------------------------------------------------------


class WorkdirBusyError(ValueError):
    """Another process holds the workdir's lock: it is training into it (``pid``: that process, or None)."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


class WorkdirLock:
    """The exclusive writer's lock of a workdir: ``flock`` on ``WORKDIR/.lock``, which holds the writer's PID.

    Use as a context manager around everything that writes the workdir. The lock file stays (an empty file when
    no one holds it); removing it while held would let a second writer in, so nothing removes it.

    Args:
      directory: the workdir (it must exist).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise at once.

        Raises:
          WorkdirBusyError: another process holds it (the message names its PID).
          OSError: the lock file cannot be opened (a symbolic link there, permissions), naming it.
        """
        if fcntl is None or self._descriptor is not None:
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            descriptor = os.open(self.path, flags, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OSError(error.errno, f"cannot lock {self.path}: it is a symbolic link; remove it") from None
            raise _cannot("lock", self.path, error) from None
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise OSError(errno.EINVAL, f"cannot lock {self.path}: it is not a regular file; remove it")
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(descriptor)
                who = f"process {pid}" if pid is not None else "another process"
                raise WorkdirBusyError(
                    f"workdir {self.directory} is in use: {who} is training into it (it holds {self.path}); "
                    "wait for it to end, or use another --workdir",
                    pid,
                ) from None
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(descriptor)
            raise
        self._descriptor = descriptor

    def acquire_and_release(self) -> None:
        """Raise :class:`WorkdirBusyError` if another process holds the lock now (a check, holding nothing)."""
        self.acquire()
        self.release()

    def release(self) -> None:
        """Give the lock back (emptying the PID it holds)."""
        if self._descriptor is None:
            return
        descriptor, self._descriptor = self._descriptor, None
        try:
            os.ftruncate(descriptor, 0)
        except OSError:
            pass
        os.close(descriptor)  # closing the last descriptor of the open file drops the flock

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _holder(descriptor: int) -> int | None:
    """The PID written in a held lock file (the holder writes it right after locking: wait a moment for it)."""
    deadline = time.monotonic() + 1.0
    while True:
        text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
