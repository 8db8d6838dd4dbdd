"""Meshes and placement for data parallelism, and ``jax.distributed`` for runs over several processes.

:func:`data_mesh` builds a one-axis ``Mesh`` (:data:`AXIS`, ``"data"``) over the devices of every process; the
batch is sharded along it and the train state replicated (:func:`replicate`, :func:`shard_batch`,
:func:`sharded_batches`). :func:`initialize` starts ``jax.distributed`` for runs over several processes (hosts);
each process then feeds only its own rows of every batch. The train steps compiled for a mesh live in
:mod:`jaxcnn.train.data_parallel`; this module sits below :mod:`jaxcnn.train` and knows nothing of training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcnn import _gloo
from jaxcnn._validate import is_int
from jaxcnn.data import ahead, epoch_order, num_batches

AXIS = "data"  # the name of the mesh axis the batch is sharded along

__all__ = ["AXIS", "data_mesh", "initialize", "replicate", "replicated", "shard_batch", "sharded_batches"]


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` for a run over several processes (hosts); call it before any JAX computation.

    Arguments not given are read from the environment: ``JAX_COORDINATOR_ADDRESS`` (``HOST:PORT``),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With none of the three anywhere it does nothing (a single
    process) and returns False. On CPU it selects the gloo collectives, so processes on one machine (or on
    hosts that reach each other over TCP) can all-reduce, and opens their connections at once (without gloo's
    "[Gloo] Rank R is connected" lines on stdout).

    Raises:
      ValueError: a partial or malformed set of arguments, naming what is wrong.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    given = {"coordinator": coordinator, "num-processes": num_processes, "process-id": process_id}
    if all(value is None for value in given.values()):
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(
            "a multi-process run needs --coordinator, --num-processes and --process-id; missing "
            + ", ".join("--" + name for name in missing)
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if not is_int(num_processes) or num_processes < 1:
        raise ValueError(f"--num-processes must be an int >= 1, got {num_processes!r}")
    if not is_int(process_id) or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id!r}")
    # the CPU backend's collectives across processes (a GPU backend uses NCCL and ignores this setting)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    _gloo.connect_processes()  # now, without gloo's "[Gloo] Rank 0 is connected" lines
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def data_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh (axis ``"data"``) over ``devices`` devices in all, the same number from every process.

    Args:
      devices: the total device count (a multiple of ``jax.process_count()``, at most ``len(jax.devices())``);
        None takes every device of every process.

    Raises:
      ValueError: a count that is not a positive int, exceeds the devices there are, or does not split evenly
        over the processes.
    """
    processes = jax.process_count()
    available = jax.devices()
    if devices is None:
        devices = len(available)
    if not is_int(devices) or devices < 1:
        raise ValueError(f"devices must be an int >= 1, got {devices!r}")
    if devices > len(available):
        hint = (
            ""
            if jax.default_backend() != "cpu"
            else " (simulate more CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
        raise ValueError(f"asked for {devices} devices but only {len(available)} are available{hint}")
    if devices % processes:
        raise ValueError(f"devices ({devices}) must be a multiple of the number of processes ({processes})")
    per_process = devices // processes
    chosen = []
    for process in range(processes):
        local = [d for d in available if d.process_index == process]
        if len(local) < per_process:
            raise ValueError(f"process {process} has {len(local)} devices, {per_process} are needed")
        chosen.extend(local[:per_process])
    mesh = Mesh(np.array(chosen), (AXIS,))
    _gloo.connect(mesh)  # a subset of the devices is a new set of gloo connections: opened quietly
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that places an array whole on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _global_array(value: Any, sharding: NamedSharding) -> jax.Array:
    # a copy: on CPU np.asarray may view the buffer of a jax array that a donating step will later reuse
    host = np.array(value, copy=True)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every array leaf placed whole on every device of ``mesh`` (random keys included).

    Every process must pass the same values (a state built from the same seed, or restored from the same
    checkpoint); each process places only its own devices' copies.
    """
    sharding = replicated(mesh)

    def place(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = _global_array(jax.random.key_data(leaf), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return _global_array(leaf, sharding)

    return jax.tree.map(place, tree)


def shard_batch(x: Any, mesh: Mesh, index: np.ndarray | None = None) -> jax.Array:
    """Rows ``x[index]`` (all rows when ``index`` is None) as one global array sharded along ``mesh``'s axis.

    Each process gathers only the rows its own devices hold. A batch whose size does not divide by the device
    count (the last partial batch of an epoch) is replicated instead: every device computes it whole, which
    gives the same result.
    """
    rows = np.arange(len(x)) if index is None else np.asarray(index)
    shape = (len(rows), *np.shape(x)[1:])
    spec = PartitionSpec(AXIS) if len(rows) % mesh.size == 0 else PartitionSpec()
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(
        shape, sharding, lambda where: np.asarray(x[rows[where[0]]])[(slice(None),) + where[1:]]
    )


def sharded_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    mesh: Mesh,
    *,
    key: jax.Array | None = None,
    prefetch: int = 2,
    skip: int = 0,
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """:func:`jaxcnn.data.batches` for a mesh: the same batches in the same order (the first ``skip`` left out),
    each sharded along the mesh's ``"data"`` axis by :func:`shard_batch`, ``prefetch`` of them placed ahead."""
    num_batches(len(x), batch_size)  # checks batch_size
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    order = np.arange(len(x)) if key is None else epoch_order(key, len(x))
    order = order[skip * batch_size :]
    indices = (order[start : start + batch_size] for start in range(0, len(order), batch_size))
    return ahead(((shard_batch(x, mesh, i), shard_batch(y, mesh, i)) for i in indices), prefetch)
