"""Interop: the same model in another framework.

* :mod:`jaxcnn.interop.flax`: ``to_flax(model, params, state) -> (module, variables)``, a ``flax.linen`` module
  with the same variables (jaxcnn names parameters as Flax linen does), and ``from_flax`` the way back;
* :mod:`jaxcnn.interop.torch`: ``torch_module(model, input_shape)``, the same architecture as a
  ``torch.nn.Module`` on NCHW inputs (PyTorch's own initialisation; for speed comparisons). PyTorch is not a
  dependency of jaxcnn: it is imported when ``torch_module`` is called, never on import.
"""

from jaxcnn.interop.flax import FlaxResidual, FlaxSequential, from_flax, parameter_count, to_flax
from jaxcnn.interop.torch import torch_module

__all__ = ["FlaxResidual", "FlaxSequential", "from_flax", "parameter_count", "to_flax", "torch_module"]
