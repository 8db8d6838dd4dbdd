"""The ``jaxcnn`` command: thin argument parsing over the library.

``jaxcnn gradcheck`` prints the three-way gradient check of a named model and exits 1 on a mismatch.
Bad arguments give a one-line error and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _gradcheck(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from jaxcnn import gradcheck, models

    model = models.get(args.model)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    dtype = {"float64": jnp.float64, "float32": jnp.float32}[args.dtype]
    input_shape = models.input_shape(args.model)
    key = jax.random.key(args.seed)
    params, state = model.init(jax.random.fold_in(key, 0), input_shape)
    # explicit dtypes: the same seed gives the same data whether or not 64-bit types are on
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.batch_size, *input_shape), jnp.float32)
    num_classes = model.output_shape(input_shape)[-1]
    y = jax.random.randint(jax.random.fold_in(key, 2), (args.batch_size,), 0, num_classes, jnp.int32)
    report = gradcheck.check_model(
        model,
        params,
        state,
        x,
        y,
        dtype=dtype,
        seed=args.seed,
        key=jax.random.fold_in(key, 3),
        layers=not args.no_layers,
        finite_differences=not args.no_finite_differences,
    )
    print(f"gradcheck: model {args.model}, input {input_shape}, batch {args.batch_size}, seed {args.seed}")
    print(report.table())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jaxcnn`` command, one subcommand per job."""
    from jaxcnn import models

    parser = argparse.ArgumentParser(prog="jaxcnn", description="CNNs as pure JAX functions, gradients checked.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    check = commands.add_parser(
        "gradcheck",
        help="check a model's hand-derived gradients against autodiff and finite differences",
        description="Compare the hand-derived gradients (engine and custom_vjp bridge) of a model with JAX "
        "autodiff and central finite differences, per layer and per parameter. Exits 1 on a mismatch.",
    )
    check.add_argument("--model", default="mnist_cnn", choices=models.names(), help="architecture (default: mnist_cnn)")
    check.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="default: float64")
    check.add_argument("--seed", type=int, default=0, help="seeds parameters, data and directions (default: 0)")
    check.add_argument("--batch-size", type=int, default=4, help="examples in the checked batch (default: 4)")
    check.add_argument("--no-layers", action="store_true", help="skip the layer-by-layer checks")
    check.add_argument("--no-finite-differences", action="store_true", help="skip finite differences")
    check.set_defaults(run=_gradcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxcnn`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"jaxcnn {args.command}: error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # never a traceback: one line, and an exit code distinct from "mismatch" (1)
        print(f"jaxcnn {args.command}: error: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
