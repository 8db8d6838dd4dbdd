"""jaxcnn: convolutional networks as pure JAX functions, with every gradient derived by hand and checked.

Parts: :mod:`jaxcnn.functional` (ops and their hand-derived VJPs), :mod:`jaxcnn.nn` (layers),
:mod:`jaxcnn.backprop` (the explicit reverse pass), :mod:`jaxcnn.gradcheck` (the three-way check),
:mod:`jaxcnn.models` (named architectures), :mod:`jaxcnn.data` (data sets and batching),
:mod:`jaxcnn.train` (train state, compiled steps, the loop, checkpoints), :mod:`jaxcnn.parallel` (per-example
gradients, ensembles, data parallelism over devices and hosts) and :mod:`jaxcnn.interop` (Flax).
"""

from importlib.metadata import PackageNotFoundError, version

from jaxcnn import alternatives, backprop, data, functional, gradcheck, interop, models, nn, parallel, train

try:
    __version__ = version("jaxcnn")  # the installed distribution's, set in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
del PackageNotFoundError, version

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
