"""jaxcnn: convolutional networks as pure JAX functions, with every gradient derived by hand and checked.

Parts: :mod:`jaxcnn.functional` (ops and their hand-derived VJPs), :mod:`jaxcnn.nn` (layers),
:mod:`jaxcnn.backprop` (the explicit reverse pass), :mod:`jaxcnn.gradcheck` (the three-way check) and
:mod:`jaxcnn.models` (named architectures).
"""

from jaxcnn import backprop, functional, gradcheck, models, nn

__version__ = "0.1.0"

__all__ = ["backprop", "functional", "gradcheck", "models", "nn"]
