"""How fast can this host read and letterbox images at all? The CPU ceiling of end-to-end prediction.

    python benchmarks/host_preprocess.py [--images data/coco/calib/images] [--num-images 1024] [--workers 1 8 16]
    bash benchmarks/kit.sh benchmarks/host_preprocess.py --images /tmp/data/coco/calib/images

For each pool (threads, processes) and worker count, images per second of:
- decode: `yoloq.preprocess.read_image` (the JPEG/PNG decoding alone);
- decode + letterbox: `read_image` then `letterbox_rgb` into a reused buffer, what `Detector.stream` does for an
  engine with a uint8 input (threads: with OpenCV's own thread pool on, and off as the pipeline sets it);
- decode + letterbox to float: `read_image` then `letterbox` (validation's float CHW frame /255), what a float-input
  model needs.
The files are read once before timing (the page cache holds them), each measurement is the best of --rounds.
`benchmarks/predict_e2e.py` times the whole pipeline; compare its images/s with these.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from yoloq.preprocess import letterbox, letterbox_rgb, list_images, read_image  # noqa: E402

_local = threading.local()


def decode(path: Path) -> int:
    image = read_image(path)
    return 0 if image is None else image.shape[0]


def decode_letterbox(path: Path) -> int:
    """Decode and letterbox into this worker's own buffer (the pipeline writes into pinned batch slots)."""
    out = getattr(_local, "out", None)
    if out is None:
        out = _local.out = np.empty((640, 640, 3), np.uint8)
    image = read_image(path)
    return 0 if image is None else letterbox_rgb(image, 640, out)[0].shape[0]


def decode_letterbox_float(path: Path) -> int:
    image = read_image(path)
    return 0 if image is None else letterbox(image, 640)[0].shape[0]


def images_per_s(pool: Executor, work: Callable[[Path], int], paths: list[Path], rounds: int) -> float:
    list(pool.map(work, paths[:64], chunksize=8))  # warm-up: workers started, buffers allocated
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        list(pool.map(work, paths, chunksize=16 if isinstance(pool, ProcessPoolExecutor) else 1))
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=PROJECT / "data/coco/calib/images")
    parser.add_argument("--num-images", type=int, default=1024, help="files per pass (the folder repeated)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    found = list_images(args.images) if args.images.is_dir() else []
    if not found:
        raise SystemExit(f"--images {args.images}: no folder of images there; give one (e.g. data/coco/calib/images)")
    paths = (found * (args.num_images // len(found) + 1))[: args.num_images]
    for path in found:
        path.read_bytes()
    default_threads = cv2.getNumThreads()
    rows = []
    for workers in args.workers:
        with ThreadPoolExecutor(workers) as pool:
            cv2.setNumThreads(default_threads)
            rows.append(("threads", workers, "decode", images_per_s(pool, decode, paths, args.rounds)))
            label = f"decode + letterbox, OpenCV pool on ({default_threads})"
            rows.append(("threads", workers, label, images_per_s(pool, decode_letterbox, paths, args.rounds)))
            cv2.setNumThreads(1)
            label = "decode + letterbox, OpenCV pool off"
            rows.append(("threads", workers, label, images_per_s(pool, decode_letterbox, paths, args.rounds)))
            label = "decode + letterbox to float, OpenCV pool off"
            rows.append(("threads", workers, label, images_per_s(pool, decode_letterbox_float, paths, args.rounds)))
            cv2.setNumThreads(default_threads)
        with ProcessPoolExecutor(workers) as pool:
            rows.append(("processes", workers, "decode + letterbox", images_per_s(pool, decode_letterbox, paths, 1)))
    print(f"host {os.uname().nodename}, {os.cpu_count()} CPUs; {len(paths)} files from {args.images}")
    print()
    print("| pool | workers | work | images/s |")
    print("|---|---:|---|---:|")
    for pool_kind, workers, work, rate in rows:
        print(f"| {pool_kind} | {workers} | {work} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
