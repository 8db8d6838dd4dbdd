"""jaxcnn: convolutional networks as pure JAX functions, with every gradient derived by hand and checked.

Parts: :mod:`jaxcnn.functional` (ops and their hand-derived VJPs), :mod:`jaxcnn.nn` (layers),
:mod:`jaxcnn.backprop` (the explicit reverse pass), :mod:`jaxcnn.gradcheck` (the three-way check),
:mod:`jaxcnn.models` (named architectures), :mod:`jaxcnn.data` (data sets and batching),
:mod:`jaxcnn.train` (train state, compiled steps, the loop, checkpoints), :mod:`jaxcnn.parallel` (per-example
gradients, ensembles, data parallelism over devices and hosts) and :mod:`jaxcnn.interop` (Flax).

The parts are imported on first use (``jc.nn``, ``from jaxcnn import train``): ``import jaxcnn`` alone imports
no JAX, so the ``jaxcnn`` command can install its signal handlers before the slow imports start.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from jaxcnn import _xla_flags

try:
    __version__ = version("jaxcnn")  # the installed distribution's, set in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
del PackageNotFoundError, version

_xla_flags.apply()  # jaxcnn's default XLA:CPU flags, while no JAX backend has started (see jaxcnn._xla_flags)

__all__ = [
    "alternatives",
    "backprop",
    "data",
    "functional",
    "gradcheck",
    "interop",
    "models",
    "nn",
    "parallel",
    "train",
]

if TYPE_CHECKING:
    from jaxcnn import alternatives, backprop, data, functional, gradcheck, interop, models, nn, parallel, train


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"jaxcnn.{name}")  # also binds it here: later lookups are plain
    raise AttributeError(f"module 'jaxcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
