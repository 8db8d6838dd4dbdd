"""Per-core throughput of the training image path: decode + RandomResizedCrop + flip to 224 from JPEG bytes.

Generates ~200 photographs-like JPEGs (500x375, quality 90: smooth gradients, shapes, edges and sensor-like
noise, so the entropy decoder does realistic work), holds their bytes in memory, and times, in one process on
one core, ``jaxcnn.data.images.train_image`` against Pillow alone doing what torchvision's ``ImageFolder`` +
``RandomResizedCrop(224)`` + ``RandomHorizontalFlip`` do (``Image.open(...).convert("RGB")``, crop, bilinear
antialiased resize, flip) with the same crop boxes. Rounds alternate between the two; the medians are
reported, per wall-clock second and per CPU second (the latter shrugs off other load on a shared machine).
Then the header check (:func:`images.probe_many`) over copies of the files, one thread and the default pool.

    PYTHONPATH=src python benchmarks/image_decode.py [--images 200] [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from jaxcnn.data import images


def photo_like(rng: np.random.Generator, height: int = 375, width: int = 500) -> Image.Image:
    """A ``height x width`` RGB picture with the statistics that make JPEG decoding cost what a photo costs."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=(3, 2))
    freqs = rng.uniform(0.005, 0.05, size=(3, 2))
    channels = [
        128 + 90 * np.sin(x * fx + px) * np.cos(y * fy + py) for (fx, fy), (px, py) in zip(freqs, phases, strict=True)
    ]
    picture = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(10, 200), y0 + rng.integers(10, 150)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    noisy = np.asarray(picture).astype(np.float32) + rng.normal(0, 10, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` quality-90 JPEG files' bytes of :func:`photo_like` pictures."""
    rng = np.random.default_rng(seed)
    files = []
    for _ in range(count):
        buffer = io.BytesIO()
        photo_like(rng).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def pillow_train_image(data: bytes, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision's PIL path: full decode, ``convert("RGB")``, crop, antialiased bilinear resize, flip."""
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    top, left, h, w = images.random_resized_crop_box(picture.height, picture.width, rng)
    out = picture.crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def ours_train_image(data: bytes, image_size: int, rng: np.random.Generator) -> np.ndarray:
    return images.train_image(data, image_size, rng)


def images_per_second(function, files: list[bytes], image_size: int, epoch: int) -> tuple[float, float]:
    """``(images per wall-clock second, images per CPU second of this process)`` over one pass."""
    start, cpu = time.perf_counter(), time.process_time()
    for index, data in enumerate(files):
        function(data, image_size, images.example_rng(0, epoch, index))
    return len(files) / (time.perf_counter() - start), len(files) / (time.process_time() - cpu)


def probe_files_per_second(files: list[bytes], copies: int, threads: int | None) -> float:
    """:func:`images.probe_many` over ``len(files) * copies`` files written to a temporary folder (page cache
    warm: this measures the header work, not the disk)."""
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index in range(copies * len(files)):
            paths.append(os.path.join(folder, f"{index}.jpg"))
            with open(paths[-1], "wb") as file:
                file.write(files[index % len(files)])
        images.probe_many(paths[:100], threads=threads)
        start = time.perf_counter()
        results = images.probe_many(paths, threads=threads)
        rate = len(paths) / (time.perf_counter() - start)
    assert all(isinstance(result, images.ImageInfo) for result in results)
    return rate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--probe-copies", type=int, default=10, help="probe this many copies of each file (0: skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if cores:
        os.sched_setaffinity(0, {min(cores)})  # decoding on one core; the header check gets them all back
    files = make_jpegs(args.images)
    runs = {"jaxcnn": ours_train_image, "pillow": pillow_train_image}
    for function in runs.values():  # warm-up
        images_per_second(function, files[:20], args.image_size, 0)
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, function in runs.items():
            rates = images_per_second(function, files, args.image_size, round_)
            wall[name].append(rates[0])
            cpu[name].append(rates[1])
    median = lambda rates: round(statistics.median(rates), 1)  # noqa: E731
    result = {
        "images": len(files),
        "mean_file_kib": round(sum(map(len, files)) / len(files) / 1024, 1),
        "image_size": args.image_size,
        "rounds": args.rounds,
        **{f"{name}_images_per_second": median(rates) for name, rates in wall.items()},
        **{f"{name}_images_per_cpu_second": median(rates) for name, rates in cpu.items()},
        **{f"{name}_rounds": [round(rate, 1) for rate in rates] for name, rates in wall.items()},
    }
    result["speedup"] = round(result["jaxcnn_images_per_second"] / result["pillow_images_per_second"], 3)
    if args.probe_copies:
        if cores:
            os.sched_setaffinity(0, cores)
        result["probe_files"] = args.probe_copies * len(files)
        result["probe_files_per_second_1_thread"] = round(probe_files_per_second(files, args.probe_copies, 1))
        result["probe_files_per_second"] = round(probe_files_per_second(files, args.probe_copies, None))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return result


if __name__ == "__main__":
    main()
