"""The ``jaxcnn`` commands that use a trained run: ``eval`` (a checkpoint on its test set or on other data),
``predict`` (classes of new images) and ``plot`` (the curves of ``metrics.jsonl``). :mod:`jaxcnn.cli` adds
their parsers; errors propagate to its one-line handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _plural(count: int, noun: str) -> str:  # shared with jaxcnn.cli
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint of a workdir (by default the best of an early-stopped run, else the latest) on its own data
    set, or on other data of the same image shape and classes; the images are preprocessed as in training (the run's
    saved raw scale and per-channel mean and std)."""
    from jaxcnn import train
    from jaxcnn.train.restored import describe

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    data = _eval_data_flags(args)
    result = train.evaluate_workdir(
        args.workdir, split=args.split, batch_size=args.batch_size, step=_step_flag(args.step), **data
    )
    on = f" of {result['dataset']}" if data else ""
    print(
        f"{args.split} accuracy {_number(result.get('accuracy'))}, loss {_number(result['loss'])} on "
        f"{result['count']} images{on} ({describe(result)}) in {args.workdir}"
    )
    return 0


def _step_flag(value: str | None) -> int | str | None:
    """--step N | best | latest."""
    if value is None or value in ("best", "latest"):
        return value
    try:
        step = int(value)
    except ValueError:
        raise ValueError(f"--step must be a step number, best or latest, got {value!r}") from None
    if step < 0:
        raise ValueError(f"--step must be >= 0, got {value!r}")
    return step


def _eval_data_flags(args: argparse.Namespace) -> dict[str, str]:
    """eval's --dataset / --data-path / --data-dir, checked against each other (an .npz path implies npz)."""
    from jaxcnn.data import DATASETS
    from jaxcnn.train import read_config
    from jaxcnn.train.restored import DIRECTORY_DATASETS

    dataset = args.dataset if args.dataset is not None else ("npz" if args.data_path is not None else None)
    if dataset is None and args.data_dir is None:
        return {}
    run = read_config(args.workdir)
    if dataset is None:  # --data-dir alone: the run's own data set, from another directory
        dataset = run.dataset
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if args.data_path is not None and dataset != "npz":
        raise ValueError(f"--data-path goes with --dataset npz, not --dataset {dataset}")
    if args.data_dir is not None and dataset is not None and dataset not in DIRECTORY_DATASETS:
        raise ValueError(f"--data-dir goes with --dataset {', '.join(DIRECTORY_DATASETS)}, not {dataset}")
    if dataset == "npz" and args.data_path is None:
        raise ValueError("--dataset npz needs --data-path (an .npz file with x_train, y_train, x_test, y_test)")
    if dataset in DIRECTORY_DATASETS and args.data_dir is None and (dataset != run.dataset or not run.data_dir):
        raise ValueError(f"--dataset {dataset} needs --data-dir (the directory of its files)")
    data = {"dataset": dataset, "data_path": args.data_path, "data_dir": args.data_dir}
    return {name: value for name, value in data.items() if value is not None}


def _predict(args: argparse.Namespace) -> int:
    """Predict the class of each image in FILES with a workdir's checkpoint and print the class and its probability per
    image (or write them to --output). FILES are image files (PNG, JPEG and any other 8-bit image Pillow reads;
    converted to gray or RGB as the model takes), .npy arrays and .npz archives (every array, or FILE.npz:KEY for
    one): one image (H, W, C) or (H, W), or several (N, H, W, C) or (N, H, W), named FILE[i]. Raw values: image files
    and uint8 arrays are 8-bit pixels (0..255, so a PNG of a digit maps onto the digits' 0..16); other arrays are on
    the training data's raw scale (0..16 for the digits, 0..255 for MNIST and CIFAR-10, as-is for float npz data)
    unless --max-value says otherwise. Images must look like the training ones (the digits and MNIST: bright strokes
    on black). The run's per-channel mean and std are applied as in training."""
    from jaxcnn.train import predict

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    if args.max_value is not None and not 0 < args.max_value < float("inf"):
        raise ValueError(f"--max-value must be a positive number, got {args.max_value}")
    if args.output is not None and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--output must name a .csv or a .json file, got {args.output}")
    try:
        rows, checkpoint = predict.predict_files(
            args.workdir,
            args.files,
            step=_step_flag(args.step),
            top=args.top,
            resize=args.resize,
            max_value=args.max_value,
            batch_size=args.batch_size,
        )
    except ValueError as error:
        if str(error).startswith("top must be"):
            raise ValueError(f"--{error}") from None
        raise
    if args.output is None:
        print(f"{args.workdir}: {checkpoint}")
        print(predict.format_table(rows), end="")
    else:
        written = predict.write_predictions(rows, args.output, checkpoint=checkpoint)
        print(f"wrote {_plural(len(rows), 'prediction')} to {written} ({checkpoint} of {args.workdir})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from jaxcnn.train.plot import plot_grad_norms, plot_metrics

    print(plot_metrics(args.workdir, args.output))
    norms = plot_grad_norms(args.workdir, Path(args.output).with_name("grad_norms.png") if args.output else None)
    if norms is not None:  # a run trained with --log-grad-norms
        print(norms)
    return 0


_STEP_HELP = (
    "which checkpoint: a step number, best (the lowest test loss, kept by runs with --early-stopping) or latest "
    "(default: best for a run trained with early stopping, else latest)"
)


def add_eval_predict_and_plot(commands) -> None:
    """Add the ``eval``, ``predict`` and ``plot`` subcommands."""
    _add_eval(commands)
    _add_predict(commands)
    _add_plot(commands)


def _add_eval(commands) -> None:
    from jaxcnn.data import DATASETS

    text = "evaluate a workdir's checkpoint on its data set or on other data"
    evaluate = commands.add_parser("eval", help=text, description=_eval.__doc__)
    evaluate.add_argument("--workdir", required=True, help="a training workdir")
    evaluate.add_argument("--step", default=None, metavar="N|best|latest", help=_STEP_HELP)
    evaluate.add_argument("--split", default="test", choices=["test", "train"], help="default: test")
    evaluate.add_argument(
        "--dataset", default=None, metavar="NAME", help=f"other data: one of {', '.join(DATASETS)} (default: the run's)"
    )
    evaluate.add_argument("--data-path", default=None, help="the .npz file of --dataset npz (implies --dataset npz)")
    evaluate.add_argument("--data-dir", default=None, help="the directory of --dataset mnist, fashion_mnist, cifar10")
    evaluate.add_argument("--batch-size", type=int, default=256, help="default: 256")
    evaluate.set_defaults(run=_eval)


def _add_predict(commands) -> None:
    text = "predict the class of images (PNG, JPEG, .npy, .npz) with a trained model"
    predict = commands.add_parser("predict", help=text, description=_predict.__doc__)
    predict.add_argument("files", nargs="+", metavar="FILES", help="image, .npy and .npz files")
    predict.add_argument("--workdir", required=True, help="a training workdir")
    predict.add_argument("--step", default=None, metavar="N|best|latest", help=_STEP_HELP)
    predict.add_argument(
        "--top", type=int, default=1, metavar="K", help="report the K most probable classes (default: 1)"
    )
    predict.add_argument(
        "--output", default=None, metavar="FILE", help="write a .csv or .json file instead of printing"
    )
    predict.add_argument("--resize", action="store_true", help="scale image files of another size to the model's")
    predict.add_argument(
        "--max-value",
        type=float,
        default=None,
        metavar="V",
        help="full intensity of non-uint8 array inputs, e.g. 1 for images in [0, 1] (default: the training data's "
        "raw scale: 16 for the digits)",
    )
    predict.add_argument("--batch-size", type=int, default=256, help="images per compiled call (default: 256)")
    predict.set_defaults(run=_predict)


def _add_plot(commands) -> None:
    text = "Draw train and test loss and accuracy per epoch from a workdir's metrics.jsonl."
    plot = commands.add_parser("plot", help="draw a workdir's loss and accuracy curves as PNG", description=text)
    plot.add_argument("--workdir", required=True, help="a training workdir")
    plot.add_argument("--output", default=None, help="PNG path (default: WORKDIR/curves.png)")
    plot.set_defaults(run=_plot)
