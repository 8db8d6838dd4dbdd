"""Training-step benchmarks: jaxcnn's three gradient modes against the same model in Flax and PyTorch.

Every contender trains the same architecture with the same optimizer (SGD with momentum 0.9, float32) on the
same synthetic batch, already on the device. Each is compiled and warmed up first; then the contenders take
turns, round after round (interleaved, so a noisy machine slows them alike), each round timing ``steps``
consecutive steps ended by a device sync; each round starts one contender later than the last, so no contender
always runs first. The figure per contender is the median images per second over the
rounds; ratios are to PyTorch eager when it ran (else to jaxcnn autodiff). PyTorch is optional: it is used
when installed, never a dependency of jaxcnn.

``run(...)`` returns the result as a dict (JSON-able); :func:`markdown` renders its table. ``jaxcnn bench``
writes both to a directory. ``run_dp(...)`` and :func:`dp_markdown` do the same for one DP-SGD step
(``jaxcnn bench --dp``, :mod:`jaxcnn.bench.dp`): jaxcnn's ghost and vmap DP steps, Opacus's ghost clipping and
jax_privacy's clipped gradients, timed against jaxcnn's non-private step. The parts: :mod:`jaxcnn.bench.harness`
(:func:`run`), :mod:`jaxcnn.bench.contenders` (each contender's runner; the PyTorch model comes from
:func:`jaxcnn.interop.torch_module`), :mod:`jaxcnn.bench.dp` (:func:`run_dp` and its contenders) and
:mod:`jaxcnn.bench.report` (the machine, memory and the Markdown tables).
"""

from jaxcnn.bench.contenders import CONTENDERS, LEARNING_RATE, MOMENTUM, Options, flax_loss
from jaxcnn.bench.dp import DP_CONTENDERS, run_dp
from jaxcnn.bench.harness import DTYPES, run
from jaxcnn.bench.report import dp_markdown, markdown
from jaxcnn.interop.torch import torch_module  # where it lived before jaxcnn.interop.torch

__all__ = [
    "CONTENDERS",
    "DP_CONTENDERS",
    "DTYPES",
    "LEARNING_RATE",
    "MOMENTUM",
    "Options",
    "dp_markdown",
    "flax_loss",
    "markdown",
    "run",
    "run_dp",
    "torch_module",
]
