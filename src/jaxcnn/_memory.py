"""How much memory this machine has, to refuse absurd sizes before allocating them (instead of hanging or
failing later with a generic ``MemoryError``), and byte counts written for people."""

from __future__ import annotations

import math
import os


def host_bytes() -> int | None:
    """The host's physical memory in bytes, or None where the OS does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def device_bytes() -> int | None:
    """The memory of the default JAX device in bytes: its allocator's limit on an accelerator, the host's
    physical memory on the CPU backend; None where neither is known."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except Exception:  # a backend without memory statistics
            limit = None
        if isinstance(limit, int) and limit > 0:
            return limit
    return host_bytes()


def format_bytes(count: int) -> str:
    """``count`` bytes as a short decimal string: ``"512 B"``, ``"1.2 kB"``, ``"31.4 TB"``, ``"31,400 TB"``."""
    if count < 1000:
        return f"{count} B"
    exponent = min(int(math.log10(count) // 3), 4)
    value = count / 1000**exponent
    text = f"{value:.3g}" if value < 1000 else f"{value:,.0f}"
    return f"{text} {('B', 'kB', 'MB', 'GB', 'TB')[exponent]}"


def too_large(count: int, limit: int | None) -> str | None:
    """None if ``count`` bytes fit in ``limit``; else the tail of a message: ``"would need 31.4 TB, more than
    the 24 GB of memory here"``."""
    if limit is None or count <= limit:
        return None
    return f"would need {format_bytes(count)}, more than the {format_bytes(limit)} of memory here"
