"""Test configuration: 64-bit types on (float64 checks), silent rank promotion made an error, one persistent
compilation cache for the whole test run (every worker and every `python -m jaxcnn` process it starts)."""

import hashlib
import importlib.util
import os
import pathlib
import shutil
import tempfile

# The suite compiles far more than it runs: in the test processes XLA's backend optimisations are off, which
# makes a compile about a third cheaper. Every comparison in the suite is between paths compiled alike (or within
# a stated tolerance). The flag is read when JAX starts its backend, here; the processes the tests start (the CLI
# runs, which train for longer) do not inherit it and compile as users' runs do.
# XLA:CPU flags asked for with JAXCNN_XLA_CPU_FLAGS (jaxcnn._xla_flags) go in first, as importing jaxcnn puts them
# in a user's process before JAX starts: JAXCNN_XLA_CPU_FLAGS=recommended runs the suite under them.
import jaxcnn  # noqa: E402,F401

_XLA_FLAGS = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = " ".join([_XLA_FLAGS or "", "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402

jax.devices()
if _XLA_FLAGS is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _XLA_FLAGS

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# The same step, model or check is compiled by many tests, in both xdist workers and in the processes the CLI
# tests start: XLA's persistent cache compiles each once per test run. A cache hit loads the executable a compile
# would give, so results stay bit for bit the same. Every compile is cached, however short: a `python -m jaxcnn`
# process spends about 2 s compiling the small eager operations of start-up (initialisation, the data's
# transfers), each well under a second, which a cache of only compiles over 0.3 s made every such process repeat
# (test_cli_train.py: 72 s of CPU with the 0.3 s floor, 55 s without; in-process files cost the same either way).
# The controller makes the directory before it starts its workers (they inherit its environment) and removes it at
# the end. JAXCNN_TEST_CACHE=off runs without it.
OWNER = "JAXCNN_TEST_CACHE" not in os.environ
if OWNER:
    os.environ["JAXCNN_TEST_CACHE"] = tempfile.mkdtemp(prefix="jaxcnn-tests-")
CACHE = os.environ["JAXCNN_TEST_CACHE"]
if CACHE != "off":
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
    if OWNER:
        shutil.rmtree(CACHE, ignore_errors=True)


# Environment variables that the processes a test starts inherit: a test that changes one and does not put it back
# breaks every later CLI test in its worker (once, in CI: a leaked XLA_FLAGS=--xla_cpu_c=3 made XLA abort them).
_GUARDED_ENV = ("XLA_FLAGS", "JAXCNN_XLA_CPU_FLAGS", "JAXCNN_DW_METHOD")


@pytest.fixture(autouse=True)
def _environment_is_put_back():
    """Fail the test that leaves XLA_FLAGS, JAXCNN_XLA_CPU_FLAGS or JAXCNN_DW_METHOD changed."""
    before = {name: os.environ.get(name) for name in _GUARDED_ENV}
    yield
    after = {name: os.environ.get(name) for name in _GUARDED_ENV}
    changed = {name: (before[name], after[name]) for name in _GUARDED_ENV if before[name] != after[name]}
    for name, (value, _) in changed.items():  # put it back, so that only this test fails
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    assert not changed, f"the test left the environment changed (before, after): {changed}"


def unset_env(monkeypatch, *names: str) -> None:
    """Unset ``names`` for this test and have them put back after it, also where the code under test writes
    ``os.environ`` itself (jaxcnn._xla_flags does): ``setenv`` first, so that monkeypatch records the old state
    even of an unset variable (``delenv`` alone records nothing then, and a value the test left leaked)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


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
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        error = relative_error(a, b)
        assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3e} > {TOLERANCE[dtype]:.0e}"


def normal(seed: int, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# the longest single tests, run first so that no worker is left with one of them at the end
FIRST = ("tests/test_readme.py::test_python_blocks_run", "tests/test_parallel.py::test_two_processes")  # prefixes


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config, items):
    """Run the longest tests first; sample the big tables (``@pytest.mark.sample(k)``).

    A test function marked ``sample(k)`` keeps about one in ``k`` of its parametrized cases in the default
    suite, chosen by a hash of the case's id (the same cases on every machine and every run); the others are
    marked ``slow``, so ``python -m pytest -m slow`` runs them and ``python -m pytest -m ""`` runs the whole table.
    """
    for item in items:
        marker = item.get_closest_marker("sample")
        if marker is None or not hasattr(item, "callspec"):
            continue
        (every,) = marker.args
        if int(hashlib.sha256(item.callspec.id.encode()).hexdigest(), 16) % every != 0:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))


def same_bits(a, b) -> bool:
    """Whether two train states hold the same bits: parameters, model state, optimizer state, step and key."""
    leaves = [
        jax.tree.leaves((s.params, s.model_state, s.opt_state, s.step, jax.random.key_data(s.key))) for s in (a, b)
    ]
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(*leaves, strict=True))


def corrupt_latest(workdir):
    """Flip one byte in the middle of an array file of the workdir's latest checkpoint; return its directory."""
    from jaxcnn import train

    with train.Checkpointer(workdir / "checkpoints") as checkpointer:
        latest = checkpointer.path(checkpointer.latest_step())
    files = sorted(p for p in (latest / "state").rglob("*") if p.is_file() and p.parent.name == "d")
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    return latest


def load_file(relative: str):
    """A Python file of the repository that is not a package module (an example, a benchmark), as a module:
    ``load_file("examples/custom_layer.py")``."""
    path = pathlib.Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny():
    """A tiny CNN registered as "bench_tiny" (every benchmark contender has its layers), for tests of the bench
    harness and its options: the harness, not the model, is under test, and compiling lenet5 three ways took most
    of their time."""
    from jaxcnn import models
    from models_for_tests import bench_tiny

    models.register("bench_tiny", bench_tiny, input_shape=(6, 6, 1))
    yield "bench_tiny"
    models.unregister("bench_tiny")
