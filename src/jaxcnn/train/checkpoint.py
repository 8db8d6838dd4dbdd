"""Checkpoints: orbax directories written atomically, verified by checksum on the way back.

A checkpoint is ``WORKDIR/checkpoints/<step>/`` as orbax's ``CheckpointManager`` writes it: into a temporary
directory first, renamed into place only once complete, so a process killed mid-save (even by SIGKILL)
leaves the previous checkpoints intact and no half-written one that could be mistaken for a finished one.
The state travels as its flat list of leaves (the template from the model and optimizer gives the tree back),
next to a JSON record of the epoch, the data shape and a SHA-256 of every leaf: a checkpoint whose bytes
changed on disk is reported as corrupt, never silently restored.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcnn.train.state import TrainState, as_typed_key

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is corrupt, or does not match the model and optimizer."""


def _quiet_orbax() -> Any:
    # orbax and absl log every save at INFO/WARNING level; a training command's output is its own
    _silence_closed_loop_noise()
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _drop_thread_tracebacks()
    import orbax.checkpoint as ocp

    return ocp


def _leaves_of(state: TrainState) -> tuple[list[np.ndarray], list[str]]:
    """The state's leaves as host arrays (the key as its raw data) and their tree paths, in flatten order."""
    plain = state.replace(key=jax.random.key_data(state.key))
    flat, _ = jax.tree_util.tree_flatten_with_path(plain)
    return [np.asarray(leaf) for _, leaf in flat], [jax.tree_util.keystr(path) for path, _ in flat]


def _digest(array: np.ndarray) -> str:
    header = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.sha256(header + np.ascontiguousarray(array).tobytes()).hexdigest()


def _name(index: int) -> str:
    return f"leaf_{index:05d}"


def step_number(state: TrainState) -> int:
    """The state's step count as an int (an ensemble's members share it; a replicated array is read locally)."""
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def all_finite(tree: Any) -> bool:
    """True when every floating-point leaf of ``tree`` is free of NaN and Inf (one reduction on device)."""
    checks = [
        jax.numpy.isfinite(leaf).all()
        for leaf in jax.tree.leaves(tree)
        if jax.numpy.issubdtype(jax.numpy.result_type(leaf), jax.numpy.inexact)
    ]
    return bool(jax.numpy.stack(checks).all()) if checks else True


class Checkpointer:
    """The checkpoints of one workdir: ``save``, ``latest_step``, ``restore``; the last ``keep`` are kept, and
    with ``best`` also the one of the lowest ``best`` metric (an early-stopped run's best epoch).

    Args:
      directory: where the step directories live (created on the first save).
      keep: how many of the latest checkpoints to keep (older ones are deleted after a successful save).
      best: the name of a metric passed to :meth:`save` (``"test_loss"``) whose lowest value marks a checkpoint
        to keep as well, whatever its age (orbax's ``BestN`` preservation policy next to ``LatestN``: the
        latest are still kept, so a run resumes from where it stopped); None keeps the latest only.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        *,
        best: str | None = None,
        read_only: bool = False,
        background: bool = False,
    ):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.best = best
        self.read_only = read_only  # a reader (eval, restore) never creates, cleans up or deletes anything
        self.background = background
        self._manager = None
        self._writing: tuple[int, threading.Thread | None] | None = None  # (step, its writer thread) of a save
        self._write_error: Exception | None = None  # what that save raised

    def _check_directory(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory: move that file away (it holds no checkpoints)")

    def _open(self):
        if self._manager is None:
            self._check_directory()
            ocp = _quiet_orbax()
            # orbax's own async save still spent about 10 ms of the caller's time per save (temporary
            # directories, metadata, launching its writes; mnist_cnn, 2-core CPU): with background=True the whole
            # blocking save runs in a thread of ours instead (see save)
            common = {"create": True, "enable_async_checkpointing": False, "cleanup_tmp_directories": True}
            if self.read_only:
                options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None)
            elif self.best is None:
                options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, **common)
            else:
                options = ocp.CheckpointManagerOptions(
                    best_fn=_metric(self.best), best_mode="min", preservation_policy=_latest_and_best(self), **common
                )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def finish(self) -> None:
        """Wait for a save still being written in the background (``background=True``); CheckpointError, in one
        line, when it failed (its temporary directory is not a checkpoint; the earlier ones are kept)."""
        if self._writing is None:
            return
        step, writer = self._writing
        if writer is not None:
            writer.join()  # before the field is cleared: an interrupted join leaves the write tracked
        self._writing = None
        error, self._write_error = self._write_error, None
        if error is not None:
            self._write_failed(step, error)

    def _write(self, manager: Any, step: int, args: Any, ranked: dict[str, float] | None) -> None:
        """orbax's blocking save (in the writer thread with ``background=True``); what it raises is kept for
        :meth:`finish`."""
        try:
            manager.save(step, args=args, metrics=ranked)
            manager.wait_until_finished()
        except Exception as error:  # a full disk, a file-size limit: raised in one line by finish() / save()
            self._write_error = error

    def _write_failed(self, step: int, error: Exception) -> None:
        # the save's other writes fail alike in futures nobody awaits; asyncio would log each at exit
        logging.getLogger("asyncio").addFilter(_UnretrievedWriteErrors(self.path(step)))
        kept = "the previous checkpoints are kept" if self._steps_on_disk() else "no checkpoint was written"
        raise CheckpointError(f"cannot write checkpoint {self.path(step)}: {_write_problem(error)}; {kept}") from None

    def close(self, *, check: bool = True) -> None:
        """Finish a background save (its failure raised only when ``check``) and release orbax's resources."""
        try:
            self.finish()
        except CheckpointError:
            if check:
                raise
        finally:
            self._close_manager()

    def _close_manager(self) -> None:
        if self._writing is not None and self._writing[1] is not None:  # its finish() was interrupted: let it end
            self._writing[1].join()
        if self._manager is not None:
            # the clean-up of a previous run's temporary directories runs in a thread that orbax awaits only at
            # the next save: await it here, or the interpreter's exit interrupts it with a traceback
            cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
            if cleanup is not None:
                try:
                    cleanup.result()
                except Exception:
                    pass
            self._manager.close()
            self._manager = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close(check=exc_info[0] is None)  # an exception on its way out is not masked by a failed write

    def steps(self) -> list[int]:
        """The steps of the finished checkpoints, oldest first (temporary directories of an interrupted save
        are not checkpoints)."""
        self._check_directory()
        self.finish()
        if not self.directory.is_dir():
            return []
        return sorted(self._open().all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step of the checkpoint with the lowest ``best`` metric (the first of equals); None without ``best``
        or when no checkpoint was saved with that metric."""
        self.finish()
        if self.best is None or not self.directory.is_dir():
            return None
        scored = [(self._open().metrics(step), step) for step in self.steps()]
        scored = [(float(metrics[self.best]), step) for metrics, step in scored if _finite(metrics, self.best)]
        return min(scored)[1] if scored else None

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, state: TrainState, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> Path:
        """Write ``state`` (and the JSON-able ``meta``) as the checkpoint of step ``state.step``, atomically.

        ``metrics`` (finite floats, e.g. ``{"test_loss": 0.08}``) rank the checkpoint for ``best``; a checkpoint
        saved without them is kept only while it is among the latest ``keep``.
        Refuses a state holding NaN or Inf: a diverged run never replaces a good checkpoint.

        With ``background=True`` the arrays are copied to the host here and written by orbax in a thread of
        jaxcnn's while training goes on; the next save, :meth:`finish`, :meth:`close` and every read wait for it
        first (and raise its CheckpointError). It is still atomic: orbax renames the finished temporary directory.
        """
        self.finish()
        if not all_finite((state.params, state.model_state, state.opt_state)):
            raise ValueError(f"refusing to write a checkpoint with non-finite values at step {step_number(state)}")
        ocp = _quiet_orbax()
        leaves, paths = _leaves_of(state)
        if self.background:  # np.asarray of a CPU array may share the device buffer the next step donates
            leaves = [np.array(leaf, copy=True) for leaf in leaves]
        step = step_number(state)
        record = dict(meta, format=FORMAT, step=step, paths=paths, sha256=[_digest(a) for a in leaves])
        payload = {_name(i): leaf for i, leaf in enumerate(leaves)}
        ranked = None  # without a finite metric: kept while among the latest
        if self.best is not None and _finite(metrics, self.best):
            ranked = {self.best: float(metrics[self.best]), "step": step}
        manager = self._open()
        args = ocp.args.Composite(state=ocp.args.StandardSave(payload), meta=ocp.args.JsonSave(record))
        if self.background:  # not a daemon: an exiting interpreter waits for the write
            writer = threading.Thread(
                target=self._write, args=(manager, step, args, ranked), name=f"jaxcnn-checkpoint-{step}"
            )
            self._writing = (step, writer)
            writer.start()
        else:
            self._writing = (step, None)
            self._write(manager, step, args, ranked)
            self.finish()  # a full disk, a file-size limit: orbax leaves only a temporary directory
        return self.path(step)

    def _steps_on_disk(self) -> list[int]:
        """The finished checkpoints' steps as the directory shows them now (without asking orbax)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record saved with checkpoint ``step``."""
        self.finish()
        ocp = _quiet_orbax()
        try:
            restored = self._open().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = restored["meta"]
        except Exception as error:  # orbax raises many types; each means the same to a user
            where = self.path(step)
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {_first_line(error)}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sha256" not in meta:
            raise CheckpointError(f"checkpoint {self.path(step)} is corrupt or unreadable: its metadata is malformed")
        return meta

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The checkpoint of ``step`` (the latest by default) in the shape of ``template``: ``(state, meta)``.

        Raises:
          CheckpointError: no checkpoint; unreadable or corrupt files (naming the directory); a checkpoint whose
            arrays do not fit ``template`` (another model or optimizer).
        """
        ocp = _quiet_orbax()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        where = self.path(step)
        meta = self.read_meta(step)
        expected, paths = _leaves_of(template)
        if meta.get("paths") != paths or len(meta["sha256"]) != len(expected):
            raise CheckpointError(
                f"checkpoint {where} does not match this model and optimizer "
                f"({len(meta.get('paths', []))} arrays saved, {len(expected)} expected; was it trained with "
                "another optimizer setting, such as rmsprop's momentum switched on or off?)"
            )
        abstract = {_name(i): jax.ShapeDtypeStruct(a.shape, a.dtype) for i, a in enumerate(expected)}
        try:
            restored = self._open().restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            payload = restored["state"]
        except Exception as error:
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable: {_first_line(error)}") from None
        leaves = []
        for index, (want, digest) in enumerate(zip(expected, meta["sha256"], strict=True)):
            leaf = np.asarray(payload.get(_name(index)) if isinstance(payload, dict) else None)
            if leaf.shape != want.shape or leaf.dtype != want.dtype:
                raise CheckpointError(
                    f"checkpoint {where} does not match this model and optimizer at {paths[index]}: "
                    f"{leaf.dtype}{list(leaf.shape)} saved, {want.dtype}{list(want.shape)} expected"
                )
            if _digest(leaf) != digest:
                raise CheckpointError(f"checkpoint {where} is corrupt: {paths[index]} fails its SHA-256 check")
            leaves.append(leaf)
        treedef = jax.tree.structure(template.replace(key=jax.random.key_data(template.key)))
        state = jax.tree.unflatten(treedef, [jax.numpy.asarray(leaf) for leaf in leaves])
        impl = jax.random.key_impl(template.key)
        return state.replace(key=as_typed_key(jax.random.wrap_key_data(state.key, impl=impl))), meta


def _finite(metrics: Any, name: str) -> bool:
    value = metrics.get(name) if isinstance(metrics, dict) else None
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _metric(name: str):
    return lambda metrics: float(metrics[name])


def _latest_and_best(checkpointer: Checkpointer) -> Any:
    """Orbax's preservation policy that keeps the latest ``keep`` checkpoints and the one of the lowest metric
    (the earliest of equals, as early stopping counts it). An orbax without preservation policies (before
    0.11.2x) gets None: then orbax ranks by ``best_fn`` with no limit, and every checkpoint is kept."""
    try:
        from orbax.checkpoint import checkpoint_managers as policies

        latest, best, either = policies.LatestN, policies.BestN, policies.AnyPreservationPolicy
    except (ImportError, AttributeError):
        return None
    name = checkpointer.best
    rank = lambda metrics: (float(metrics[name]), int(metrics.get("step", 0)))  # noqa: E731
    # BestN sorts by rank in descending order (reverse) and keeps the last n: the lowest loss, earliest step
    kept = best(get_metric_fn=rank, reverse=True, n=1, keep_checkpoints_without_metrics=False)
    return either([latest(n=checkpointer.keep), kept])


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _write_problem(error: BaseException) -> str:
    """What went wrong in a failed checkpoint write, in words ("File too large", "No space left on device")."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))  # tensorstore's errors carry the errno
    if code:
        return os.strerror(int(code.group(1)))
    return _first_line(error)


class _NoThreadTracebacks(logging.Filter):
    """Drops orbax's "_SignalingThread.run() raised an exception" records: each logs a full traceback of an
    exception that orbax also raises to the caller (here, a failed save), where it is reported in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in str(record.msg)


def _drop_thread_tracebacks() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _NoThreadTracebacks) for f in logger.filters):
        logger.addFilter(_NoThreadTracebacks())


def _silence_closed_loop_noise() -> None:
    """When orbax fails to read a checkpoint, its storage threads may still finish reads whose callbacks hit
    orbax's closed asyncio loop; Python would print each of those as an ignored-exception traceback. Filter out
    exactly those (RuntimeError "Event loop is closed"), installed before orbax runs since the threads may
    report before the failure reaches us; every other unraisable exception is reported as before."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxcnn_filter", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxcnn_filter = True
    sys.unraisablehook = hook


class _UnretrievedWriteErrors(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" records of a failed checkpoint write (the one-line
    :class:`CheckpointError` already said what happened), and nothing else."""

    def __init__(self, checkpoint: Path):
        super().__init__()
        self.checkpoint = str(checkpoint)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Future exception was never retrieved"):
            return True
        return self.checkpoint not in str(record.getMessage()) + str(getattr(record, "exc_info", ""))
