"""Data augmentation on the device, inside the jit-compiled train step: random translation (pad and crop),
opt-in horizontal flips, and Gaussian noise, each example drawn independently from one key."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxcnn.data._dataset import DataError


def check_augmentation(translate: int = 0, flip: bool = False, noise: float = 0.0) -> None:
    """Raise :class:`DataError` naming a bad setting (``translate`` an int >= 0, ``flip`` a bool, ``noise`` a
    finite number >= 0)."""
    if isinstance(translate, bool) or not isinstance(translate, int) or translate < 0:
        raise DataError(f"augment translate must be an int >= 0 (pixels), got {translate!r}")
    if not isinstance(flip, bool):
        raise DataError(f"augment flip must be true or false, got {flip!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise DataError(f"augment noise must be a finite number >= 0, got {noise!r}")


def augment(key: jax.Array, x: jax.Array, *, translate: int = 0, flip: bool = False, noise: float = 0.0) -> jax.Array:
    """A randomly transformed copy of the batch ``x`` ``(N, H, W, C)``, the same shape and dtype.

    Args:
      key: the random key; example ``i`` draws from ``split(key, N)[i]``.
      translate: shift each image by up to this many pixels in each direction (uniform integers), filling with
        zeros: the same as zero-padding by ``translate`` and cropping at a random offset; below ``min(H, W)``
        (a larger shift leaves a blank image). After the per-channel standardisation of :mod:`jaxcnn.data`,
        zero is the mean pixel.
      flip: mirror each image left-right with probability 1/2 (off by default: digits are not symmetric).
      noise: add Gaussian noise of this standard deviation.

    Returns:
      The augmented batch; with every option off, ``x`` itself.
    """
    check_augmentation(translate, flip, noise)
    if x.ndim != 4:
        raise DataError(f"augment takes images (N, H, W, C), got shape {tuple(x.shape)}")
    if translate >= min(x.shape[1:3]):
        raise DataError(
            f"augment translate must be below the image size {x.shape[1]}x{x.shape[2]}, got {translate} "
            "(larger shifts leave blank images)"
        )
    if not translate and not flip and not noise:
        return x
    keys = jax.random.split(key, x.shape[0])

    def one(key, image):
        shift_key, flip_key, noise_key = jax.random.split(key, 3)
        if translate:
            height, width = image.shape[:2]
            padded = jnp.pad(image, ((translate, translate), (translate, translate), (0, 0)))
            top, left = jax.random.randint(shift_key, (2,), 0, 2 * translate + 1)
            image = jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, image.shape[2]))
        if flip:
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
        if noise:
            image = image + noise * jax.random.normal(noise_key, image.shape, image.dtype)
        return image

    return jax.vmap(one)(keys, x)
