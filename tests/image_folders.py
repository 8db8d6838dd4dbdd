"""Small image folders written for the tests (ROOT/train/<class>/*, ROOT/val/<class>/*), and a tiny model for them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from jaxcnn import nn

CLASSES = ("cat", "dog", "eel")


def picture(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image whose dominant channel is ``label``, with noise (learnable, not flat)."""
    base = np.zeros((height, width, 3))
    base[..., label % 3] = 190
    return np.clip(base + rng.normal(0, 35, (height, width, 3)), 0, 255).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray, kind: str) -> None:
    """``pixels`` saved as ``kind``: "jpeg", "png", "gray" (PNG, mode L), "rgba" (PNG), "palette" (PNG, mode P),
    "cmyk" (JPEG) or "gray_jpeg"."""
    image = Image.fromarray(pixels)
    if kind == "jpeg":
        image.save(path, "JPEG", quality=90)
    elif kind == "png":
        image.save(path, "PNG")
    elif kind == "gray":
        image.convert("L").save(path, "PNG")
    elif kind == "gray_jpeg":
        image.convert("L").save(path, "JPEG", quality=90)
    elif kind == "rgba":
        image.convert("RGBA").save(path, "PNG")
    elif kind == "palette":
        image.convert("P").save(path, "PNG")
    elif kind == "cmyk":
        image.convert("CMYK").save(path, "JPEG", quality=90)
    else:
        raise ValueError(kind)


KINDS = ("jpeg", "png", "gray", "rgba", "palette", "cmyk", "gray_jpeg")


def make_folder(root: Path, counts=None, *, val: int = 2, seed: int = 0, sizes=(20, 44)) -> Path:
    """An image folder with ``counts[c]`` training images of class ``CLASSES[c]`` (unbalanced by default) and
    ``val`` of each class in ``val``, cycling through every kind of :data:`KINDS`."""
    counts = counts or (9, 5, 4)
    rng = np.random.default_rng(seed)
    for split, numbers in (("train", counts), ("val", (val,) * len(counts))):
        for label, (name, count) in enumerate(zip(CLASSES, numbers, strict=False)):
            directory = root / split / name
            directory.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                kind = KINDS[(i + label) % len(KINDS)]
                height, width = (int(v) for v in rng.integers(sizes[0], sizes[1], 2))
                suffix = "png" if kind in ("png", "gray", "rgba", "palette") else "jpg"
                write_image(directory / f"{i:03d}.{suffix}", picture(rng, label, height, width), kind)
    return root


def undecodable_png() -> bytes:
    """A PNG whose header and IEND chunk are intact but whose compressed pixel data is scrambled: it passes the
    header check and fails to decode."""
    buffer = io.BytesIO()
    Image.fromarray(picture(np.random.default_rng(5), 0, 32, 40)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 14
    for i in range(start, start + 50):
        data[i] ^= 0x5A
    return bytes(data)


def tiny(num_classes: int = 3) -> nn.Sequential:
    """A tiny classifier for 8x8 RGB images."""
    return nn.Sequential(
        [nn.Conv2D(4, 3, padding="VALID"), nn.ReLU(), nn.AvgPool2D(2), nn.Flatten(), nn.Dense(num_classes)]
    )


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))
