"""The benchmark's report: the machine it ran on, its memory, and the result as a Markdown table."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import statistics
import sys
from typing import Any

import jax


def machine() -> dict[str, Any]:
    """The machine and the versions of the frameworks (torch: None when it is not installed)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(device.device_kind) for device in jax.devices()],
    }
    for package in ("flax", "optax"):
        info[package] = __import__(package).__version__
    try:  # the installed version, without importing torch (seconds) when no PyTorch contender ran
        info["torch"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        info["torch"] = None
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def peak_memory() -> dict[str, Any]:
    """The device's peak memory in use (None where the backend does not tell) and the process's max RSS."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    return {
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _memory_text(memory: dict[str, int] | None) -> str:
    """A contender's memory in MiB: XLA's temporaries (plus arguments) for JAX, the CUDA peak for PyTorch."""
    if not memory:
        return ""
    if "temp_bytes" in memory:
        return f"{memory['temp_bytes'] / 2**20:,.1f} temp + {memory['argument_bytes'] / 2**20:,.1f} args"
    return f"{memory['peak_allocated_bytes'] / 2**20:,.1f} peak"


def _machine_line(machine: dict[str, Any]) -> str:
    return (
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, backend {machine['backend']} "
        f"({', '.join(sorted(set(machine['devices'])))}); {machine['platform']}"
    )


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table (median img/s, ratio, compile time) with the machine and settings."""
    machine, settings = result["machine"], result["settings"]
    lines = [
        _machine_line(machine),
        f"Versions: python {machine['python']}, jax {machine['jax']}, flax {machine['flax']}, "
        f"optax {machine['optax']}, torch {machine['torch']}",
        f"Settings: batch {settings['batch_size']}, {settings['rounds']} interleaved rounds of "
        f"{settings['steps']} steps (median), {settings['optimizer']}, {settings['dtype']}"
        + (
            f", {settings.get('steps_per_call')} steps per JAX call (lax.scan)"
            if settings.get("steps_per_call", 1) > 1
            else ""
        )
        + (", remat" if settings.get("remat") else "")
        + (f", XLA_FLAGS={settings['xla_flags']}" if settings.get("xla_flags") else "")
        + (f", jaxcnn's XLA:CPU flags {settings['jaxcnn_cpu_flags']}" if settings.get("jaxcnn_cpu_flags") else "")
        + (
            f", jaxcnn's float32/bfloat16 train steps compiled with {settings['jaxcnn_step_options']}"
            if settings.get("jaxcnn_step_options")
            else ""
        ),
        *[f"Flag set {name}: {flags or '(no flags)'}" for name, flags in settings.get("xla_flag_sets", {}).items()],
        "",
        "| model | contender | median img/s | ratio | compile s | memory MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x {row['ratio_to']}"
        lines.append(
            f"| {row['model']} | {row['contender']} | {row['images_per_second']:,.0f} | {ratio} | "
            f"{row['seconds_to_compile']:.1f} | {_memory_text(row.get('memory'))} |"
        )
    for contender, reason in result.get("skipped", {}).items():
        lines.append(f"\nSkipped {contender}: {reason}")
    memory = result["memory"]
    if memory.get("device_peak_bytes"):
        lines.append(f"\nDevice peak memory: {memory['device_peak_bytes'] / 2**20:,.0f} MiB")
    lines.append(f"\nProcess max RSS: {memory['process_max_rss_bytes'] / 2**20:,.0f} MiB")
    return "\n".join(lines) + "\n"


def dp_markdown(result: dict[str, Any]) -> str:
    """The DP-SGD benchmark (:func:`jaxcnn.bench.dp.run_dp`) as a Markdown table: median milliseconds per step
    and the rounds' range, time (median, and its range round by round) and XLA temp size as ratios to the
    non-private step, what each contender computes, and a line per contender that did not run."""
    machine, settings = result["machine"], result["settings"]
    lines = [
        _machine_line(machine),
        f"Versions: python {machine['python']}, jax {machine['jax']}, optax {machine['optax']}, torch "
        f"{machine['torch']}, opacus {machine.get('opacus')}, jax_privacy {machine.get('jax_privacy')}",
        f"Settings: batch {settings['batch_size']}, {settings['rounds']} interleaved rounds of {settings['steps']} "
        f"steps (median), {settings['optimizer']}, float32, clip {settings['l2_norm_clip']}, noise multiplier "
        f"{settings['noise_multiplier']}; ratios to {settings['reference']} (the non-private step)",
        "",
        "| model | contender | what it computes | median ms/step (range) | time ratio (by round: median: range) | "
        "XLA temp MiB | temp ratio | compile s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        ms = [1000 * settings["batch_size"] / rate for rate in row["rounds_images_per_second"]]
        median = 1000 * settings["batch_size"] / row["images_per_second"]
        ratio = "" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}x"
        rounds = row.get("round_time_ratios")
        if rounds and row["contender"] != settings["reference"]:
            ratio += f" ({statistics.median(rounds):.2f}: {min(rounds):.2f}-{max(rounds):.2f})"
        memory = row.get("memory") or {}
        temp = memory.get("temp_bytes")
        temp_text = f"{temp / 2**20:,.1f}" if temp is not None else _torch_memory_text(memory)
        temp_ratio = "" if row["temp_ratio"] is None else f"{row['temp_ratio']:.2f}x"
        lines.append(
            f"| {row['model']} | {row['contender']} | {row['what']} | {median:,.1f} ({min(ms):,.1f}-{max(ms):,.1f}) "
            f"| {ratio} | {temp_text} | {temp_ratio} | {row['seconds_to_compile']:.1f} |"
        )
    for contender, reason in result.get("skipped", {}).items():
        lines.append(f"\nSkipped {contender}: {reason}")
    lines.append(f"\nProcess max RSS: {result['memory']['process_max_rss_bytes'] / 2**20:,.0f} MiB")
    return "\n".join(lines) + "\n"


def _torch_memory_text(memory: dict[str, int]) -> str:
    """PyTorch's CUDA peak, or why there is none."""
    if "peak_allocated_bytes" in memory:
        return f"{memory['peak_allocated_bytes'] / 2**20:,.1f} (CUDA peak)"
    return "n/a (CPU)"
