"""Data augmentation on the device, inside the jit-compiled train step: small random rotations and zooms (one
affine warp about the image centre, bilinear), random translation (pad and crop), opt-in horizontal flips, and
Gaussian noise, each example drawn independently from one key."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxcnn.data._dataset import DataError


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_augmentation(
    translate: int = 0, flip: bool = False, noise: float = 0.0, rotate: float = 0.0, scale: float = 0.0
) -> None:
    """Raise :class:`DataError` naming a bad setting (``translate`` an int >= 0, ``flip`` a bool, ``noise`` a
    finite number >= 0, ``rotate`` a number of degrees in [0, 180), ``scale`` a number in [0, 1))."""
    if isinstance(translate, bool) or not isinstance(translate, int) or translate < 0:
        raise DataError(f"augment translate must be an int >= 0 (pixels), got {translate!r}")
    if not isinstance(flip, bool):
        raise DataError(f"augment flip must be true or false, got {flip!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise DataError(f"augment noise must be a finite number >= 0, got {noise!r}")
    if not _finite(rotate) or not 0 <= rotate < 180:
        raise DataError(f"augment rotate must be a number of degrees in [0, 180), got {rotate!r}")
    if not _finite(scale) or not 0 <= scale < 1:
        raise DataError(f"augment scale must be a number in [0, 1), got {scale!r}")


def warp(image: jax.Array, angle: jax.Array, zoom: jax.Array) -> jax.Array:
    """``image`` ``(H, W, C)`` rotated by ``angle`` radians and zoomed by ``zoom`` about its centre.

    A positive angle turns the picture anticlockwise as displayed (row 0 at the top; 90 degrees is
    ``np.rot90``); a zoom above 1 enlarges it. Each output pixel samples the input bilinearly at the inverse
    transform of its position; samples outside the image read zeros. The centre (``((H-1)/2, (W-1)/2)``) stays
    where it is.

    Returns:
      The warped image, ``(H, W, C)``, the dtype of ``image``.
    """
    height, width = image.shape[:2]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    u, v = (rows - cy) / zoom, (cols - cx) / zoom  # the inverse zoom, then the inverse rotation
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_rows, src_cols = cy + cos * u + sin * v, cx - sin * u + cos * v
    top, left = jnp.floor(src_rows), jnp.floor(src_cols)
    fy, fx = (src_rows - top)[..., None], (src_cols - left)[..., None]
    top, left = top.astype(jnp.int32), left.astype(jnp.int32)

    def at(r, c):
        inside = ((r >= 0) & (r < height) & (c >= 0) & (c < width))[..., None]
        value = image[jnp.clip(r, 0, height - 1), jnp.clip(c, 0, width - 1)]
        return jnp.where(inside, value, jnp.zeros((), image.dtype)).astype(jnp.float32)

    out = (
        at(top, left) * (1 - fy) * (1 - fx)
        + at(top, left + 1) * (1 - fy) * fx
        + at(top + 1, left) * fy * (1 - fx)
        + at(top + 1, left + 1) * fy * fx
    )
    return out.astype(image.dtype)


def augment(
    key: jax.Array,
    x: jax.Array,
    *,
    translate: int = 0,
    flip: bool = False,
    noise: float = 0.0,
    rotate: float = 0.0,
    scale: float = 0.0,
) -> jax.Array:
    """A randomly transformed copy of the batch ``x`` ``(N, H, W, C)``, the same shape and dtype.

    Args:
      key: the random key; example ``i`` draws from ``split(key, N)[i]``.
      translate: shift each image by up to this many pixels in each direction (uniform integers), filling with
        zeros: the same as zero-padding by ``translate`` and cropping at a random offset; below ``min(H, W)``
        (a larger shift leaves a blank image). After the per-channel standardisation of :mod:`jaxcnn.data`,
        zero is the mean pixel.
      flip: mirror each image left-right with probability 1/2 (off by default: digits are not symmetric).
      noise: add Gaussian noise of this standard deviation.
      rotate: rotate each image about its centre by an angle drawn uniformly from ``[-rotate, rotate]``
        degrees (below 180), bilinearly, zeros outside (see :func:`warp`); applied before the translation.
      scale: zoom each image about its centre by a factor drawn uniformly from ``[1 - scale, 1 + scale]``
        (``scale`` in [0, 1)), in the same warp as the rotation.

    Returns:
      The augmented batch; with every option off, ``x`` itself.
    """
    check_augmentation(translate, flip, noise, rotate, scale)
    if x.ndim != 4:
        raise DataError(f"augment takes images (N, H, W, C), got shape {tuple(x.shape)}")
    if translate >= min(x.shape[1:3]):
        raise DataError(
            f"augment translate must be below the image size {x.shape[1]}x{x.shape[2]}, got {translate} "
            "(larger shifts leave blank images)"
        )
    if not translate and not flip and not noise and not rotate and not scale:
        return x
    keys = jax.random.split(key, x.shape[0])

    def one(key, image):
        shift_key, flip_key, noise_key = jax.random.split(key, 3)
        if rotate or scale:  # its own key, so the other draws are those of a run without the warp
            angle_key, zoom_key = jax.random.split(jax.random.fold_in(key, 3))
            angle = jnp.deg2rad(jax.random.uniform(angle_key, (), jnp.float32, -rotate, rotate))
            zoom = jax.random.uniform(zoom_key, (), jnp.float32, 1 - scale, 1 + scale)
            image = warp(image, angle, zoom)
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
