"""Test configuration: 64-bit types on (float64 checks), silent rank promotion made an error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# max relative error (max |a - b| / max |b|) allowed between a hand rule and jax.vjp, per dtype
TOLERANCE = {jnp.float64: 1e-10, jnp.float32: 1e-4}
DTYPES = [jnp.float64, jnp.float32]


def relative_error(actual, expected) -> float:
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    scale = max(np.abs(b).max(initial=0.0), np.abs(a).max(initial=0.0))
    return float(np.abs(a - b).max(initial=0.0) / scale) if scale > 0 else 0.0


def assert_trees_close(actual, expected, dtype, what: str = "") -> None:
    """Every leaf within the dtype's relative tolerance (and the same tree structure)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        error = relative_error(a, b)
        assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3e} > {TOLERANCE[dtype]:.0e}"


def normal(seed: int, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# the longest single tests, run first so that no worker is left with one of them at the end
FIRST = ("tests/test_readme.py::test_python_blocks_run", "tests/test_parallel.py::test_two_processes")  # prefixes


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))
