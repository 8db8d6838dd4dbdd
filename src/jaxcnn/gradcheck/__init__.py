"""The three-way gradient check: hand-derived rules vs JAX autodiff vs finite differences.

:func:`check_model` compares, for one batch:

* **per layer** -- each leaf layer's ``backward`` against ``jax.vjp`` of its own forward, at the input the layer
  actually receives inside the model, for a random output cotangent: the input cotangent and every parameter;
  plus a central finite difference of ``<forward(p, x), dy>`` along one random direction per quantity;
* **per parameter, whole model** -- the loss and its gradient in the gradient modes of
  :func:`jaxcnn.backprop.loss_and_grads`: ``"engine"`` (the explicit reverse pass) and ``"manual"`` (``jax.grad``
  through the custom_vjp bridge of the hand rules), each against ``"autodiff"`` (``jax.grad`` through the plain
  forward); plus a central finite difference of the loss along a random direction in each parameter, taken
  (with the engine's gradient) at the parameters plus a little noise, off the kinks that zero biases on zero
  inputs sit on.

:func:`check_op` does the same for one functional op.

**Points.** Every comparison is made at the given parameters and inputs (``point`` "given") and again at
``perturbations`` (default 1) seeded random points near them (``point`` "perturbed(seed=S)"): each
floating-point parameter and input plus ``0.5 * scale * N(0, 1)`` elementwise, where ``scale`` is the leaf's
standard deviation, or for a scalar or constant leaf the size of its values but at least 1. Initial values
are special: a scale at 1, a bias at 0, a learnable ``beta`` at 1 make wrong rules (a dropped factor of
``beta``, a wrong sign on a term multiplied by the bias) give the right numbers, and only the perturbed point
catches them. Where the perturbed function is not finite (an op with a restricted domain), the noise is
halved until it is. State (running statistics) and integer inputs stay as given.

Tolerances (:data:`TOLERANCES`), by the dtype the gradients are computed in:

==========  ================================  =================================  ==============================
dtype       hand vs autodiff (normwise rel.)  finite differences (rel.)          absolute floor (x largest grad)
==========  ================================  =================================  ==============================
float64     1e-10                             1e-5  (step 1e-6)                  1e-13
float32     1e-4                              1e-2  (step 1e-6, in float64)      1e-5
==========  ================================  =================================  ==============================

* Two arrays: the error is ``max|a - b| / max(max|a|, max|b|)`` (normwise over the leaf, 0 when both are 0).
  A comparison also passes when ``max|a - b|`` is below the floor times the largest entry of the layer's (or
  the model's) whole gradient: a gradient that is exactly zero (a bias feeding a centring op) carries
  round-off that no relative measure can judge.
* A finite difference: ``(f(p + h v) - f(p - h v)) / 2h`` along a random unit direction ``v``, differenced
  elementwise and projected on the output cotangent, against ``<g, v>``; the error is divided by
  ``max(|fd|, |<g, v>|, |g| / sqrt(n))`` and errors below the float64 round-off of the evaluations pass.
  That round-off is ``R = 5 eps |f| / h`` (each evaluation of ``f`` is good to a few eps, and the difference of
  two is divided by ``2h``; for an array ``f``, ``sum |f| |cotangent|`` over the entries that changed, or over
  all when none did); a directional derivative below it cannot be resolved. A row whose finite
  difference and ``|<g, v>|`` are both below ``R`` (or ``<g, v>`` below the floor above, for the gradient's own
  round-off in its dtype) passes as ``"zero gradient"``: the gradient of a bias feeding a BatchNorm is exactly
  zero, the loss does not change by a bit under the step, and the hand rule's 1e-17 is round-off.
  Finite differences are always evaluated in float64 (in float32 they resolve only about three digits);
  the float32 tolerance reflects the accuracy of a float32 gradient itself. Layer-level ones are taken at
  the recorded input plus a little noise, so that ties and kinks (exact zeros after a ReLU, equal values in
  a max-pool window) do not sit under the step.
* A gradient that is identically zero can only be checked against the floors; its finite-difference rows
  read "zero gradient" (in the ok column and the summary).

A layer's ``backward`` that returns the wrong form (``dx`` of the wrong shape, parameter gradients under other
keys, ``dx`` alone) raises :class:`jaxcnn.nn.BackwardError` naming the layer, here as in training.

``progress`` (a callable) receives each :class:`Check` as soon as it is made; :func:`header_lines` and
:func:`format_row` print them as a table, row by row (``jaxcnn gradcheck`` does).

The parts: :mod:`~jaxcnn.gradcheck.layers`, :mod:`~jaxcnn.gradcheck.model` and :mod:`~jaxcnn.gradcheck.op`
(the three checks), :mod:`~jaxcnn.gradcheck.checks` (what they share: settings, rows, points),
:mod:`~jaxcnn.gradcheck.numerics` (draws, casts, comparisons, finite differences, perturbed points) and
:mod:`~jaxcnn.gradcheck.report` (tolerances, rows, the report).
"""

from jaxcnn.gradcheck.checks import Progress
from jaxcnn.gradcheck.layers import check_layers
from jaxcnn.gradcheck.model import check_model
from jaxcnn.gradcheck.numerics import compare
from jaxcnn.gradcheck.op import check_op
from jaxcnn.gradcheck.report import TOLERANCES, Check, Report, Tolerance, format_row, header_lines

__all__ = [
    "TOLERANCES",
    "Check",
    "Progress",
    "Report",
    "Tolerance",
    "check_layers",
    "check_model",
    "check_op",
    "compare",
    "format_row",
    "header_lines",
]
