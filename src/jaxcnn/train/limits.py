"""Checks of a run's size and settings against its data and this machine, made before anything is allocated
or written: a translation that would blank the images out, a train state that would not fit in memory."""

from __future__ import annotations

from typing import Any

import jax

from jaxcnn._memory import device_bytes, too_large
from jaxcnn.train.config import Config, ConfigError, ConfigWarning


def check_augmentation(config: Config, input_shape: tuple[int, ...]) -> list[ConfigWarning]:
    """Refuses augmentation settings that make no sense for images of ``input_shape`` ``(H, W, C)``.

    A translation by ``t`` pixels shifts each image by up to ``t`` in each direction, filling with zeros: from
    ``t >= min(H, W)`` on, some shifts leave nothing of the image, so such a run learns from blanks.

    Returns:
        Warnings for settings that are allowed but likely harmful: a translation by more than half the image,
        which blanks out more than half of many images.

    Raises:
        ConfigError: ``augment_translate`` >= ``min(H, W)``.
    """
    height, width = int(input_shape[0]), int(input_shape[1])
    translate = config.augment_translate
    if translate >= min(height, width):
        raise ConfigError(
            f"augment_translate must be below the image size, {height}x{width}, got {translate}: "
            f"shifts of {min(height, width)} pixels or more leave blank images",
            "augment_translate",
        )
    if 2 * translate > min(height, width):
        return [
            ConfigWarning(
                f"augment_translate {translate} is above half the image size, {height}x{width}: shifts that large "
                "leave less than half of many images",
                "augment_translate",
            )
        ]
    return []


def state_bytes(state: Any) -> int:
    """The bytes of every array leaf of ``state`` (arrays or ``jax.ShapeDtypeStruct``)."""
    total = 0
    for leaf in jax.tree.leaves(state):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            total += int(leaf.size) * dtype.itemsize
    return total


def check_state_memory(config: Config, make_state: Any, num_classes: int) -> None:
    """Refuses a run whose train state (parameters and optimizer state, all ensemble members) and gradients
    would not fit in the default device's memory, measured from the shapes alone (``jax.eval_shape`` of
    ``make_state()``), before anything is allocated.

    Raises:
        ConfigError: naming ``ensemble`` for an ensemble; ValueError naming the model and its class count otherwise.
    """
    abstract = jax.eval_shape(make_state)
    needed = state_bytes(abstract) + state_bytes(abstract.params)  # the state, and the gradients in each step
    problem = too_large(needed, device_bytes())
    if problem is None:
        return
    if config.ensemble > 1:
        raise ConfigError(
            f"ensemble {config.ensemble}: the train state and gradients of {config.ensemble} {config.model} "
            f"models {problem}",
            "ensemble",
        )
    raise ValueError(f"{config.model} with {num_classes} classes: its train state and gradients {problem}")
