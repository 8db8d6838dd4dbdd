"""One image file at a time: the index-time header check, decoding to RGB, and the ImageNet augmentations.

Everything here is NumPy, Pillow and simplejpeg (libjpeg-turbo), with plain top-level functions, so that the
input pipeline's worker processes can call it. JPEG goes through simplejpeg, scaled down in the DCT domain
(by 1/2, 1/4 or 1/8) when the requested output allows it; CMYK and YCCK JPEG, PNG and every other format go
through Pillow (a JPEG through Pillow is scaled with ``Image.draft``, the same libjpeg scaling). Any problem with
a file is a :class:`BadImageError`, never another exception type. EXIF orientation is not applied (neither
torchvision's ``ImageFolder`` nor libjpeg applies it).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from jaxcnn.data._dataset import DataError

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk's type and its (fixed) CRC
_HEAD = 1 << 13  # bytes read first from the front of a file; a JPEG header reaching further is read on
_TAIL = 1 << 14  # bytes from the end searched for the end-of-image marker / the IEND chunk
_JPEG_MODES = {"Gray": "L", "YCbCr": "RGB", "RGB": "RGB", "CMYK": "CMYK", "YCCK": "CMYK"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_Range = tuple[float, float]
_PROBE_BLOCK = 256  # files per task of probe_many's thread pool (one future per file would not scale to 1M)


class BadImageError(DataError):
    """A file that is not a usable image. ``path``: the file (``"<bytes>"`` for bytes without one); ``reason``:
    what is wrong, in a few words (``"empty file"``, ``"truncated JPEG (no end-of-image marker)"``)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # pickles across worker processes with both attributes
        return BadImageError, (self.path, self.reason)


class ImageInfo(NamedTuple):
    """What the header check learned about a file without decoding it: its size (rows and columns, > 0), its
    ``format`` (``"JPEG"``, ``"PNG"`` or another Pillow format name) and colour ``mode`` in Pillow's names
    (``"RGB"``, ``"L"``, ``"CMYK"``, ``"P"``, ``"RGBA"``, ``"I;16"``...)."""

    height: int
    width: int
    format: str
    mode: str


def probe(path: str | os.PathLike) -> ImageInfo:
    """Check one file's header and ending without decoding its pixels (the index-time check).

    Reads the first 8 KiB (more only for a JPEG whose header is longer) and the last 16 KiB. A JPEG's header
    is parsed by libjpeg-turbo up to its first scan, and an end-of-image marker (``FF D9``) must follow the scan
    start within the last 16 KiB (trailing padding or other bytes after it are accepted); a PNG must hold its
    ``IEND`` chunk within the last 16 KiB. Other formats get Pillow's lazy header parse only.

    Returns the file's :class:`ImageInfo`; raises :class:`BadImageError` for a file that is unreadable, empty,
    not an image, truncated, or has a corrupt header or a zero dimension (``reason`` says which).
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise BadImageError(path, "empty file")
            head = file.read(_HEAD)
            if head.startswith(_JPEG_MAGIC):
                info = _probe_jpeg(file, head, size, path)
            else:
                info = _probe_pillow(file, head, size, path)
    except OSError as error:  # the file's own I/O; Pillow's OSErrors are turned into reasons where they arise
        raise BadImageError(path, f"unreadable: {error.strerror or error}") from None
    if info.height <= 0 or info.width <= 0:
        raise BadImageError(path, f"zero dimensions ({info.height}x{info.width})")
    return info


def _probe_jpeg(file, head: bytes, size: int, path) -> ImageInfo:
    data, pos, marker = head, 2, 0
    while marker != 0xDA:  # walk the marker segments to the end of the first start-of-scan (SOS) header
        if pos + 4 > len(data):
            data += file.read(pos + 4 - len(data) + _HEAD)
            if pos + 4 > len(data):
                raise BadImageError(path, "truncated JPEG (ends inside the header)")
        if data[pos] != 0xFF:
            raise BadImageError(path, f"corrupt JPEG header (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif marker == 0xD9:
            raise BadImageError(path, "corrupt JPEG header (end-of-image marker before any scan)")
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    data += file.read(max(0, pos - len(data)))  # a file that ends inside the SOS header fails just below
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data[:pos])
        mode = _JPEG_MODES.get(colorspace, colorspace)
    except (ValueError, RuntimeError):  # TurboJPEG refuses some valid headers (odd subsampling): ask Pillow
        with _pillow_errors(path, "JPEG"):
            image = Image.open(io.BytesIO(data[:pos]))
            height, width, mode = image.height, image.width, image.mode
    file.seek(max(pos, size - _TAIL))
    if b"\xff\xd9" not in file.read():
        raise BadImageError(path, "truncated JPEG (no end-of-image marker)")
    return ImageInfo(int(height), int(width), "JPEG", mode)


def _probe_pillow(file, head: bytes, size: int, path) -> ImageInfo:
    file.seek(0)
    with _pillow_errors(path, _kind(head)):
        image = Image.open(file)
        info = ImageInfo(image.height, image.width, str(image.format), image.mode)
    if info.format == "PNG":
        file.seek(max(0, size - _TAIL))
        if _PNG_IEND not in file.read():
            raise BadImageError(path, "truncated PNG (no IEND chunk)")
    return info


def _kind(head: bytes) -> str | None:  # "JPEG" or "PNG" by the magic bytes, else None
    return "JPEG" if head[:3] == _JPEG_MAGIC else "PNG" if head[:8] == _PNG_MAGIC else None


@contextlib.contextmanager
def _pillow_errors(path, kind: str | None):
    """Whatever Pillow raises inside the block becomes a one-line :class:`BadImageError`."""
    try:
        yield
    except (BadImageError, MemoryError):
        raise
    except UnidentifiedImageError:
        reason = f"corrupt {kind} header (unreadable by Pillow)" if kind else "not an image (unrecognised header)"
        raise BadImageError(path, reason) from None
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"too large to decode ({error})") from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError...
        message = str(error) or type(error).__name__
        what = "truncated" if isinstance(error, OSError) and "truncated" in message else "corrupt"
        raise BadImageError(path, f"{what} {kind or 'image'} ({message})") from None


def _probe_block(paths) -> list[ImageInfo | BadImageError]:
    results = []
    for path in paths:
        try:
            results.append(probe(path))
        except BadImageError as error:
            results.append(error)
    return results


def probe_many(paths, *, threads: int | None = None) -> list[ImageInfo | BadImageError]:
    """:func:`probe` every file in a thread pool (the work is mostly waiting on the disk), in order.

    ``threads`` None means ``min(32, 4 * CPU count)``; files go to the threads in blocks of 256.

    Returns:
        A list as long as ``paths``: each file's :class:`ImageInfo` or the :class:`BadImageError` it raised.
    """
    paths = list(paths)
    threads = threads or min(32, 4 * (os.cpu_count() or 1))
    blocks = [paths[start : start + _PROBE_BLOCK] for start in range(0, len(paths), _PROBE_BLOCK)]
    if threads <= 1 or len(blocks) <= 1:
        return _probe_block(paths)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [info for block in pool.map(_probe_block, blocks) for info in block]


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``; an unreadable or empty file raises :class:`BadImageError`."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise BadImageError(path, f"unreadable: {error.strerror or error}") from None
    if not data:
        raise BadImageError(path, "empty file")
    return data


def _header(data: bytes, path) -> tuple[int, int, Image.Image | None]:
    """``(height, width, image)``: ``image`` is Pillow's lazily opened file, or None for simplejpeg's JPEG."""
    if not data:
        raise BadImageError(path, "empty file")
    if data[:3] == _JPEG_MAGIC:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except (ValueError, RuntimeError):
            colorspace = None  # Pillow below names the problem, or reads what libjpeg-turbo's header call refused
        if colorspace is not None and colorspace not in ("CMYK", "YCCK"):
            return int(height), int(width), None
    with _pillow_errors(path, _kind(data)):
        image = Image.open(io.BytesIO(data))
        return image.height, image.width, image


def _decode_scaled(data: bytes, path, height: int, width: int, factor: int, image: Image.Image | None) -> np.ndarray:
    """Decode at ``factor / 8`` of the size (``factor`` in 1, 2, 4, 8; JPEG only, others at full size)."""
    if image is None:
        rows, cols = (0, 0) if factor == 8 else (-(-height * factor // 8), -(-width * factor // 8))
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=rows, min_width=cols)
        except (ValueError, RuntimeError):  # e.g. a recoverable libjpeg warning: Pillow decides (and names it)
            with _pillow_errors(path, "JPEG"):
                image = Image.open(io.BytesIO(data))
    kind = image.format or "image"
    with _pillow_errors(path, kind):
        if image.format == "JPEG" and factor < 8:
            image.draft("RGB", (width * factor // 8, height * factor // 8))
        image.load()
        return _to_rgb(image, path)


def _to_rgb(image: Image.Image, path) -> np.ndarray:
    """``(H, W, 3)`` uint8 from any Pillow mode; see :func:`decode` for the conversions."""
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        levels = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((levels * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        image = image.convert("L")
    elif mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow asks for this route for palettes with a transparency entry
    try:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except ValueError as error:
        raise BadImageError(path, f"unsupported colour mode {mode} ({error})") from None


def _dct_factor(height: int, width: int, min_height: int, min_width: int) -> int:
    """The smallest ``factor`` in 1, 2, 4 (else 8) with ``height * factor / 8 >= min_height`` and likewise width."""
    for factor in (1, 2, 4):
        if height * factor >= 8 * min_height and width * factor >= 8 * min_width:
            return factor
    return 8


def decode(
    data: bytes, *, path: str | os.PathLike = "<bytes>", min_height: int | None = None, min_width: int | None = None
) -> np.ndarray:
    """Decode an image file's bytes to RGB, scaled down in the DCT domain where ``min_height``/``min_width`` allow.

    A JPEG is decoded at the smallest of 1/8, 1/4, 1/2 or 1 of its size that leaves at least ``min_height`` rows
    and ``min_width`` columns (libjpeg's scaled IDCT; never enlarged; the other scales libjpeg-turbo offers are
    slower than a full decode). Other formats are decoded at full size. Colour modes: grayscale (``L``, ``1``,
    ``LA``) is repeated over the three channels; palettes are looked up; CMYK uses Pillow's conversion; an alpha
    channel (``RGBA``, ``LA``, ``PA``) is dropped, leaving the stored colour under transparent pixels, as
    torchvision's loader does; 16-bit (``I;16``, and ``I``, which Pillow uses for 16-bit data) is scaled by
    255/65535 and rounded; ``F`` is clipped to 0-255 as Pillow's own ``convert("L")`` does. Animated formats
    give their first frame.

    A None bound leaves its axis free (both None: full size); ``path`` names the file in errors.

    Returns:
        ``(H', W', 3)`` uint8 RGB, ``H' = ceil(H * f)`` and ``W' = ceil(W * f)`` for the scale ``f`` chosen.

    Raises:
        BadImageError: The bytes are empty, not an image, corrupt or truncated.
    """
    height, width, image = _header(data, path)
    if min_height is None and min_width is None:
        factor = 8
    else:
        factor = _dct_factor(height, width, min_height or 0, min_width or 0)
    return _decode_scaled(data, path, height, width, factor, image)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one example: a function of ``(seed, epoch, index)`` only.

    NumPy's ``default_rng`` (PCG64) seeded through a ``SeedSequence`` of four 32-bit words: the seed's low and
    high halves (taken modulo 2**64, so negative seeds work), the epoch and the file's index. Fixed-width words
    keep distinct triples distinct (a plain ``[seed, epoch, index]`` list splits ints above 2**32 into several
    words, so two triples could give the same list); the hash in SeedSequence makes neighbouring triples
    independent streams. Which worker runs the example does not enter, so the stream is the same for any
    worker count. (NumPy does not promise the same Generator bits across its versions.)

    Raises DataError unless ``seed`` is an int and ``epoch`` and ``index`` ints in ``[0, 2**32)``.
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(f"example_rng {name} must be an int, got {value!r}")
    if not (0 <= epoch < 2**32 and 0 <= index < 2**32):
        raise DataError(f"example_rng epoch and index must be in [0, 2**32), got epoch={epoch} index={index}")
    seed = int(seed) % 2**64
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, int(epoch), int(index)])


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, *, scale: _Range = (0.08, 1.0), ratio: _Range = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, drawing from a NumPy generator.

    Up to 10 tries: an area fraction uniform in ``scale`` and a log aspect ratio (width / height) uniform in
    ``log(ratio)`` give ``w = round(sqrt(area * aspect))`` and ``h = round(sqrt(area / aspect))``; the first
    try with ``0 < w <= width`` and ``0 < h <= height`` is taken, with ``top`` uniform in ``[0, height - h]``
    and then ``left`` uniform in ``[0, width - w]``. If all 10 fail: the centre crop of the whole image, cut to
    the nearest allowed aspect ratio (at least 1 pixel each way).

    Each try draws two uniforms from ``rng``, an accepted one two integers more. ``scale`` (area fractions) and
    ``ratio`` (width / height) are ``(low, high)`` with ``0 < low <= high``.

    Returns:
        ``(top, left, h, w)`` in pixels, inside the ``height x width`` image.
    """
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise DataError(f"random_resized_crop_box needs 0 < low <= high, got scale={scale} ratio={ratio}")
    if height <= 0 or width <= 0:
        raise DataError(f"random_resized_crop_box needs a non-empty image, got {height}x{width}")
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        h, w = height, max(1, int(round(height * ratio[1])))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")


def _region_resized(data: bytes, path, header, region, size: int, flip: bool) -> np.ndarray:
    """``region = (top, left, h, w)`` of the original (fractional pixels allowed) as ``(size, size, 3)`` uint8.

    Decodes at the smallest DCT scale ``factor / 8`` that keeps the region at least ``size`` pixels each way,
    maps the region into the decoded image (``factor / 8`` decoded pixels per original pixel: libjpeg turns
    each 8-pixel block into ``factor`` pixels, ``ceil(n * factor / 8)`` in all), and resizes it with Pillow's
    antialiased bilinear filter (its support widens with the reduction); then mirrors it left-right if ``flip``.
    """
    height, width, image = header
    top, left, h, w = region
    factor = _dct_factor(h, w, size, size)
    array = _decode_scaled(data, path, height, width, factor, image)
    rows, cols = array.shape[:2]
    if rows == -(-height * factor // 8) and cols == -(-width * factor // 8):
        sy = sx = factor / 8
    else:  # a size libjpeg's rule does not give (tiny images): the plain ratio
        sy, sx = rows / height, cols / width
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)


def train_image(
    data: bytes, image_size: int, rng: np.random.Generator, *, path: str | os.PathLike = "<bytes>"
) -> np.ndarray:
    """One training example: RandomResizedCrop to ``image_size``, then a horizontal flip with probability 1/2.

    The box is drawn from the header's size (:func:`random_resized_crop_box`, area 0.08-1, aspect 3/4-4/3), then
    the flip (``rng.random() < 0.5``); the image is decoded at the smallest DCT scale (1/8, 1/4, 1/2, 1) that
    keeps the box at least ``image_size`` pixels each way, and the box, mapped into it in floating point, is
    resized to ``(S, S)`` with Pillow's antialiased bilinear filter. ``rng`` is the example's
    (:func:`example_rng`); ``path`` names the file in errors.

    Returns:
        ``(S, S, 3)`` uint8 RGB, ``S = image_size``.

    Raises:
        BadImageError: The bytes are not a decodable image.
    """
    _check_size(image_size)
    header = _header(data, path)
    region = random_resized_crop_box(header[0], header[1], rng)
    return _region_resized(data, path, header, region, image_size, bool(rng.random() < 0.5))


def eval_image(
    data: bytes, image_size: int, *, path: str | os.PathLike = "<bytes>", crop_fraction: float = 0.875
) -> np.ndarray:
    """One evaluation example: torchvision's ``Resize(int(S / crop_fraction))`` then ``CenterCrop(S)``, as one resize.

    torchvision's sizes: the shorter side goes to ``R = int(S / crop_fraction)``, the longer to
    ``int(R * long / short)``, and the crop starts at ``round((resized - S) / 2)`` on each axis. The two steps are
    done as one antialiased bilinear resize of the matching region of the original (the same sampling positions
    and filter widths), from a DCT-scaled decode when the resized image is at most half the original's size.

    Returns:
        ``(S, S, 3)`` uint8 RGB, ``S = image_size``.

    Raises:
        BadImageError: The bytes are not a decodable image.
    """
    _check_size(image_size)
    header = height, width, _ = _header(data, path)
    resize = int(image_size / crop_fraction)
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_h, new_w = resize, int(resize * width / height)
    top, left = int(round((new_h - image_size) / 2)), int(round((new_w - image_size) / 2))
    ry, rx = height / new_h, width / new_w  # original pixels per resized pixel
    region = (top * ry, left * rx, image_size * ry, image_size * rx)
    return _region_resized(data, path, header, region, image_size, False)


def load_train(path: str | os.PathLike, image_size: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """:func:`train_image` of the file at ``path`` with :func:`example_rng` ``(seed, epoch, index)``:
    ``(S, S, 3)`` uint8. Raises :class:`BadImageError` for an unreadable or undecodable file."""
    return train_image(read_file(path), image_size, example_rng(seed, epoch, index), path=path)


def load_eval(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """:func:`eval_image` of the file at ``path``: ``(S, S, 3)`` uint8. Raises :class:`BadImageError`."""
    return eval_image(read_file(path), image_size, path=path)
