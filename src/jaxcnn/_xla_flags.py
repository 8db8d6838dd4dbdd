"""jaxcnn's XLA:CPU flags: which library kernels XLA:CPU uses for jaxcnn's train steps.

The default (``JAXCNN_XLA_CPU_FLAGS`` unset, or ``steps``): on XLA:CPU, jaxcnn's float32 and bfloat16 train steps
(:func:`jaxcnn.train.make_train_step`, the data-parallel and DP-SGD steps) compile with the compile option
:data:`STEP_COMPILER_OPTIONS`, YNNPACK for dots and reductions only, and the hand conv rule forms the weight
gradient as one convolution there (:func:`ynn_convolutions_off`); everything else (float64 steps, gradient checks,
evaluation, the user's own ``jax.jit``) compiles with XLA's defaults. That is the winner of the flag study
(benchmarks/RESULTS.md, "XLA:CPU flag study"): float32 training steps about 1.5x faster on a 2-core AVX-512 Xeon;
process-wide it would have made float64 convolutions 17x slower (gradient checks: 4x), so it is scoped per compile
(:mod:`jaxcnn._step_jit`).

Other settings of ``JAXCNN_XLA_CPU_FLAGS``, read when jaxcnn is imported (:func:`apply`, before JAX starts its
backend; XLA reads ``XLA_FLAGS`` once, then):

- ``off`` or empty: nothing; every step compiles with XLA's defaults.
- ``recommended``: :data:`RECOMMENDED_CPU_FLAGS` added to ``XLA_FLAGS``, for the whole process.
- any other text: those flags added to ``XLA_FLAGS``, for the whole process.

- The user's own ``XLA_FLAGS`` win: a flag it names is never added, and when it names
  ``--xla_cpu_experimental_ynn_fusion_type`` the train steps get no compile option either.
- ``--no-xla-cpu-flags`` on any ``jaxcnn`` command is ``JAXCNN_XLA_CPU_FLAGS=off`` (taking back what was added, before
  any backend starts); the processes it starts inherit that.
- When a backend had already started before jaxcnn was imported, ``XLA_FLAGS`` is left alone (it would not take
  effect); the per-step compile option still applies.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator

ENV = "JAXCNN_XLA_CPU_FLAGS"

# XLA:CPU's YNNPACK fusions for dots (GEMMs, with what they absorb) and reductions only. jaxlib 0.10's default
# list is reductions, single dots and single convolutions; its YNNPACK convolutions ran mnist_cnn's and
# resnet20's float32 steps about 1.5x slower than XLA's own convolution emitter on a 2-core AVX-512 Xeon, and its
# element-wise fusions lost too. With these flags the hand-derived step (weight gradient as one convolution, see
# functional.conv.dw_method_for) ran 1.12x PyTorch eager against 0.72x with XLA's defaults. Not the default: XLA's
# own emitter runs float64 convolutions 17x slower than YNNPACK (benchmarks/RESULTS.md, "XLA:CPU flag study").
RECOMMENDED_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
# The same, as a per-compile option (jax.jit(..., compiler_options=...)): jaxcnn's default for its float32 and
# bfloat16 train steps on XLA:CPU. Per compile, XLA takes the proto enum names (it refuses "dot,reduce").
STEP_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
OFF = ("", "off")  # JAXCNN_XLA_CPU_FLAGS values that turn everything off
STEPS = "steps"  # JAXCNN_XLA_CPU_FLAGS value of the default (also when unset)
MEASURED_JAXLIB = "0.10"  # the jaxlib release the recommended flags were measured on

_state: dict[str, str | None] = {"original": None, "added": ""}


def _names(flags: str) -> set[str]:
    """The flag names (``--name``) in an ``XLA_FLAGS`` string."""
    return {item.partition("=")[0] for item in flags.split() if item.startswith("--")}


def _backend_started() -> bool:
    """Whether JAX has started a backend in this process (then ``XLA_FLAGS`` can no longer change anything)."""
    if "jax" not in sys.modules:
        return False  # JAX not even imported (and importing it here would cost jaxcnn's fast start-up)
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # noqa: BLE001 -- a JAX without that internal: assume not started (import time)
        return False


def apply() -> str:
    """Add the flags ``JAXCNN_XLA_CPU_FLAGS`` names (``recommended``: :data:`RECOMMENDED_CPU_FLAGS`; unset, empty,
    ``off`` or ``steps``: none) to ``XLA_FLAGS``, leaving out those the user's ``XLA_FLAGS`` names; returns what
    was added."""
    wanted = os.environ.get(ENV, STEPS).strip()
    if wanted.lower() in (*OFF, STEPS):
        wanted = ""
    elif wanted.lower() == "recommended":
        wanted = RECOMMENDED_CPU_FLAGS
    if _state["original"] is not None or not wanted.strip() or _backend_started():
        return _state["added"] or ""
    user = os.environ.get("XLA_FLAGS", "")
    taken = _names(user)
    added = " ".join(item for item in wanted.split() if item.partition("=")[0] not in taken)
    _state["original"] = user
    if added:
        os.environ["XLA_FLAGS"] = f"{user} {added}".strip()
    _state["added"] = added
    return added


def revert() -> bool:
    """Turn jaxcnn's XLA:CPU flags off (the CLI's ``--no-xla-cpu-flags``): ``JAXCNN_XLA_CPU_FLAGS=off`` from now on
    (the train steps compiled after this get no compile option) and what :func:`apply` added taken back out of
    ``XLA_FLAGS``; True when that still takes effect (no backend started yet), False when it is too late for
    ``XLA_FLAGS`` (the steps compiled from now on get no compile option either way)."""
    os.environ[ENV] = "off"
    if _state["original"] is None or not _state["added"]:
        return True
    if _backend_started():
        return False
    if _state["original"]:
        os.environ["XLA_FLAGS"] = _state["original"]
    else:
        os.environ.pop("XLA_FLAGS", None)
    _state["added"] = ""
    return True


def user_flags() -> str:
    """This process's ``XLA_FLAGS`` less the flags jaxcnn added: what the user set."""
    if _state["original"] is not None and _state["added"]:
        return _state["original"]
    return os.environ.get("XLA_FLAGS", "")


def applied() -> str:
    """The flags jaxcnn added to ``XLA_FLAGS`` in this process (empty: none)."""
    return _state["added"] or ""


YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def steps_scoped() -> bool:
    """Whether jaxcnn's float32/bfloat16 train steps compile with :data:`STEP_COMPILER_OPTIONS` on XLA:CPU:
    ``JAXCNN_XLA_CPU_FLAGS`` unset, ``steps`` or ``recommended``, and ``XLA_FLAGS`` not naming the YNNPACK fusion
    flag (the user's own setting wins, and ``recommended`` normally puts it there, process-wide)."""
    # "recommended" puts the flag in XLA_FLAGS (then this says False); where it came too late for that (a backend
    # had started before jaxcnn was imported), the steps still get it per compile
    if os.environ.get(ENV, STEPS).strip().lower() not in (STEPS, "recommended"):
        return False
    return YNN_FUSION_FLAG not in _names(os.environ.get("XLA_FLAGS", ""))


_scoped_trace: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxcnn_scoped_step_trace", default=False)


@contextlib.contextmanager
def tracing_scoped_step() -> Iterator[None]:
    """While tracing a train step that compiles with :data:`STEP_COMPILER_OPTIONS`: :func:`ynn_convolutions_off`
    says True (so ``dw_method="auto"`` picks the formulation that wins under them)."""
    token = _scoped_trace.set(True)
    try:
        yield
    finally:
        _scoped_trace.reset(token)


def ynn_convolutions_off(flags: str | None = None) -> bool:
    """Whether ``flags`` (default: this process's ``XLA_FLAGS``) keep XLA:CPU's YNNPACK fusions off single
    convolutions: the last ``--xla_cpu_experimental_ynn_fusion_type`` lists types without
    ``individual_convolution`` (or removes it with ``-individual_convolution``). XLA's default list has it. With
    ``flags`` not given, also True while tracing a train step compiled with :data:`STEP_COMPILER_OPTIONS`."""
    if flags is None and _scoped_trace.get():
        return True
    value = None
    for item in (os.environ.get("XLA_FLAGS", "") if flags is None else flags).split():
        key, _, setting = item.partition("=")
        if key == YNN_FUSION_FLAG:
            value = setting
    if value is None:
        return False
    types = [t.strip().lower() for t in value.split(",") if t.strip()]
    if any(t[0] in "+-" for t in types):  # edits of XLA's default list
        return "-individual_convolution" in types
    return "individual_convolution" not in types
