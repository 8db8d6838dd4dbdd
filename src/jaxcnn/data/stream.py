"""An image folder streamed through Grain: decoded and augmented in worker processes, batched as uint8 on the host.

The training stream of a run is one Grain ``MapDataset`` of batches over all its epochs. Batch ``g`` (0-based,
counting from the run's first step) is step ``s = g mod steps_per_epoch`` of epoch ``e = g // steps_per_epoch
+ 1``; it holds positions ``s * B .. (s + 1) * B - 1`` of that epoch's order, a permutation of the training
files drawn from ``(seed, e)`` alone, of which process ``p`` of ``P`` reads the ``p``-th contiguous slice of
``B / P``. So the order is shuffled globally before it is sharded (no process sees only some classes), the
processes' slices put together are the one-process batch, and every process takes the same number of steps:
``steps_per_epoch = N // B`` (the last ``N mod B`` files of each epoch's order are left for that epoch).

Each example's augmentation draws from a NumPy generator seeded by ``(seed, epoch, file index)``
(:func:`jaxcnn.data.images.example_rng`), so the stream is the same for any number of workers and any
position it is resumed from. Resuming is Grain's: :meth:`Batches.state` after a batch is a JSON-able record
(:meth:`grain.DatasetIterator.get_state`) that a checkpoint stores, and ``Batches(..., state=...)`` continues from
it exactly. A file that fails to decode in a worker is never a worker traceback: the example comes back marked,
and the main process raises :class:`~jaxcnn.data.folder.BadFilesError` naming it, or, with ``skip_bad_files``,
counts it and uses the next file of the epoch's order in its place (an evaluation leaves it out instead).

The evaluation stream walks the ``val`` files in index order, padded to whole batches with label ``-1`` (the
eval step masks those), and repeats, so that one set of worker processes serves every evaluation of a run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxcnn.data._dataset import DataError
from jaxcnn.data.folder import BadFilesError, FolderIndex

PAD_LABEL = -1  # the label of a padding example (and of a bad file an evaluation leaves out)
MAX_TRIES = 16  # files tried in turn for one training example when bad files are skipped
PREFETCH = 2  # batches each reading process prepares ahead


def default_workers() -> int:
    """The default number of decode workers: the CPUs this process may use, less one for the main process."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(cpus - 1, 1)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What fixes a stream's contents: equal specs over equal indexes give equal batches.

    Attributes:
      image_size: the side ``S`` of the ``(S, S, 3)`` uint8 images.
      batch_size: the global batch ``B`` (all processes together); a multiple of ``process_count``.
      seed: the run's seed (the epoch orders and every example's augmentation).
      process_index, process_count: which slice of every batch this process reads.
      skip_bad_files: replace (train) or leave out (eval) a file that fails to decode, instead of raising.
    """

    image_size: int
    batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1
    skip_bad_files: bool = False

    def __post_init__(self) -> None:
        if self.batch_size % self.process_count:
            raise DataError(
                f"the batch size {self.batch_size} does not divide among {self.process_count} processes; "
                "use a multiple of the process count"
            )

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.process_count


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training files in ``epoch`` (1-based): a permutation of ``0 .. n-1`` from a NumPy
    generator seeded by ``(seed, epoch)`` (PCG64 through a SeedSequence), the same in every process and worker."""
    return np.random.default_rng([int(seed), int(epoch), 0x6A617863]).permutation(n)


class _Examples:
    """The training examples of a run, as a Grain source: ``len`` covers ``epochs`` epochs of this process's
    slices, and example ``j`` is decoded and augmented on demand (in whichever worker asks)."""

    def __init__(self, index: FolderIndex, spec: StreamSpec, steps_per_epoch: int, epochs: int, train: bool):
        self.index, self.spec, self.steps, self.epochs, self.train = index, spec, steps_per_epoch, epochs, train
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.epochs * self.steps * self.spec.local_batch

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        spec = self.spec
        step, offset = divmod(int(j), spec.local_batch)
        cycle, step = divmod(step, self.steps)
        position = step * spec.batch_size + spec.process_index * spec.local_batch + offset
        if not self.train:
            return self._eval_example(position)
        return self._train_example(cycle + 1, position)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_permutation(self.spec.seed, epoch, len(self.index)))
        return self._order[1]

    def _train_example(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        from jaxcnn.data import images

        order, bad, count = self._permutation(epoch), -1, 0
        for attempt in range(MAX_TRIES if self.spec.skip_bad_files else 1):
            file = int(order[(position + attempt) % len(order)])
            try:
                rng = images.example_rng(self.spec.seed, epoch, file)
                image = images.train_image(self.index.read(file), self.spec.image_size, rng, path=self.index.path(file))
                return _example(image, int(self.index.labels[file]), bad, count)
            except (OSError, images.BadImageError):
                bad, count = (file if bad < 0 else bad), count + 1
        return _example(self._blank(), PAD_LABEL, bad, count)

    def _eval_example(self, position: int) -> dict[str, np.ndarray]:
        from jaxcnn.data import images

        if position >= len(self.index):
            return _example(self._blank(), PAD_LABEL, -1, 0)
        try:
            image = images.eval_image(self.index.read(position), self.spec.image_size, path=self.index.path(position))
            return _example(image, int(self.index.labels[position]), -1, 0)
        except (OSError, images.BadImageError):
            return _example(self._blank(), PAD_LABEL, position, 1)

    def _blank(self) -> np.ndarray:
        return np.zeros((self.spec.image_size, self.spec.image_size, 3), np.uint8)


def _example(image: np.ndarray, label: int, bad: int, count: int) -> dict[str, np.ndarray]:
    return {"image": image, "label": np.int32(label), "bad": np.int32(bad), "bad_count": np.int32(count)}


def train_steps(n: int, batch_size: int) -> int:
    """Steps per epoch of a training stream over ``n`` files: ``n // batch_size`` (whole batches only)."""
    if n < batch_size:
        raise DataError(f"the training set has {n} images, fewer than one batch of {batch_size}; use a smaller batch")
    return n // batch_size


def eval_steps(n: int, batch_size: int) -> int:
    """Steps of one evaluation over ``n`` files: ``ceil(n / batch_size)`` (the last batch padded)."""
    return -(-n // batch_size)


def _quiet_absl() -> None:
    # Grain reads absl flags in its worker machinery; a program that never parsed absl flags (any program but
    # an absl app) would fail with UnparsedFlagAccessError, so the defaults are marked as parsed
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_ignores_sigint(worker_index: int, worker_count: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: a decode worker leaves it to the training process,
    which stops at a step and closes the stream, instead of printing a KeyboardInterrupt traceback of its own."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _quiet_resource_tracker() -> None:
    # Grain's workers hand batches over in shared memory that the main process unlinks; Python's resource
    # tracker (started here, before the workers) still counts those blocks and warns at exit of "leaked
    # shared_memory objects" that are gone (/dev/shm is empty). The tracker takes its warning filters from
    # sys.warnoptions when it starts: this one silences that message alone.
    import sys
    from multiprocessing import resource_tracker

    option = "ignore:resource_tracker:UserWarning"
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)
    resource_tracker.ensure_running()


class Batches:
    """An iterator of host batches ``{"image": (b, S, S, 3) uint8, "label": (b,) int32, "bad": (b,) int32,
    "bad_count": (b,) int32}`` (``b`` this process's share of the batch), read by Grain.

    Args:
      index: the split's :class:`~jaxcnn.data.folder.FolderIndex`.
      spec: the :class:`StreamSpec`.
      train: the training stream (shuffled, augmented, whole batches, ``epochs`` epochs) or the evaluation
        stream (index order, centre crops, padded, repeated ``epochs`` times).
      epochs: how many epochs (train) or evaluations (eval) the stream spans.
      workers: decode worker processes (0: decode in this process, in Grain's reading threads).
      state: a :meth:`state` to continue from (train only).
    """

    def __init__(
        self,
        index: FolderIndex,
        spec: StreamSpec,
        *,
        train: bool,
        epochs: int,
        workers: int = 0,
        state: dict[str, Any] | None = None,
    ):
        import grain

        _quiet_absl()
        self.index, self.spec, self.train = index, spec, train
        self.steps = train_steps(len(index), spec.batch_size) if train else eval_steps(len(index), spec.batch_size)
        examples = _Examples(index, spec, self.steps, epochs, train)
        # one reading thread per process (a worker, or this process with workers=0) decoding PREFETCH batches
        # ahead: Grain's defaults (16 threads, 500 elements, here whole batches) would oversubscribe the cores and
        # hold hundreds of batches in memory
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=PREFETCH)
        dataset = grain.MapDataset.source(examples).batch(spec.local_batch, drop_remainder=True)
        dataset = dataset.to_iter_dataset(options)
        if workers > 0:
            _quiet_resource_tracker()
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=PREFETCH),
                worker_init_fn=_worker_ignores_sigint,
            )
        self._iterator = iter(dataset)
        if state is not None:
            try:
                self._iterator.set_state(state)
            except Exception as error:  # a state from another worker count or Grain version
                raise DataError(f"cannot continue the data stream from the checkpoint's position ({error})") from None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def close(self) -> None:
        """Stop the worker processes and release their buffers (idempotent)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def state(self) -> dict[str, Any]:
        """The position after the last batch returned (JSON-able), to continue from with ``state=``."""
        return self._iterator.get_state()

    def check(self, batch: dict[str, np.ndarray]) -> list[tuple[str, int]]:
        """The files of ``batch`` that failed to decode, as ``(path, times)``; raises
        :class:`~jaxcnn.data.folder.BadFilesError` naming the first (with the reason, decoded again here) unless
        the stream skips bad files."""
        failed = np.flatnonzero(batch["bad_count"])
        if len(failed) == 0:
            return []
        found = [(self.index.path(int(batch["bad"][i])), int(batch["bad_count"][i])) for i in failed]
        if not self.spec.skip_bad_files:
            raise BadFilesError([(found[0][0], self.reason(int(batch["bad"][failed[0]])))], hint=_DECODE_HINT)
        return found

    def reason(self, file: int) -> str:
        """Why file ``file`` does not decode (decoding it again in this process)."""
        from jaxcnn.data import images

        try:
            images.eval_image(self.index.read(file), self.spec.image_size, path=self.index.path(file))
        except images.BadImageError as error:
            return f"it passed the header check but does not decode ({error.reason})"
        except OSError as error:
            return f"unreadable ({error.strerror or error})"
        return "it failed to decode in a worker"


_DECODE_HINT = "found while training; pass --skip-bad-files to leave such files out"
