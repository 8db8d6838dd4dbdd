"""The image-folder pipeline's figures (issue 15): decode throughput per core, host memory against data set size,
and how long a small model's step waits for data. Writes one JSON object (and prints it).

    PYTHONPATH=src python benchmarks/folder_pipeline.py [--out benchmarks/folder-pipeline.json] [--keep DIR]

1. ``jaxcnn data-bench`` on 400 JPEGs of 500x375, quality 90 (smooth gradients, shapes and noise, so that the
   entropy decoder does real work), image size 224, one worker: images/s, and CPU ms per image of the worker
   and the main process together (images/s per core = 1000 / cpu_ms_per_image).
2. Peak RSS of the process running ``jaxcnn train`` for one epoch (image size 32, one worker, mnist_cnn) over
   2,000 and over 16,000 small JPEGs (the index grows by ~60 bytes a file; the batches do not grow).
3. ``jaxcnn data-bench --model mnist_cnn`` at image size 32 with one worker: the share of the loop's time the
   step waits for data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def natural(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A photo-like test image: two-axis colour gradients, a few filled shapes, mild noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(3 * x + rng.uniform(0, 6)), np.cos(2 * y + rng.uniform(0, 6)), x * y], -1)
    pixels = (127 + 100 * base + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def write_folder(root: Path, count: int, size: tuple[int, int], classes: int = 10, quality: int = 90) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", max(count // 20, classes))):
        for k in range(n):
            directory = root / split / f"class{k % classes:02d}"
            directory.mkdir(parents=True, exist_ok=True)
            natural(rng, size[1], size[0]).save(directory / f"{k:06d}.jpg", quality=quality)
    return root


def jaxcnn(*args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run([sys.executable, "-m", "jaxcnn", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"jaxcnn {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result


def peak_rss_of_epoch(root: Path, workdir: Path) -> float:
    """Peak RSS (MB) of a `jaxcnn train` process training one epoch on ``root``, measured in a fresh child."""
    code = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True, capture_output=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    command = [sys.executable, "-m", "jaxcnn", "train", "--dataset", "folder", "--data-dir", str(root)]
    command += ["--image-size", "32", "--epochs", "1", "--batch-size", "64", "--data-workers", "1"]
    command += ["--workdir", str(workdir), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    out = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip()) / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/folder-pipeline.json")
    parser.add_argument("--keep", default=None, help="build the folders here and keep them")
    args = parser.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="jaxcnn-folders-"))
    result: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": len(os.sched_getaffinity(0))}

    photos = base / "photos"
    if not photos.exists():
        write_folder(photos, 400, (500, 375))
    bench = jaxcnn("data-bench", "--data-dir", str(photos), "--image-size", "224", "--data-workers", "1",
                   "--batch-size", "32", "--batches", "10", "--json")  # fmt: skip
    result["decode_224"] = json.loads(bench.stdout)
    result["decode_224"]["images_per_second_per_core"] = 1000 / result["decode_224"]["cpu_ms_per_image"]

    rss = {}
    for count in (2000, 16000):
        root = base / f"small{count}"
        if not root.exists():
            write_folder(root, count, (48, 40), quality=85)
        rss[count] = peak_rss_of_epoch(root, base / f"run{count}-{time.time_ns()}")
    result["peak_rss_mb"] = {str(k): round(v, 1) for k, v in rss.items()}
    result["peak_rss_growth_mb"] = round(rss[16000] - rss[2000], 1)

    wait = jaxcnn("data-bench", "--data-dir", str(base / "small2000"), "--image-size", "32", "--data-workers", "1",
                  "--batch-size", "128", "--batches", "12", "--model", "mnist_cnn", "--json")  # fmt: skip
    result["wait_32_mnist_cnn"] = json.loads(wait.stdout)
    text = json.dumps(result, indent=2)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
