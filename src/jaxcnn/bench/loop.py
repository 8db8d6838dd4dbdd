"""The loop against the step (``jaxcnn bench --loop``): :func:`jaxcnn.train.fit` end to end, epoch after epoch, against
the bare compiled train step on one batch already on the device, the two taking turns.

``fit`` runs as ``jaxcnn train`` runs it: the data set loaded once (not timed), a workdir with a metrics line and
a checkpoint per epoch, the test set evaluated after every epoch, the progress reads of the loss. After each of
its epochs (inside its log callback, whose time is taken off the loop's clock) the bench step of the same model,
gradients and batch size (:mod:`jaxcnn.bench.contenders`) takes as many steps as the epoch had batches, so the
two are measured in alternation on the same machine state. Epoch 1 compiles and is reported apart; the loop's
images per second are those of epochs 2.. (every training image once per epoch, the last partial batch too),
counting everything an epoch of ``fit`` does: gathering and sending batches, the steps, the loss reads, the
evaluation, the metrics line and the checkpoint.
"""

from __future__ import annotations

import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ ")


def run_loop(
    model_name: str = "mnist_cnn",
    *,
    dataset: str = "digits",
    batch_size: int = 32,
    epochs: int = 8,
    workdir: bool = True,
    gradients: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Time ``fit`` end to end against the bench step, epoch by epoch (see :mod:`jaxcnn.bench.loop`).

    Args:
      model_name: an architecture from :mod:`jaxcnn.models`.
      dataset: an in-memory data set that :class:`jaxcnn.train.Config` names (``"digits"`` ships with
        scikit-learn; others must be on disk).
      batch_size: images per step, for both.
      epochs: epochs of ``fit`` (>= 3: epoch 1 compiles, the figures come from epochs 2..).
      workdir: write a workdir (metrics and a checkpoint every epoch) in a temporary directory, as ``jaxcnn
        train`` does; False trains in memory only.
      gradients: the gradient mode (None: the :class:`~jaxcnn.train.Config` default).
      log: called with progress lines (None for silence).

    Returns:
      ``{"machine", "settings", "epochs": [{"epoch", "loop_seconds", "steps_and_eval_seconds", "images",
      "loop_images_per_second", "step_images_per_second", "ratio"}, ...], "summary": {...}}``. ``ratio`` is
      the loop's images/s over the step's in the same round; the summary holds the medians over epochs 2..
    """
    import jax

    from jaxcnn import train
    from jaxcnn.bench.contenders import Options, _jaxcnn_runner
    from jaxcnn.bench.report import machine
    from jaxcnn.train.run import Run

    if not isinstance(epochs, int) or epochs < 3:
        raise ValueError(f"bench --loop needs epochs >= 3 (epoch 1 compiles), got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    say = log or (lambda line: None)
    fields = {"gradients": gradients} if gradients is not None else {}
    config = train.Config(model=model_name, dataset=dataset, batch_size=batch_size, epochs=epochs, **fields)
    run = Run(config, None, None, log=lambda line: None)  # the data loaded once, untimed; fit's model
    data, model, input_shape = run.data, run.model, run.input_shape
    x, y = np.asarray(data.x_train[:batch_size]), np.asarray(data.y_train[:batch_size])
    started = time.perf_counter()
    step = _jaxcnn_runner(model, input_shape, x, y, config.gradients, Options())
    step(1)
    say(f"bench step ready ({time.perf_counter() - started:.1f}s to build and compile)")
    images = len(data.x_train)
    steps = math.ceil(images / batch_size)
    clock = _Clock()
    ends: list[float] = []
    step_seconds: list[float] = []

    def on_line(line: str) -> None:
        with clock.paused():
            say(line)
            if _EPOCH_LINE.match(line):
                ends.append(clock.now())
                begun = time.perf_counter()
                step(steps)
                step_seconds.append(time.perf_counter() - begun)

    with tempfile.TemporaryDirectory(prefix="jaxcnn-bench-loop-") as scratch:
        clock.start()
        _, history = train.fit(config, Path(scratch) / "run" if workdir else None, data=data, log=on_line)
        total = clock.now()
    rows = _epoch_rows(history, ends, step_seconds, images, steps * batch_size)
    settings = dict(
        model=model_name, dataset=dataset, batch_size=batch_size, epochs=epochs, workdir=workdir,
        gradients=config.gradients, train_images=images, steps_per_epoch=steps, backend=jax.default_backend(),
    )  # fmt: skip
    return {"machine": machine(), "settings": settings, "epochs": rows, "summary": _summary(rows, total)}


class _Clock:
    """Seconds since :meth:`start`, less the time spent inside :meth:`paused` blocks."""

    def __init__(self) -> None:
        self._origin = 0.0
        self._paused = 0.0

    def start(self) -> None:
        self._origin, self._paused = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self._origin - self._paused

    def paused(self):
        import contextlib

        @contextlib.contextmanager
        def block():
            begun = time.perf_counter()
            try:
                yield
            finally:
                self._paused += time.perf_counter() - begun

        return block()


def _epoch_rows(
    history: list[dict[str, Any]], ends: list[float], step_seconds: list[float], images: int, step_images: int
) -> list[dict[str, Any]]:
    """One row per epoch: the loop's seconds (between epoch ends, the bench step's turns taken off), of which
    ``fit`` itself counted ``steps_and_eval_seconds``, and the two rates."""
    rows = []
    for k, (record, end, seconds) in enumerate(zip(history, ends, step_seconds, strict=True)):
        loop = end - (ends[k - 1] if k else 0.0)
        loop_rate, step_rate = images / loop, step_images / seconds
        rows.append(
            dict(
                epoch=record["epoch"],
                loop_seconds=loop,
                steps_and_eval_seconds=record["seconds"],
                images=images,
                loop_images_per_second=loop_rate,
                step_images_per_second=step_rate,
                ratio=loop_rate / step_rate,
            )  # fmt: skip
        )
    return rows


def _summary(rows: list[dict[str, Any]], total: float) -> dict[str, Any]:
    """Medians over epochs 2.. (epoch 1 compiles) and the whole run's seconds."""
    steady = rows[1:]
    loop = statistics.median(r["loop_images_per_second"] for r in steady)
    step = statistics.median(r["step_images_per_second"] for r in steady)
    overhead = statistics.median(r["loop_seconds"] - r["steps_and_eval_seconds"] for r in steady)
    return dict(
        loop_images_per_second=loop, step_images_per_second=step,
        ratio=statistics.median(r["ratio"] for r in steady), first_epoch_seconds=rows[0]["loop_seconds"],
        fit_seconds=total, median_outside_steps_and_eval_seconds=overhead,
    )  # fmt: skip


def loop_markdown(result: dict[str, Any]) -> str:
    """The ``bench --loop`` result as Markdown: settings, one row per epoch, the medians."""
    s, summary = result["settings"], result["summary"]
    lines = [
        f"# jaxcnn bench --loop: {s['model']} on {s['dataset']}, batch {s['batch_size']}, {s['gradients']} "
        f"gradients, {s['backend']}",
        "",
        f"fit: {s['epochs']} epochs of {s['train_images']:,} images ({s['steps_per_epoch']} steps), "
        + ("a workdir (metrics line and checkpoint every epoch)" if s["workdir"] else "in memory (no workdir)")
        + "; after each epoch the bench step takes as many steps on one batch on the device.",
        "",
        "| epoch | loop s | of which steps + eval s | loop img/s | step img/s | loop / step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["epochs"]:
        lines.append(
            f"| {r['epoch']} | {r['loop_seconds']:.3f} | {r['steps_and_eval_seconds']:.3f} | "
            f"{r['loop_images_per_second']:,.0f} | {r['step_images_per_second']:,.0f} | {r['ratio']:.3f} |"
        )
    lines += [
        "",
        f"Epochs 2-{s['epochs']}, medians: loop {summary['loop_images_per_second']:,.0f} img/s, step "
        f"{summary['step_images_per_second']:,.0f} img/s, loop / step {summary['ratio']:.3f} (by epoch); outside "
        f"the steps and the evaluation {summary['median_outside_steps_and_eval_seconds'] * 1000:.0f} ms per epoch. "
        f"Epoch 1 (compiles): {summary['first_epoch_seconds']:.2f} s; the whole fit: {summary['fit_seconds']:.2f} s.",
        "",
    ]
    return "\n".join(lines)
