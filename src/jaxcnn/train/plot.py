"""Training curves: loss and accuracy per epoch from a workdir's ``metrics.jsonl``, as a PNG (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from jaxcnn.train.workdir import METRICS_FILE, read_metrics

CURVES_FILE = "curves.png"
GRAD_NORMS_FILE = "grad_norms.png"


def plot_metrics(workdir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Draw train and test loss and accuracy against the epoch; returns the PNG's path.

    Args:
      workdir: a training workdir (it must hold ``metrics.jsonl`` with at least one epoch).
      output: where to write the PNG; ``workdir/curves.png`` by default.

    Raises:
      FileNotFoundError: ``workdir`` does not exist; ValueError: it holds no metrics yet.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory = Path(workdir)
    if not directory.exists():
        raise FileNotFoundError(f"workdir {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"workdir {directory} is not a directory")
    records = read_metrics(directory)
    if not records:
        raise ValueError(f"no metrics in {directory / METRICS_FILE}: train into this workdir first")
    epochs = [record["epoch"] for record in records]

    def series(name: str) -> list[float]:
        return [float("nan") if record.get(name) is None else record[name] for record in records]

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for axes, quantity in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        plotted = []
        for split, style in (("train", "-o"), ("test", "-s")):
            values = series(f"{split}_{quantity}")
            if any(value == value for value in values):  # skip all-NaN series (no accuracy for regression)
                axes.plot(epochs, values, style, markersize=3, label=split)
                plotted.extend(value for value in values if value == value)
        axes.set_xlabel("epoch")
        axes.set_ylabel(quantity)
        axes.grid(alpha=0.3)
        if plotted:
            axes.legend()
            if quantity == "loss" and min(plotted) > 0:
                axes.set_yscale("log")
        else:
            axes.text(0.5, 0.5, f"no {quantity} recorded", ha="center", va="center", transform=axes.transAxes)
    figure.suptitle(f"{directory.name}: {len(records)} epochs")
    path = Path(output) if output is not None else directory / CURVES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def plot_grad_norms(workdir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path | None:
    """Draw each layer's gradient norm and update-to-weight ratio over depth (input first), one line per epoch
    (lighter: earlier), from a run trained with ``log_grad_norms``; returns the PNG's path, or None when the
    run recorded none.

    Args:
      workdir: a training workdir; output: the PNG path, ``workdir/grad_norms.png`` by default.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in read_metrics(Path(workdir)) if isinstance(r.get("grad_norms"), dict)]
    if not records:
        return None
    layers = list(records[-1]["grad_norms"])
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    colours = colormaps["viridis"]
    for axes, kind, label in zip(
        figure.subplots(1, 2),
        ("grad_norms", "update_ratios"),
        ("gradient norm", "update norm / weight norm"),
        strict=True,
    ):
        for index, record in enumerate(records):
            values = [record.get(kind, {}).get(layer) for layer in layers]
            values = [float("nan") if v is None else v for v in values]
            shade = colours(index / max(len(records) - 1, 1))
            axes.plot(range(len(layers)), values, "-o", color=shade, markersize=3, label=f"epoch {record['epoch']}")
        axes.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
        axes.set_xlabel("layer (input first)")
        axes.set_ylabel(label)
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
        if len(records) <= 10:
            axes.legend(fontsize=7)
    figure.suptitle(f"{Path(workdir).name}: per-layer gradients over depth and epochs")
    path = Path(output) if output is not None else Path(workdir) / GRAD_NORMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
