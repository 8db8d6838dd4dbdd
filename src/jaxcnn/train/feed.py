"""How batches reach a run's compiled steps, and where the run's data stream stands.

Four feeds share one interface for :mod:`jaxcnn.train.loop`: ``place(state)``, ``batches(epoch, start)`` (the
epoch's batches from its ``start``-th on, each put on the device ahead of use), ``position`` (where the stream
stands after the last batch handed out: a JSON-able record a checkpoint keeps) and ``evaluate(state)``.

* :class:`Replicas`: an in-memory data set, one model, on the default device or data-parallel over a mesh.
* :class:`Ensemble`: an in-memory data set, K models in one vmapped step.
* :class:`Poisson`: a DP run's Poisson-sampled, padded and masked batches from an in-memory data set.
* :class:`Stream`: an image folder read through Grain (:mod:`jaxcnn.data.stream`); uint8 batches, normalised
  on the device; in a multi-process run each process reads its slice and the global batch is assembled with
  ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import data as data_lib
from jaxcnn import distributed
from jaxcnn.train.evaluate import evaluate
from jaxcnn.train.run import Run, compiled_steps
from jaxcnn.train.state import TrainState, data_key

PREFETCH = 2  # batches transferred ahead of the one being consumed
# An in-memory training set up to this size (bytes, images and labels) is sent to the device once, and each batch
# is gathered there by one compiled call: no host gather and no transfer per step (bench --loop: on a 2-core CPU
# the two device_puts of every digits batch took a third of the step's time). Larger sets go batch by batch.
ON_DEVICE_BYTES = 1 << 30


@functools.partial(jax.jit, static_argnums=3)
def _gather(x: jax.Array, y: jax.Array, order: jax.Array, size: int, start: jax.Array):
    """Batch ``order[start : start + size]`` of ``(x, y)``, gathered on the device (an exact copy of the rows)."""
    rows = jax.lax.dynamic_slice_in_dim(order, start, size)
    return jnp.take(x, rows, axis=0), jnp.take(y, rows, axis=0)


def device_batches(
    x: jax.Array, y: jax.Array, batch_size: int, *, key: jax.Array, skip: int = 0
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """:func:`jaxcnn.data.batches` for a data set already on the device: the same order (the permutation of
    ``key``, left on the device), the same sizes, the same rows (an exact gather), one compiled call per batch.

    Args:
      x: inputs ``(n, ...)`` and y: targets ``(n, ...)``, on the device.
      batch_size: examples per batch; the last holds the remainder.
      key: the epoch's order key; skip: leave out the first ``skip`` batches.

    Yields:
      ``(x_batch, y_batch)``, ``(b, ...)`` each.
    """
    n = len(y)
    order = jax.random.permutation(key, n)  # data.epoch_order's permutation
    for first in range(skip * batch_size, n, batch_size):
        yield _gather(x, y, order, min(batch_size, n - first), np.int32(first))


class Replicas:
    """One model's steps, on the default device or (with a mesh) data-parallel over the mesh's devices."""

    def __init__(self, run: Run, mesh: Any):
        self.run, self.mesh = run, mesh
        self.train_step, self.eval_step = compiled_steps(run, mesh)
        self.order_key: jax.Array | None = None
        self.position: dict[str, Any] | None = None
        self._on_device: tuple[jax.Array, jax.Array] | None = None
        self._labels_checked = False

    def place(self, state: TrainState) -> TrainState:
        self.order_key = data_key(state.key)
        return state if self.mesh is None else distributed.replicate(state, self.mesh)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
        x, y = self.run.data.train
        key = jax.random.fold_in(self.order_key, epoch)
        size = self.run.config.batch_size
        if self.mesh is None and x.nbytes + y.nbytes <= ON_DEVICE_BYTES:
            placed = self._gathered(key, size, start)
        elif self.mesh is None:
            placed = data_lib.batches(x, y, size, key=key, prefetch=PREFETCH, skip=start)
        else:
            placed = distributed.sharded_batches(x, y, size, self.mesh, key=key, prefetch=PREFETCH, skip=start)
        for k, batch in enumerate(placed, start=start + 1):
            self.position = {"epoch": epoch, "batch": k}
            yield batch

    def _gathered(self, key: jax.Array, size: int, start: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        if self._on_device is None:
            self._on_device = jax.device_put(self.run.data.train)
        return device_batches(*self._on_device, size, key=key, skip=start)

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        x, y = self.run.data.test
        checked, self._labels_checked = self._labels_checked, True  # the test labels: checked at the first call
        return evaluate(
            self.run.model, state.params, state.model_state, x, y, eval_step=self.eval_step, mesh=self.mesh,
            labels_checked=checked,
        )  # fmt: skip

    def close(self) -> None:
        self._on_device = None


class Poisson(Replicas):
    """A DP run's Poisson-sampled batches (``dp_sampling="poisson"``, see :mod:`jaxcnn.train.dp_run`): step ``s``
    takes every example with probability ``q`` from ``fold_in(data_key, s)``, padded to the plan's size; each
    batch is ``(x, y, mask)``. An epoch's draws are made on the device at once and read back to check that each
    fits (an overflow stops the run, never truncates a batch) and to gather its rows on the host."""

    def __init__(self, run: Run):
        super().__init__(run, None)
        from jaxcnn.data.poisson import poisson_batch

        plan, n = run.privacy, len(run.data.y_train)

        def draw(key: jax.Array, steps: jax.Array) -> Any:
            keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(steps)
            sample = lambda k: poisson_batch(k, n, sampling_rate=plan.sampling_rate, max_batch_size=plan.padded_batch)  # noqa: E731
            return jax.vmap(sample)(keys)

        self._draw = jax.jit(draw)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[jax.Array, ...]]:
        from jaxcnn.data.poisson import PoissonBatch, check_fits

        x, y = self.run.data.train
        first = (epoch - 1) * self.run.steps_per_epoch  # the global step of the epoch's first batch
        steps = np.arange(first + start, first + self.run.steps_per_epoch, dtype=np.uint32)
        indices, masks, counts = jax.device_get(self._draw(self.order_key, steps))
        check_fits(PoissonBatch(indices, masks, counts.max(initial=0)), self.run.privacy.padded_batch)

        def placed():
            for k, (rows, mask) in enumerate(zip(indices, masks, strict=True), start=start + 1):
                yield k, jax.device_put(x[rows]), jax.device_put(y[rows]), jax.device_put(mask)

        for k, *batch in data_lib.ahead(placed(), PREFETCH):
            self.position = {"epoch": epoch, "batch": k}
            yield tuple(batch)


class Ensemble(Replicas):
    """K models in one vmapped step, member ``k`` fed the batches of the run with seed ``seed + k``."""

    def __init__(self, run: Run):
        super().__init__(run, None)
        self.order_keys: list[jax.Array] = []

    def place(self, state: TrainState) -> TrainState:
        self.order_keys = [data_key(state.key[k]) for k in range(state.key.shape[0])]
        return state

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
        from jaxcnn.train.ensemble import ensemble_batches

        if start:
            raise ValueError("an ensemble resumes at the start of an epoch")
        x, y = self.run.data.train
        keys = [jax.random.fold_in(key, epoch) for key in self.order_keys]
        return ensemble_batches(x, y, self.run.config.batch_size, keys)

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        from jaxcnn.train.ensemble import evaluate_ensemble

        x, y = self.run.data.test
        return evaluate_ensemble(self.run.model, state.params, state.model_state, x, y, eval_step=self.eval_step)


class Stream(Replicas):
    """An image folder's steps: Grain reads and decodes in worker processes, the device normalises.

    Files that fail to decode (with ``skip_bad_files``) are counted per epoch in :attr:`skipped` and named once
    each through ``say``; without it the first raises :class:`jaxcnn.data.folder.BadFilesError`.
    """

    def __init__(self, run: Run, mesh: Any, say: Callable[[str], None]):
        super().__init__(run, mesh)
        from jaxcnn.data.stream import StreamSpec, default_workers

        config = run.config
        self.say = say
        self.workers = config.data_workers if config.data_workers is not None else default_workers()
        self.spec = StreamSpec(
            image_size=config.image_size,
            batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            skip_bad_files=config.skip_bad_files,
        )
        self.train_batches: Any = None
        self.val_batches: Any = None
        self.skipped = {"train": 0, "val": 0}
        self._named: set[str] = set()

    def manifest(self) -> dict[str, Any]:
        """What fixes the stream, saved with every checkpoint and compared on resume (see :func:`manifest`)."""
        return manifest(self.run, self.spec, self.workers)

    def open(self, position: dict[str, Any] | None) -> None:
        """Start the training stream, at a checkpoint's ``position`` (its Grain iterator state) or at the start."""
        from jaxcnn.data.stream import Batches

        state = None if position is None else position.get("iterator")
        self.train_batches = Batches(
            self.run.data.train, self.spec, train=True, epochs=self.run.config.epochs, workers=self.workers, state=state
        )

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
        stream = self.train_batches

        def placed():
            for k in range(start + 1, self.run.steps_per_epoch + 1):
                host = next(stream)
                bad = stream.check(host)
                yield k, stream.state(), bad, self._put(host["image"]), self._put(host["label"])

        for k, state, bad, x, y in data_lib.ahead(placed(), PREFETCH):
            self._count("train", bad)
            self.position = {"epoch": epoch, "batch": k, "iterator": state}
            yield x, y

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        from jaxcnn.data.stream import Batches

        if self.val_batches is None:
            self.val_batches = Batches(
                self.run.data.val, self.spec, train=False, epochs=self.run.config.epochs, workers=self.workers
            )
        counted = lambda bad: self._count("val", bad)  # noqa: E731
        return evaluate_stream(self.eval_step, state.params, state.model_state, self.val_batches, self._put, counted)

    def take_skipped(self) -> dict[str, int]:
        """The files skipped since the last call, by split (for the epoch's metrics line)."""
        skipped, self.skipped = self.skipped, {"train": 0, "val": 0}
        return skipped

    def _count(self, split: str, bad: list[tuple[str, int]]) -> None:
        for path, times in bad:
            self.skipped[split] += times
            if path not in self._named:
                self._named.add(path)
                self.say(f"skipping {path}: it does not decode ({split})")

    def _put(self, local: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jax.device_put(local)
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(distributed.AXIS))
        return jax.make_array_from_process_local_data(sharding, local)

    def close(self) -> None:
        for batches in (self.train_batches, self.val_batches):
            if batches is not None:
                batches.close()
        self.train_batches = self.val_batches = None


def evaluate_stream(
    eval_step: Callable[..., dict[str, jax.Array]],
    params: Any,
    model_state: Any,
    stream: Any,
    put: Callable[[np.ndarray], jax.Array] = jax.device_put,
    on_bad: Callable[[list[tuple[str, int]]], None] = lambda bad: None,
) -> dict[str, Any]:
    """Mean loss and accuracy over one pass of an evaluation :class:`jaxcnn.data.stream.Batches` (``stream.steps``
    batches), summed on the device by a masked ``eval_step`` (:func:`jaxcnn.train.make_eval_step` with
    ``masked=True``) and read back once: ``{"loss", "accuracy", "count"}``. Files that fail to decode raise
    (``BadFilesError``) or, when the stream skips them, go to ``on_bad``."""
    totals: dict[str, Any] = {}

    def placed():
        for _ in range(stream.steps):
            host = next(stream)
            yield stream.check(host), put(host["image"]), put(host["label"])

    for bad, x, y in data_lib.ahead(placed(), PREFETCH):
        on_bad(bad)
        for name, value in eval_step(params, model_state, x, y).items():
            totals[name] = totals[name] + value if name in totals else value
    totals = jax.device_get(totals)
    count = int(totals["count"])
    if count == 0:
        raise data_lib.DataError("no image could be evaluated (every file failed to decode)")
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count, "count": count}


def manifest(run: Run, spec: Any, workers: int) -> dict[str, Any]:
    """A streamed run's manifest: the file index's hash, the seed, the batch and image sizes, the worker and
    process counts, and the versions of the packages that shape the stream (Grain, NumPy, Pillow, simplejpeg).
    A mid-epoch resume continues Grain's iterator state, so every field must match."""
    from importlib import metadata

    versions = {}
    for package in ("grain", "numpy", "pillow", "simplejpeg"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "index_sha256": run.fingerprint,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "image_size": spec.image_size,
        "workers": workers,
        "processes": spec.process_count,
        "versions": versions,
    }


def check_manifest(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Raise ValueError naming each difference between a checkpoint's stream manifest and this run's."""
    if saved is None:
        return
    differences = []
    for name, value in current.items():
        old = saved.get(name)
        if name == "versions":
            differences += [
                f"{p} {old.get(p) if old else None} -> {v}" for p, v in value.items() if (old or {}).get(p) != v
            ]
        elif old != value:
            differences.append(f"{name} {old} -> {value}" if name != "index_sha256" else "the image files changed")
    if differences:
        raise ValueError(
            f"the data stream differs from the one {where} was written with ({'; '.join(differences)}), so it cannot "
            "continue exactly; resume with the same files, --data-workers and processes, or use a new workdir"
        )
