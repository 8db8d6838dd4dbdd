"""Quiet gloo connections: gloo (the CPU backend's collectives across processes) writes
``[Gloo] Rank R is connected to P peer ranks. Expected number of connected peer ranks is : P`` to the C++
``std::cout`` (file descriptor 1) the first time a set of devices communicates, with no setting to turn it off.
:func:`connect` and :func:`connect_processes` make those first collectives happen at a known moment with file
descriptor 1 captured (:func:`quietly`), and write back everything captured except those lines. A line whose
counts differ (a peer that did not connect) is kept, as is every other line; errors travel as exceptions and on
stderr, which is not touched. A set of devices that first communicates later (a collective of the user's own
over another group) may still print the line once.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_CONNECTED = re.compile(
    rb"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. Expected number of connected peer "
    rb"ranks is : (\d+)\r?\n?"
)


def without_connection_lines(text: bytes) -> bytes:
    """``text`` less gloo's "Rank R is connected to P peer ranks" lines where P is the number expected."""
    kept = [
        line
        for line in text.splitlines(keepends=True)
        if not ((match := _CONNECTED.fullmatch(line)) and match[1] == match[2])
    ]
    return b"".join(kept)


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """File descriptor 1 captured while the block runs, then written back without gloo's connection lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            capture.seek(0)
            text = without_connection_lines(capture.read())
            while text:
                text = text[os.write(1, text) :]


def connect(mesh: Mesh) -> None:
    """Open the gloo connections between the processes of ``mesh`` (one all-reduce over all its devices) without
    gloo's connection lines on stdout; a later all-reduce over the same devices reuses them. Nothing to do in a
    single process or on a backend other than the CPU."""
    devices = mesh.devices.reshape(-1)
    if len({device.process_index for device in devices}) < 2 or jax.default_backend() != "cpu":
        return
    flat = Mesh(devices, ("connect",))
    ones = np.ones(len(devices), np.int32)
    shards = jax.make_array_from_callback(ones.shape, NamedSharding(flat, PartitionSpec("connect")), lambda i: ones[i])
    with quietly():
        jax.block_until_ready(jax.jit(jnp.sum, out_shardings=NamedSharding(flat, PartitionSpec()))(shards))


def connect_processes() -> None:
    """Open the gloo connections of a multi-process CPU run quietly (after ``jax.distributed.initialize``): one
    all-reduce over every device, and the barrier of ``jax.experimental.multihost_utils`` (an all-gather across
    the processes, one group per local device), which jaxcnn and orbax use before and around checkpoints."""
    if jax.process_count() < 2 or jax.default_backend() != "cpu":
        return
    from jax.experimental import multihost_utils

    connect(Mesh(np.array(jax.devices()), ("connect",)))
    with quietly():
        multihost_utils.sync_global_devices("jaxcnn-connect")
