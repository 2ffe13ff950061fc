"""End-to-end prediction time (read + letterbox + infer + decode + NMS) against engine time, per image.

    python benchmarks/predict_e2e.py [--model M.onnx] [--images data/coco/val/images] [--batches 1 32]
    bash benchmarks/kit.sh benchmarks/predict_e2e.py --backend tensorrt --engine runs/cache/build/trt-...engine
    bash benchmarks/kit.sh benchmarks/predict_e2e.py --backend tensorrt --model M.onnx --input uint8 \
        --nms efficient_nms --level 2 --tactics EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS --timing-cache T.cache

For each batch size and preprocessing thread count, on the same loaded model (yoloq.detector.Detector, what
`yoloq predict` runs):
- engine ms/img: one inference of a batch of already letterboxed images, divided by the batch (ONNX Runtime: wall
  clock, median of --repeats; TensorRT: device time of execute_async_v3 with CUDA events, median of --iterations,
  copies to and from the GPU excluded);
- end-to-end ms/img: wall clock of `Detector.stream` over --num-images image files (decoded from disk, letterboxed,
  batched, inferred, decoded with class-aware NMS, mapped to original pixels), after one warm-up pass; with
  workers > 0 that many threads read + letterbox the next batch and decode + NMS the previous one during inference;
- ratio (end-to-end / engine), the wall time spent inside inference during that end-to-end pass (the rest is
  reading, letterboxing, decoding, NMS and waiting for them), and images/s end to end;
- each row is the best (minimum time) of --rounds interleaved rounds (engine, then end to end, per thread count):
  on a shared machine other jobs only ever add time, so the minimum is the least disturbed measurement.
Decoding uses --conf (0.25, a deployment's threshold; validation's 0.001 makes NMS see far more candidates).
Without --model the FP32 model of params.yaml is exported and simplified (reused from runs/cache). With
--backend tensorrt and an ONNX model, the engine is built here (reused from --build-dir) with --precision, --level,
--tactics, --timing-cache, --input (uint8: the frames go to the GPU as uint8 and /255 runs in the engine) and --nms
(efficient_nms: NMS in the engine, at --conf).
Imports only the core package (no Prefect, no MLflow), so it runs with the GPU kit's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from yoloq.config import TensorRTConfig  # noqa: E402
from yoloq.detector import Detector  # noqa: E402
from yoloq.errors import YoloqError  # noqa: E402
from yoloq.heads import DecodeSettings  # noqa: E402
from yoloq.preprocess import list_images, load_preprocessed  # noqa: E402
from yoloq.speed import tile_batch  # noqa: E402


@dataclass(frozen=True)
class Row:
    backend: str
    decode: str
    batch: int
    workers: int
    engine_ms_per_image: float
    e2e_ms_per_image: float
    infer_ms_per_image: float  # wall time inside runner.infer during the end-to-end pass
    e2e_images_per_s: float
    images: int

    @property
    def ratio(self) -> float:
        return self.e2e_ms_per_image / self.engine_ms_per_image


def engine_ms_per_image(detector: Detector, frames: np.ndarray, batch: int, repeats: int, warmup: int) -> float:
    """Milliseconds per image of one inference of `batch` letterboxed images (no reading, no decoding)."""
    batch_frames = tile_batch(frames, batch)
    runner = detector.runner
    if detector.backend == "tensorrt":
        from yoloq.backends.tensorrt.timing import time_device

        return time_device(runner, batch_frames, repeats, warmup).latency_ms_median / batch  # type: ignore[arg-type]
    for _ in range(warmup):
        runner.infer(batch_frames)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.infer(batch_frames)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0 / batch


class TimedRunner:
    """A runner that adds up the wall time of its `infer` calls (the inference inside an end-to-end pass)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:  # input_buffer, input_layout, ...: the detector sees the real runner
        return getattr(self.runner, name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._timed(self.runner.infer, batch)

    def infer_device(self, batch: int, frames: int) -> np.ndarray:  # decode gpu: the frames are on the GPU
        return self._timed(self.runner.infer_device, batch, frames)

    def _timed(self, call: Any, *args: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.seconds += time.perf_counter() - start


def end_to_end(detector: Detector, images: list[Path], workers: int) -> tuple[float, float, float]:
    """(ms per image, images/s, ms per image spent in `infer` during the same pass) of Detector.stream over the
    image files, after a warm-up pass on a few."""
    for _ in detector.stream(images[: detector.batch_size], workers=workers):
        pass
    runner, timed = detector.runner, TimedRunner(detector.runner)
    detector.runner = timed  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        count = sum(1 for found in detector.stream(images, workers=workers) if found.detections is not None)
        seconds = time.perf_counter() - start
    finally:
        detector.runner = runner
    return seconds * 1000.0 / count, count / seconds, timed.seconds * 1000.0 / count


def default_model() -> Path:
    from yoloq.config import load_params
    from yoloq.export import export_model
    from yoloq.simplify import simplify_model

    params = load_params(PROJECT / "params.yaml")
    cache = params.output_dir / "cache"
    exported = export_model(params.model, params.export, cache / "export")
    calibration = list_images(params.calibration.images)
    simplified = simplify_model(
        exported.onnx_path, calibration, exported.input_name, exported.facts.imgsz, params.simplify, cache / "simplify"
    )
    return simplified.onnx_path


def markdown(rows: list[Row], model: Path, conf: float, about: str) -> str:
    lines = [
        f"model {model.name}; conf {conf}; host {platform.node()} ({os.cpu_count()} CPUs){about}",
        "",
        "| backend | decode | batch | workers | engine ms/img | end-to-end ms/img | ratio | infer in e2e ms/img "
        "| images/s e2e |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.backend} | {r.decode} | {r.batch} | {r.workers} | {r.engine_ms_per_image:.2f} | "
            f"{r.e2e_ms_per_image:.2f} | "
            f"{r.ratio:.2f}x | {r.infer_ms_per_image:.2f} | {r.e2e_images_per_s:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="ONNX model or engine (default: params.yaml's FP32 model)")
    parser.add_argument("--engine", type=Path, help="a TensorRT engine built by yoloq (implies --backend tensorrt)")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto")
    parser.add_argument("--images", type=Path, default=PROJECT / "data/coco/val/images")
    parser.add_argument("--num-images", type=int, default=64, help="images timed end to end (default 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4], help="pipeline threads (0 4)")
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5, help="engine timings per batch (TensorRT: x20)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each row is their best (5)")
    parser.add_argument(
        "--decode", nargs="+", choices=("cpu", "gpu"), default=["cpu"], help="JPEG decoding + letterbox (cpu)"
    )
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    build = parser.add_argument_group("TensorRT builds from an ONNX model (--backend tensorrt --model M.onnx)")
    build.add_argument("--precision", choices=("fp32", "fp16"), default="fp16", help="float models (Q/DQ: INT8)")
    build.add_argument("--level", type=int, default=3, help="builder optimization level (3)")
    build.add_argument(
        "--tactics", help="comma-separated tactic sources (kit: EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS)"
    )
    build.add_argument("--timing-cache", type=Path, help="tactic timing cache to read and update")
    build.add_argument("--input", choices=("float", "uint8"), default="float", help="engine input (float)")
    build.add_argument("--nms", choices=("none", "efficient_nms"), default="none", help="NMS in the engine (none)")
    build.add_argument("--build-dir", type=Path, default=PROJECT / "runs/cache/build")
    args = parser.parse_args()
    model = args.engine or args.model or default_model()
    backend = "tensorrt" if args.engine else args.backend
    settings = TensorRTConfig(
        builder_optimization_level=args.level,
        tactic_sources=args.tactics.split(",") if args.tactics else None,
        timing_cache=args.timing_cache,
        input=args.input,
        nms=args.nms,
    )
    load_options = {"precision": args.precision, "build_dir": args.build_dir, "tensorrt": settings}
    if not args.images.is_dir() or not list_images(args.images):
        raise SystemExit(f"--images {args.images}: no folder of images there; give one (e.g. data/coco/val/images)")
    images = list_images(args.images)
    images = (images * (args.num_images // max(1, len(images)) + 1))[: args.num_images]
    frames = np.stack([load_preprocessed(p, 640)[0] for p in images[: max(args.batches)]])
    rows = []
    for batch, decode in [(b, d) for b in args.batches for d in args.decode]:
        decoding = DecodeSettings(args.conf, 0.6, 300)
        detector = Detector.load(
            model,
            backend,
            decoding=decoding,
            batch_size=batch,
            decode=decode,
            **load_options,  # type: ignore[arg-type]
        )
        if not rows and batch == args.batches[0] and decode == args.decode[0]:
            about = f"; engine {detector.model_path.name}" if detector.model_path != Path(model) else ""
            layout = getattr(detector.runner, "input_layout", "nchw-float")
            about += (
                f"; input {layout}, pinned {getattr(detector.runner, 'pinned', False)}, head {detector.head_format}"
            )
            print(about.lstrip("; "), flush=True)
        with detector:
            if detector.imgsz != frames.shape[-1]:
                frames = np.stack([load_preprocessed(p, detector.imgsz)[0] for p in images[: max(args.batches)]])
            repeats = args.repeats * (20 if detector.backend == "tensorrt" else 1)
            warmup = max(2, repeats // 5)
            measured: dict[int, list[tuple[float, float, float, float]]] = {w: [] for w in args.workers}
            for turn in range(args.rounds):  # interleaved rounds, engine right before end to end: a shared machine
                for workers in args.workers:  # only adds time, so each row is the best of its rounds
                    engine = engine_ms_per_image(detector, frames, batch, repeats, warmup)
                    e2e_ms, ips, infer_ms = end_to_end(detector, images, workers)
                    measured[workers].append((engine, e2e_ms, ips, infer_ms))
                    print(
                        f"batch {batch}, decode {decode}, {workers} workers, round {turn + 1}: "
                        f"{engine:.2f} / {e2e_ms:.2f} ms/img"
                    )
            for workers, values in measured.items():
                engine = min(v[0] for v in values)
                e2e_ms, ips, infer_ms = min(v[1:] for v in values)  # the best pass, with its own inference time
                rows.append(Row(detector.backend, decode, batch, workers, engine, e2e_ms, infer_ms, ips, len(images)))
    print()
    print(markdown(rows, Path(model), args.conf, about))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except YoloqError as exc:  # a missing or unusable model, no TensorRT here: one line, no traceback
        sys.exit(f"predict_e2e: {exc}")
