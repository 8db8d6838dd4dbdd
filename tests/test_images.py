"""jaxcnn.data.images: the header check, decoding to RGB, RandomResizedCrop and the train/eval images."""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxcnn.data import images
from jaxcnn.data._dataset import DataError
from jaxcnn.data.images import BadImageError


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(height, width, 3)`` uint8: smooth, asymmetric gradients (so a flip shows) and a little noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    channels = [255 * x / width, 127 + 120 * np.sin(y / 9 + seed), 255 * (x + 2 * y) / (width + 2 * height)]
    return np.clip(np.stack(channels, -1) + rng.normal(0, 2, (height, width, 3)), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png(width: int, height: int, mode_bytes: tuple[int, int]) -> bytes:
    """A PNG written by hand (Pillow refuses a zero size): ``mode_bytes`` = (bit depth, colour type)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, *mode_bytes, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _resampled(jpeg: bytes, sampling: int) -> bytes:
    """``jpeg`` with its first component's sampling factors byte (in the baseline frame header) replaced."""
    at = jpeg.index(b"\xff\xc0") + 11
    return jpeg[:at] + bytes([sampling]) + jpeg[at + 1 :]


_RGB = Image.fromarray(_picture(48, 64))
_RGBA = _picture(48, 64, 1)
_SIXTEEN = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491

# name -> (bytes, format, mode): one file per colour mode and JPEG flavour the loader must read
GOOD = {
    "rgb.jpg": (_encode(_RGB, "JPEG", quality=90), "JPEG", "RGB"),
    "progressive.jpg": (_encode(_RGB, "JPEG", quality=90, progressive=True), "JPEG", "RGB"),
    "gray.jpg": (_encode(_RGB.convert("L"), "JPEG", quality=90), "JPEG", "L"),
    "cmyk.jpg": (_encode(_RGB.convert("CMYK"), "JPEG", quality=95), "JPEG", "CMYK"),
    # luma sampled 3x1 (the header edited): libjpeg reads it, TurboJPEG's header call refuses it
    "odd-sampling.jpg": (_resampled(_encode(_RGB, "JPEG", quality=90, subsampling=0), 0x31), "JPEG", "RGB"),
    "rgb.png": (_encode(_RGB, "PNG"), "PNG", "RGB"),
    "l.png": (_encode(_RGB.convert("L"), "PNG"), "PNG", "L"),
    "p.png": (_encode(_RGB.convert("P"), "PNG"), "PNG", "P"),
    "rgba.png": (_encode(Image.fromarray(np.dstack([_RGBA, _RGBA[..., :1]])), "PNG"), "PNG", "RGBA"),
    "la.png": (_encode(_RGB.convert("LA"), "PNG"), "PNG", "LA"),
    "i16.png": (_encode(Image.fromarray(_SIXTEEN), "PNG"), "PNG", "I;16"),
    "one.gif": (_encode(_RGB.convert("P"), "GIF"), "GIF", "P"),
}


def _with_segment(jpeg: bytes, payload: bytes) -> bytes:
    """``jpeg`` with an APP15 segment holding ``payload`` right after its start-of-image marker."""
    return jpeg[:2] + b"\xff\xef" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


_JPEG = GOOD["rgb.jpg"][0]
_PNG = GOOD["rgb.png"][0]
_SOS = _JPEG.index(b"\xff\xda")

# name -> (bytes, the start of the reason probe must give)
BAD = {
    "empty.jpg": (b"", "empty file"),
    "notes.jpg": (b"just some text, not a picture\n" * 20, "not an image (unrecognised header)"),
    "cut.jpg": (_JPEG[: len(_JPEG) * 2 // 3], "truncated JPEG (no end-of-image marker)"),
    "cut-in-header.jpg": (_JPEG[: _SOS - 40], "truncated JPEG (ends inside the header)"),
    # an end-of-image marker inside a segment before the scan does not make a cut file whole
    "cut-thumb.jpg": (_with_segment(_JPEG, b"thumb\xff\xd9")[: len(_JPEG) * 2 // 3], "truncated JPEG (no end-of"),
    "garbage-header.jpg": (_JPEG[:3] + bytes(300), "corrupt JPEG header"),
    "zero-height.jpg": (
        _JPEG.replace(b"\xff\xc0\x00\x11\x08\x00\x30", b"\xff\xc0\x00\x11\x08\x00\x00"),
        "corrupt JPEG",
    ),
    "cut.png": (_PNG[: len(_PNG) // 2], "truncated PNG (no IEND chunk)"),
    "bad-crc.png": (_flip_byte(_PNG, 17), "corrupt PNG"),
    "zero-width.png": (_png(0, 5, (8, 0)), "corrupt PNG header"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, (data, *_) in {**GOOD, **BAD}.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name", GOOD)
def test_probe_reads_the_header_of_every_good_kind(folder, name):
    _, fmt, mode = GOOD[name]
    assert images.probe(folder / name) == images.ImageInfo(48, 64, fmt, mode)


@pytest.mark.parametrize("name", BAD)
def test_probe_names_each_bad_kind(folder, name):
    with pytest.raises(BadImageError) as caught:
        images.probe(folder / name)
    assert caught.value.reason.startswith(BAD[name][1]), caught.value.reason
    assert caught.value.path == str(folder / name)
    assert str(caught.value) == f"{folder / name}: {caught.value.reason}" and "\n" not in str(caught.value)


def test_probe_unreadable_paths(folder, tmp_path, monkeypatch):
    for path, reason in ((folder, "unreadable: Is a directory"), (folder / "nope.jpg", "unreadable: No such file")):
        with pytest.raises(BadImageError, match=reason):
            images.probe(path)
    locked = tmp_path / "locked" / "a.jpg"
    locked.parent.mkdir()
    locked.write_bytes(_JPEG)
    locked.parent.chmod(0)  # a folder without read or search permission
    try:
        if os.geteuid() == 0:  # root passes permission checks: refuse the open as the kernel would for a user

            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied", str(locked))

            monkeypatch.setattr(images, "open", refuse, raising=False)
        for call in (images.probe, images.read_file):
            with pytest.raises(BadImageError, match="unreadable: Permission denied"):
                call(locked)
    finally:
        locked.parent.chmod(0o755)


def test_probe_accepts_padding_after_the_end_and_headers_longer_than_the_first_read(tmp_path):
    padded, long_header = tmp_path / "padded.jpg", tmp_path / "long.jpg"
    padded.write_bytes(_JPEG + bytes(5000))
    long_header.write_bytes(_with_segment(_JPEG, bytes(65000)))
    for path in (padded, long_header):
        assert images.probe(path) == images.ImageInfo(48, 64, "JPEG", "RGB")


def test_probe_refuses_zero_dimensions(folder, monkeypatch):
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg_header", lambda data: (0, 64, "YCbCr", "420"))
    with pytest.raises(BadImageError, match=r"zero dimensions \(0x64\)"):
        images.probe(folder / "rgb.jpg")


def test_probe_many_keeps_the_order_across_blocks_and_threads(folder, monkeypatch):
    monkeypatch.setattr(images, "_PROBE_BLOCK", 3)
    names = [*GOOD, *BAD] * 2
    results = images.probe_many([folder / name for name in names], threads=4)
    assert len(results) == len(names)
    for name, result in zip(names, results, strict=True):
        assert isinstance(result, BadImageError) == (name in BAD), name
        if name in BAD:
            assert result.reason.startswith(BAD[name][1])


def test_bad_image_error_is_a_data_error_that_pickles():
    error = BadImageError("a/b.jpg", "empty file")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, DataError) and (again.path, again.reason, str(again)) == (
        "a/b.jpg",
        "empty file",
        str(error),
    )


@pytest.mark.parametrize("name", GOOD)
def test_decode_gives_rgb_close_to_pillow(name):
    data = GOOD[name][0]
    out = images.decode(data)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    if name == "i16.png":
        reference = np.repeat(np.round(_SIXTEEN / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    else:  # Pillow's own decode; the alpha channel dropped, palettes looked up, gray repeated
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(out.astype(int) - reference).mean() < 1.0 and np.abs(out.astype(int) - reference).max() <= 8
    if name == "rgba.png":
        np.testing.assert_array_equal(out, _RGBA)


def test_decode_scales_jpeg_in_the_dct_domain_only_as_far_as_asked():
    big = Image.fromarray(_picture(400, 320))
    for data in (_encode(big, "JPEG", quality=90), _encode(big.convert("CMYK"), "JPEG", quality=95)):
        full = images.decode(data)
        assert images.decode(data, min_height=100, min_width=80).shape == (100, 80, 3)  # 1/4
        assert images.decode(data, min_height=101).shape == (200, 160, 3)  # 1/2
        assert images.decode(data, min_width=161).shape == full.shape == (400, 320, 3)
        half = np.asarray(Image.fromarray(full).resize((160, 200), Image.Resampling.BOX))
        assert np.abs(images.decode(data, min_height=101).astype(int) - half).mean() < 2.0
    assert images.decode(_encode(big, "PNG"), min_height=50).shape == (400, 320, 3)


@pytest.mark.parametrize(
    "data",
    [b"", _JPEG[:3] + bytes(100), _JPEG[: len(_JPEG) // 2], _PNG[: len(_PNG) // 2], _PNG[:60] + bytes(50) + _PNG[110:]],
    ids=["empty", "garbage-jpeg", "cut-jpeg", "cut-png", "bad-idat"],
)
def test_decode_failures_are_bad_image_errors(data):
    calls = (
        lambda: images.decode(data, path="pic.x"),
        lambda: images.train_image(data, 8, np.random.default_rng(0), path="pic.x"),
        lambda: images.eval_image(data, 8, path="pic.x"),
    )
    for call in calls:
        with pytest.raises(BadImageError, match=r"^pic\.x: \w"):
            call()


# ---------------------------------------------------------------------------------------------------------------
# RandomResizedCrop


def _spec_box(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The torchvision algorithm, written out again: returns the box and the number of tries used (11: fallback)."""
    for tries in range(1, 11):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w), tries
    return None, 11


def test_crop_box_follows_the_spec_draw_for_draw_and_stays_inside():
    tries_seen = set()
    for case in range(600):
        height, width = [(375, 500), (500, 375), (20, 300), (300, 20), (1, 1), (7, 3), (224, 224)][case % 7]
        box = images.random_resized_crop_box(height, width, np.random.default_rng(case))
        expected, tries = _spec_box(height, width, np.random.default_rng(case))
        tries_seen.add(min(tries, 3))
        if expected is not None:
            assert box == expected
        top, left, h, w = box
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h >= 1 and w >= 1
    assert tries_seen == {1, 2, 3}  # first-try accepts, retries and (3 stands for >= 3) fallbacks all happened


def test_crop_box_fallback_is_the_centre_crop_at_the_nearest_ratio():
    rng = np.random.default_rng(5)
    assert images.random_resized_crop_box(10, 1000, rng) == (0, 493, 10, 13)  # too wide: 4/3 of the height
    twin = np.random.default_rng(5)
    twin.uniform(size=20)  # ten failed tries take exactly two uniforms each
    assert rng.random() == twin.random()
    assert images.random_resized_crop_box(1000, 10, np.random.default_rng(5)) == (493, 0, 13, 10)
    assert images.random_resized_crop_box(100, 100, np.random.default_rng(0), scale=(2.0, 3.0)) == (0, 0, 100, 100)


def test_crop_box_area_and_log_aspect_follow_their_uniform_laws():
    # scale up to 0.5 and a big square image: every first try fits, so the draws are the plain uniforms
    n, side, scale, ratio = 4000, 4000, (0.08, 0.5), (3 / 4, 4 / 3)
    rng = np.random.default_rng(1)
    boxes = np.array([images.random_resized_crop_box(side, side, rng, scale=scale) for _ in range(n)])
    area = boxes[:, 2] * boxes[:, 3] / side**2
    log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
    for sample, (low, high) in ((area, scale), (log_aspect, (math.log(ratio[0]), math.log(ratio[1])))):
        sample = np.sort(sample)
        cdf = np.clip((sample - low) / (high - low), 0, 1)
        ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
        assert ks < 1.95 / math.sqrt(n), ks  # Kolmogorov-Smirnov at the 0.1% level
    top_share = boxes[:, 0] / (side - boxes[:, 2])
    assert abs(top_share.mean() - 0.5) < 0.02 and abs(top_share.var() - 1 / 12) < 0.01


def test_crop_box_refuses_bad_ranges():
    with pytest.raises(DataError, match="scale="):
        images.random_resized_crop_box(10, 10, np.random.default_rng(0), scale=(0.5, 0.1))
    with pytest.raises(DataError, match="non-empty image, got 0x10"):
        images.random_resized_crop_box(0, 10, np.random.default_rng(0))


def test_example_rng_depends_on_seed_epoch_and_index_only():
    draw = lambda *triple: images.example_rng(*triple).integers(0, 2**62, size=4).tolist()  # noqa: E731
    assert draw(3, 1, 7) == draw(3, 1, 7)
    triples = [(3, 1, 7), (4, 1, 7), (3, 2, 7), (3, 1, 8), (2**32, 0, 0), (0, 1, 0), (-1, 0, 0), (2**64 - 2, 0, 0)]
    assert len({tuple(draw(*triple)) for triple in triples}) == len(triples)
    assert draw(-1, 0, 0) == draw(2**64 - 1, 0, 0)
    for bad in ((0, -1, 0), (0, 0, 2**32), (0.5, 0, 0), (True, 0, 0)):
        with pytest.raises(DataError, match="example_rng"):
            images.example_rng(*bad)


# ---------------------------------------------------------------------------------------------------------------
# training and evaluation images

_SMALL = _picture(60, 90, 3)
_SMALL_PNG = _encode(Image.fromarray(_SMALL), "PNG")
_BIG_JPEG = _encode(Image.fromarray(_picture(768, 1024, 4)), "JPEG", quality=92)


def test_train_image_is_the_box_resize_then_a_fair_flip():
    flips = 0
    for index in range(200):
        out = images.train_image(_SMALL_PNG, 16, images.example_rng(9, 0, index))
        twin = images.example_rng(9, 0, index)
        top, left, h, w = images.random_resized_crop_box(60, 90, twin)
        flip = twin.random() < 0.5
        plain = np.asarray(
            Image.fromarray(_SMALL).resize((16, 16), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        )
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, plain[:, ::-1] if flip else plain)
        flips += flip
    assert 70 <= flips <= 130  # p = 1/2: 100 +- 4.2 standard deviations


def test_train_image_is_a_function_of_seed_epoch_and_index():
    make = lambda seed, epoch, index: images.train_image(_SMALL_PNG, 24, images.example_rng(seed, epoch, index))  # noqa: E731
    np.testing.assert_array_equal(make(1, 2, 3), make(1, 2, 3))
    for other in ((0, 2, 3), (1, 0, 3), (1, 2, 4)):
        assert not np.array_equal(make(1, 2, 3), make(*other))


def test_train_image_dct_downscale_agrees_with_a_full_decode(monkeypatch):
    calls = []
    decode_jpeg = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(
        images.simplejpeg, "decode_jpeg", lambda data, **kw: calls.append(kw) or decode_jpeg(data, **kw)
    )
    scaled = [images.train_image(_BIG_JPEG, 64, images.example_rng(0, 0, index)) for index in range(12)]
    assert sum(kw["min_height"] > 0 for kw in calls) >= 6  # most of these crops allow a 1/2 to 1/8 decode
    monkeypatch.setattr(images, "_dct_factor", lambda *args: 8)
    for index, out in enumerate(scaled):
        full = images.train_image(_BIG_JPEG, 64, images.example_rng(0, 0, index))
        assert np.abs(out.astype(int) - full).mean() < 2.0


def test_train_image_reads_cmyk_jpeg_through_pillow_with_draft():
    cmyk = _encode(Image.fromarray(_picture(768, 1024, 4)).convert("CMYK"), "JPEG", quality=95)
    for index in range(4):
        rgb = images.train_image(_BIG_JPEG, 64, images.example_rng(0, 0, index))
        assert np.abs(images.train_image(cmyk, 64, images.example_rng(0, 0, index)).astype(int) - rgb).mean() < 3.0


def _two_step_eval(picture: np.ndarray, size: int) -> np.ndarray:
    """torchvision's Resize(int(size / 0.875)) then CenterCrop(size), with Pillow in two steps."""
    height, width = picture.shape[:2]
    short = int(size / 0.875)
    new_w, new_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    resized = Image.fromarray(picture).resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("shape", [(60, 90), (90, 61), (77, 77)])
def test_eval_image_matches_resize_then_centre_crop(shape):
    picture = _picture(*shape, seed=6)
    out = images.eval_image(_encode(Image.fromarray(picture), "PNG"), 32)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - _two_step_eval(picture, 32)).max() <= 1


def test_eval_image_with_a_dct_downscale_stays_close():
    full = np.asarray(Image.open(io.BytesIO(_BIG_JPEG)).convert("RGB"))
    out = images.eval_image(_BIG_JPEG, 96)  # resized to 109 rows of 768: a 1/4 decode
    assert np.abs(out.astype(int) - _two_step_eval(full, 96)).mean() < 2.0


def test_load_train_and_load_eval_read_the_file(folder):
    path = folder / "rgb.png"
    expected = images.train_image(_PNG, 16, images.example_rng(1, 2, 3))
    np.testing.assert_array_equal(images.load_train(path, 16, 1, 2, 3), expected)
    np.testing.assert_array_equal(images.load_eval(path, 16), images.eval_image(_PNG, 16))
    with pytest.raises(BadImageError, match="unreadable: No such file"):
        images.load_train(folder / "gone.png", 16, 0, 0, 0)
    with pytest.raises(BadImageError, match="empty file"):
        images.load_eval(folder / "empty.jpg", 16)


def test_image_size_must_be_a_positive_int():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DataError, match="image_size must be a positive int"):
            images.eval_image(_PNG, bad)
