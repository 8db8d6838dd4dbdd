"""``jax.jit`` for jaxcnn's train steps: on XLA:CPU, float32 and bfloat16 steps compile with
:data:`jaxcnn._xla_flags.STEP_COMPILER_OPTIONS` (YNNPACK for dots and reductions, XLA's own emitter for
convolutions; the hand conv rule's weight gradient as one convolution), float64 steps with XLA's defaults.

Why per compile and not through ``XLA_FLAGS``: the flag study (benchmarks/RESULTS.md) found those options 1.5x
faster for float32 training steps, but XLA's own emitter runs float64 convolutions 17x slower than YNNPACK, and
``XLA_FLAGS`` hold for every program of the process (gradient checks included). A step made by
:func:`jit_train_step` holds two jitted functions and picks one per call by the arguments' dtypes: any float64
array in them (parameters, optimizer state or batch) takes the one compiled with XLA's defaults.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxcnn import _xla_flags

_WIDE = (np.dtype(np.float64), np.dtype(np.complex128))


@functools.cache
def _options_accepted() -> bool:
    """Whether this jaxlib's XLA:CPU takes :data:`STEP_COMPILER_OPTIONS` (a tiny compile, once per process)."""
    try:
        jax.jit(lambda a: a + 1, compiler_options=_xla_flags.STEP_COMPILER_OPTIONS).lower(np.float32(0)).compile()
    except Exception as error:  # noqa: BLE001 -- any refusal means: compile with XLA's defaults
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(
            f"jaxcnn: this jaxlib's XLA:CPU refuses the train steps' compile option "
            f"{_xla_flags.STEP_COMPILER_OPTIONS} ({first}); they compile with XLA's defaults",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def step_compiler_options() -> dict[str, str] | None:
    """The compile options jaxcnn's float32/bfloat16 train steps get now: :data:`STEP_COMPILER_OPTIONS` on
    XLA:CPU when :func:`jaxcnn._xla_flags.steps_scoped` (the default) and this jaxlib accepts them, else None."""
    if not _xla_flags.steps_scoped() or jax.default_backend() != "cpu" or not _options_accepted():
        return None
    return dict(_xla_flags.STEP_COMPILER_OPTIONS)


def has_float64(tree: Any) -> bool:
    """Whether a jitted call on ``tree`` computes in float64: 64-bit mode is on (``jax_enable_x64``; without it
    jit makes float64 arrays float32) and an array leaf is float64 or complex128 (Python scalars do not count)."""
    if not jax.config.jax_enable_x64:
        return False
    for leaf in jax.tree.leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        if isinstance(dtype, np.dtype) and dtype in _WIDE:  # (np.dtype("float64") == None is True)
            return True
    return False


class ScopedStep:
    """A train step compiled two ways (see the module docstring): ``step(*args)`` runs ``tuned`` (with the
    compile options) unless an argument holds a float64 array, then ``plain`` (XLA's defaults). ``lower`` picks
    the same way; other attributes are ``plain``'s."""

    def __init__(self, plain: Callable, tuned: Callable, options: dict[str, str]):
        self.plain, self.tuned, self.compiler_options = plain, tuned, options
        functools.update_wrapper(self, plain)

    def pick(self, *args: Any, **kwargs: Any) -> Callable:
        """The jitted function that these arguments run."""
        return self.plain if has_float64((args, kwargs)) else self.tuned

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.pick(*args, **kwargs)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit(...).lower`` of the function these arguments run."""
        return self.pick(*args, **kwargs).lower(*args, **kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit(...).trace`` of the function these arguments run."""
        return self.pick(*args, **kwargs).trace(*args, **kwargs)

    def eval_shape(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit(...).eval_shape`` of the function these arguments run."""
        return self.pick(*args, **kwargs).eval_shape(*args, **kwargs)

    def clear_cache(self) -> None:
        """Drop both functions' compiled executables."""
        self.plain.clear_cache()
        self.tuned.clear_cache()

    def _cache_size(self) -> int:
        """Executables compiled so far, both ways together (``jax.jit``'s own counter)."""
        return self.plain._cache_size() + self.tuned._cache_size()

    def __getattr__(self, name: str) -> Any:
        if name in ("plain", "tuned") or name.startswith("__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.plain, name)


def jit_train_step(step: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(step, **jit_kwargs)``, and on XLA:CPU (by default, see :mod:`jaxcnn._xla_flags`) a
    :class:`ScopedStep` whose float32/bfloat16 calls compile with the train steps' compile options, traced with
    ``dw_method="auto"`` forming the conv weight gradient as one convolution. It asks JAX for its default backend,
    which starts it (set ``XLA_FLAGS`` and call ``jax.distributed.initialize`` before making a step)."""
    plain = jax.jit(step, **jit_kwargs)
    options = step_compiler_options()
    if options is None:
        return plain

    @functools.wraps(step)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        with _xla_flags.tracing_scoped_step():
            return step(*args, **kwargs)

    return ScopedStep(plain, jax.jit(scoped, compiler_options=options, **jit_kwargs), options)
