"""The input pipeline alone (``jaxcnn data-bench``): images per second and CPU time per image of an image folder's
training stream, and, with a model, how much of each step waits for data.

The stream is the one ``jaxcnn train`` reads (:class:`jaxcnn.data.stream.Batches`: Grain, decode and
augmentation in ``workers`` processes, uint8 batches). The first batches are a warm-up (the workers start and
import); the figures cover the batches after them. CPU time is this process's plus its worker processes'
(``/proc/<pid>/stat`` of each live child on Linux; elsewhere this process's alone, said in the result).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

WARMUP = 2  # batches read before the clock starts


def _cpu_seconds() -> tuple[float, float | None]:
    """CPU seconds used so far by this process and by its live children (None where /proc cannot be read)."""
    own = time.process_time()
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for child in multiprocessing.active_children():
            with open(f"/proc/{child.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return own, total
    except (OSError, ValueError, AttributeError):
        return own, None


def data_bench(
    root: str | os.PathLike,
    *,
    image_size: int = 224,
    workers: int | None = None,
    batch_size: int = 64,
    batches: int = 20,
    model: Any = None,
    seed: int = 0,
    skip_bad_files: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time the training stream of the image folder ``root``.

    Args:
      root: an image folder (``root/train/<class>/*``, ``root/val/<class>/*``).
      image_size: the side of the images made (RandomResizedCrop and flip, as in training).
      workers: decode processes (None: :func:`jaxcnn.data.stream.default_workers`; 0: in this process).
      batch_size: images per batch.
      batches: batches timed (after :data:`WARMUP` untimed ones).
      model: a :class:`jaxcnn.nn.Layer` (or a registered name / ``package.module:factory``): also run its train
        step (SGD, manual gradients) on each batch and time how long each step waits for the next batch.
      seed: the stream's seed.
      skip_bad_files: as for training.
      log: called with progress lines.

    Returns:
      ``{"images_per_second", "cpu_ms_per_image"`` (this process and its workers), ``"main_cpu_ms_per_image",
      "worker_cpu_ms_per_image"`` (the decode workers alone; None without workers or /proc),
      ``"cpu_counts_workers", "images", "seconds", "workers", "batch_size", "image_size", "files"}``, and with a
      model ``"data_wait_share"`` (the fraction of the loop's time spent waiting for batches),
      ``"step_images_per_second"`` and ``"model"``.
    """
    from jaxcnn.data.folder import image_folder
    from jaxcnn.data.stream import Batches, StreamSpec, default_workers

    say = log or (lambda line: None)
    workers = default_workers() if workers is None else workers
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an int >= 1, got {batches!r}")
    folder = image_folder(root, image_size=image_size, skip_bad_files=skip_bad_files, log=say)
    spec = StreamSpec(image_size, batch_size, seed, skip_bad_files=skip_bad_files)
    needed = WARMUP + batches
    epochs = -(-needed // max(len(folder.train) // batch_size, 1))
    stream = Batches(folder.train, spec, train=True, epochs=epochs, workers=workers)
    step = _model_step(model, folder) if model is not None else None
    say(f"data-bench: {len(folder.train)} files, image size {image_size}, batch {batch_size}, {workers} workers")
    try:
        for _ in range(WARMUP):
            batch = next(stream)
            if step is not None:
                step(batch)
        own_start, workers_start = _cpu_seconds()
        start, waited = time.perf_counter(), 0.0
        for _ in range(batches):
            asked = time.perf_counter()
            batch = next(stream)
            stream.check(batch)
            waited += time.perf_counter() - asked
            if step is not None:
                step(batch)
        seconds = time.perf_counter() - start
        own_end, workers_end = _cpu_seconds()
    finally:
        stream.close()
    images = batches * batch_size
    counted = workers_start is not None and workers_end is not None
    worker_cpu = (workers_end - workers_start) if counted else 0.0
    result = {
        "images_per_second": images / seconds,
        "cpu_ms_per_image": 1000 * (own_end - own_start + worker_cpu) / images,
        "main_cpu_ms_per_image": 1000 * (own_end - own_start) / images,
        "worker_cpu_ms_per_image": 1000 * worker_cpu / images if counted and workers else None,
        "cpu_counts_workers": counted,
        "images": images,
        "seconds": seconds,
        "workers": workers,
        "batch_size": batch_size,
        "image_size": image_size,
        "files": len(folder.train),
    }
    if step is not None:
        result.update(data_wait_share=waited / seconds, step_images_per_second=images / max(seconds - waited, 1e-9))
        result["model"] = model if isinstance(model, str) else type(model).__name__
    return result


def _model_step(model: Any, folder: Any) -> Callable[[dict[str, np.ndarray]], None]:
    """A function that trains ``model`` one step on a host batch and waits for it to finish."""
    import jax
    import optax

    from jaxcnn import models
    from jaxcnn.train import InputScaling, create_train_state, make_train_step

    layer = models.build(model, folder.num_classes) if isinstance(model, str) else model
    state = create_train_state(layer, optax.sgd(0.01, 0.9), jax.random.key(0), folder.input_shape)
    train_step = make_train_step(layer, gradients="manual", input_scaling=InputScaling(255.0, folder.mean, folder.std))
    holder = {"state": state}

    def step(batch: dict[str, np.ndarray]) -> None:
        x, y = jax.device_put(batch["image"]), jax.device_put(batch["label"])
        holder["state"], metrics = train_step(holder["state"], x, y)
        jax.block_until_ready(metrics)

    return step
