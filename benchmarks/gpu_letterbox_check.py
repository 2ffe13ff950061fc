"""On a GPU: GPU decoding + letterboxing (`decode="gpu"`) against the CPU's, pixel by pixel and by COCO mAP.

    bash benchmarks/kit.sh benchmarks/gpu_letterbox_check.py --model M.onnx|E.engine --set data/coco/val \
        [--set ...] [--level 2 --tactics EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS --timing-cache T]

Loads the model as a TensorRT engine with a uint8 input and EfficientNMS (built here from an ONNX, reused from
--build-dir), then prints:
- kernel: the letterbox kernel's frames against `reference_letterbox` (the same arithmetic in NumPy) applied to
  the images nvJPEG decoded (downloaded from the GPU): they must be equal, byte for byte;
- decoder: nvJPEG's pixels against OpenCV's (libjpeg-turbo) for the same files: mean and largest difference;
- frames: GPU frames against the CPU pipeline's `letterbox_rgb` frames (what validation feeds);
- mAP50-95 / mAP50 of the same engine's detections with --decode cpu and gpu, on every --set (images/, labels/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from yoloq.config import LabelledSet, TensorRTConfig, ValidationConfig  # noqa: E402
from yoloq.detector import Detector  # noqa: E402
from yoloq.errors import YoloqError  # noqa: E402
from yoloq.heads import DecodeSettings  # noqa: E402
from yoloq.metrics import coco_map  # noqa: E402
from yoloq.preprocess import letterbox_rgb, read_image  # noqa: E402
from yoloq.validate import load_validation_set, validation_sources  # noqa: E402


def pixel_check(detector: Detector, paths: list[Path]) -> None:
    from yoloq.backends.tensorrt.gpu_letterbox import arena_layout, encoded_image, reference_letterbox

    gpu, size = detector.gpu_letterbox, detector.imgsz
    equal_kernel = frames_total = 0
    decoder_diffs: list[float] = []
    decoder_max = frame_max = 0
    frame_differing = 0.0
    on_gpu = 0
    batch = gpu.max_batch
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        encoded = [encoded_image(p) for p in chunk]
        images = [e for e in encoded if e is not None]
        boxes = gpu.letterbox(images, 0)
        frames = gpu.download(gpu.frames(0), (len(images), size, size, 3))
        offsets, total = arena_layout(images)
        arena = gpu.download(gpu.arena, (total,))
        for index, (path, image) in enumerate(zip(chunk, images, strict=True)):
            count = image.width * image.height * 3
            decoded = arena[offsets[index] : offsets[index] + count].reshape(image.height, image.width, 3)
            reference, box = reference_letterbox(decoded, size)
            equal_kernel += int(np.array_equal(reference, frames[index]) and box == boxes[index])
            frames_total += 1
            cpu_bgr = read_image(path)
            cpu_rgb = cpu_bgr[:, :, ::-1]
            if image.data is not None:
                on_gpu += 1
                diff = np.abs(decoded.astype(np.int16) - cpu_rgb.astype(np.int16))
                decoder_diffs.append(float(diff.mean()))
                decoder_max = max(decoder_max, int(diff.max()))
            cpu_frame, _ = letterbox_rgb(cpu_bgr, size)
            fdiff = np.abs(cpu_frame.astype(np.int16) - frames[index].astype(np.int16))
            frame_max = max(frame_max, int(fdiff.max()))
            frame_differing += float((fdiff > 2).mean())
    print(f"kernel: {equal_kernel} of {frames_total} frames equal to reference_letterbox of nvJPEG's pixels")
    print(
        f"decoder: {on_gpu} of {frames_total} files decoded by nvJPEG ({gpu.backend} backend); mean "
        f"|nvJPEG - OpenCV| {np.mean(decoder_diffs):.3f} levels per channel (worst image "
        f"{max(decoder_diffs):.3f}), largest {decoder_max}"
    )
    print(
        f"frames: GPU vs CPU letterbox: largest difference {frame_max} levels, "
        f"{100 * frame_differing / frames_total:.2f}% of values differ by more than 2"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--set", type=Path, action="append", required=True, help="folder with images/, labels/")
    parser.add_argument("--conf", type=float, default=0.001, help="decode and EfficientNMS threshold (0.001)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument(
        "--tactics", help="comma-separated tactic sources (kit: EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS)"
    )
    parser.add_argument("--timing-cache", type=Path)
    parser.add_argument("--build-dir", type=Path, default=PROJECT / "runs/cache/build")
    args = parser.parse_args()
    settings = TensorRTConfig(
        builder_optimization_level=args.level,
        tactic_sources=args.tactics.split(",") if args.tactics else None,
        timing_cache=args.timing_cache,
        input="uint8",
        nms="efficient_nms",
    )
    main_set, *more = args.set
    config = ValidationConfig(
        images=main_set / "images",
        labels=main_set / "labels",
        extra_sets=[LabelledSet(images=f / "images", labels=f / "labels") for f in more],
    )
    paths = [p for source in validation_sources(config) for p in source.images]
    decoding = DecodeSettings(args.conf, 0.6, 300)
    scores = {}
    for decode in ("gpu", "cpu"):
        with Detector.load(
            args.model, "tensorrt", decoding=decoding, batch_size=args.batch, tensorrt=settings, decode=decode
        ) as detector:
            truths = load_validation_set(config, len(detector.names)).truths
            if decode == "gpu":
                print(f"engine {detector.model_path.name}; {len(paths)} images")
                pixel_check(detector, paths)
            found = [p.detections for p in detector.stream(paths, workers=args.workers)]
            if any(f is None for f in found):
                raise SystemExit("some images were unreadable")
            result = coco_map(truths, [f.as_detections() for f in found], detector.names)  # type: ignore[union-attr]
            scores[decode] = result
            print(f"decode {decode}: mAP50-95 {result.map50_95:.4f}, mAP50 {result.map50:.4f} ({len(paths)} images)")
    delta = 100 * (scores["gpu"].map50_95 - scores["cpu"].map50_95)
    print(f"decode gpu - cpu: {delta:+.2f} mAP50-95 points")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except YoloqError as exc:
        sys.exit(f"gpu_letterbox_check: {exc}")
