"""jaxcnn's XLA:CPU flag switch: ``JAXCNN_XLA_CPU_FLAGS`` adds flags to ``XLA_FLAGS`` when jaxcnn is imported,
before JAX starts its backend (XLA reads ``XLA_FLAGS`` once, when the first backend starts; importing jaxcnn
starts none, so :func:`apply`, run by ``jaxcnn/__init__.py``, can still add them).

Off by default. ``JAXCNN_XLA_CPU_FLAGS=recommended`` adds :data:`RECOMMENDED_CPU_FLAGS`, the winner of the flag
study (benchmarks/RESULTS.md, "XLA:CPU flag study"): float32 training steps 1.5x faster on a 2-core AVX-512
Xeon, but XLA's own convolution emitter, which then runs every convolution, is 17x slower in float64 (gradient
checks: 4x), and the flags apply process-wide. ``JAXCNN_XLA_CPU_FLAGS=FLAGS`` adds other flags.

- A flag the user's own ``XLA_FLAGS`` already names is never added: the user's value wins.
- ``--no-xla-cpu-flags`` on any ``jaxcnn`` command takes them back out (before any backend starts).
- When a backend had already started before jaxcnn was imported, nothing is changed (it would not take effect).
- The hand conv rule's ``dw_method="auto"`` follows the flags in effect (:func:`ynn_convolutions_off`).
"""

from __future__ import annotations

import os
import sys

ENV = "JAXCNN_XLA_CPU_FLAGS"

# XLA:CPU's YNNPACK fusions for dots (GEMMs, with what they absorb) and reductions only. jaxlib 0.10's default
# list is reductions, single dots and single convolutions; its YNNPACK convolutions ran mnist_cnn's and
# resnet20's float32 steps about 1.5x slower than XLA's own convolution emitter on a 2-core AVX-512 Xeon, and its
# element-wise fusions lost too. With these flags the hand-derived step (weight gradient as one convolution, see
# functional.conv.dw_method_for) ran 1.12x PyTorch eager against 0.72x with XLA's defaults. Not the default: XLA's
# own emitter runs float64 convolutions 17x slower than YNNPACK (benchmarks/RESULTS.md, "XLA:CPU flag study").
RECOMMENDED_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
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
    """Add the flags ``JAXCNN_XLA_CPU_FLAGS`` names (``recommended``: :data:`RECOMMENDED_CPU_FLAGS`; unset or
    empty: none) to ``XLA_FLAGS``, leaving out those the user's ``XLA_FLAGS`` names; returns what was added."""
    wanted = os.environ.get(ENV, "")
    if wanted.strip() == "recommended":
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
    """Take jaxcnn's flags back out of ``XLA_FLAGS`` (the CLI's ``--no-xla-cpu-flags``); True when that still
    takes effect (no backend started yet), False when it is too late."""
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


def ynn_convolutions_off(flags: str | None = None) -> bool:
    """Whether ``flags`` (default: this process's ``XLA_FLAGS``) keep XLA:CPU's YNNPACK fusions off single
    convolutions: the last ``--xla_cpu_experimental_ynn_fusion_type`` lists types without
    ``individual_convolution`` (or removes it with ``-individual_convolution``). XLA's default list has it."""
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
