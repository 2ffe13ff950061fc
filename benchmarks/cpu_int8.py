"""FP32 vs INT8 (explicit Q/DQ) on ONNX Runtime CPU: mAP and speed on one or more validation folders.

    python benchmarks/cpu_int8.py --val data/coco/val --val ../shared/data/coco/val-extra \\
        [--model searched=runs/cache/calibration/model-<key>.int8-qdq.onnx]

Each --val folder holds images/ and labels/; with several, a last row group scores all of them together (one
COCO evaluation, e.g. the 525 images of val + val-extra). `int8` is the plain recipe (calibration.algorithm on
calibration.num_images images, stem and head convs in float); --model adds any other ONNX model, e.g. the one
the INT8 search chose (the `model` param of its candidate's MLflow run). The model, calibration and
quantization settings come from params.yaml (override with --set like `yoloq run`); exports and Q/DQ models
are reused from runs/cache.
Prints one table: set, images, boxes, variant, mAP50-95, mAP50, delta vs FP32, latency at batch 1, images/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from yoloq.backends.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from yoloq.calibrate import calibrate  # noqa: E402
from yoloq.config import LabelledSet, load_params  # noqa: E402
from yoloq.export import export_model  # noqa: E402
from yoloq.preprocess import list_images  # noqa: E402
from yoloq.simplify import simplify_model  # noqa: E402
from yoloq.validate import load_validation_set, score_variant  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val", action="append", type=Path, help="validation folder with images/ and labels/")
    parser.add_argument("-p", "--params", type=Path, default=PROJECT / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="another ONNX model")
    args = parser.parse_args()
    folders = args.val or [PROJECT / "data/coco/val"]
    params = load_params(args.params, args.overrides)
    cache = params.output_dir / "cache"

    exported = export_model(params.model, params.export, cache / "export")
    facts = exported.facts
    calib_images = list_images(params.calibration.images)
    simplified = simplify_model(
        exported.onnx_path, calib_images, exported.input_name, facts.imgsz, params.simplify, cache / "simplify"
    )
    all_validation = [p for folder in folders for p in list_images(folder / "images")]
    start = time.perf_counter()
    calibration = calibrate(
        simplified.onnx_path,
        exported.input_name,
        facts.imgsz,
        params.calibration,
        all_validation,
        cache / "calibration",
        progress=print,
    )
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak RSS after calibration: {peak_rss_mb:.0f} MB"
        + (
            " (the Q/DQ model was reused: delete runs/cache/calibration to measure calibration)"
            if calibration.reused
            else ""
        )
    )
    print(
        f"calibration: {params.calibration.algorithm}, {calibration.num_images} images from "
        f"{params.calibration.images}, {'reused' if calibration.reused else f'{time.perf_counter() - start:.0f} s'}"
    )
    runners = {"fp32": OnnxRuntimeRunner(simplified.onnx_path), "int8": OnnxRuntimeRunner(calibration.qdq_path)}
    for text in args.model:
        name, _, path = text.partition("=")
        if not path or not Path(path).is_file():
            print(f"--model {text!r}: expected NAME=PATH of an existing ONNX model", file=sys.stderr)
            return 2
        runners[name] = OnnxRuntimeRunner(Path(path))

    rows = []
    sets = [
        (folder.name, params.validation.model_copy(update={"images": folder / "images", "labels": folder / "labels"}))
        for folder in folders
    ]
    if len(folders) > 1:
        extra = [LabelledSet(images=f / "images", labels=f / "labels") for f in folders[1:]]
        together = params.validation.model_copy(
            update={"images": folders[0] / "images", "labels": folders[0] / "labels", "extra_sets": extra}
        )
        sets.append(("+".join(f.name for f in folders), together))
    for set_name, config in sets:
        dataset = load_validation_set(config, len(facts.names))
        scores = {}
        for name, runner in runners.items():
            scores[name] = score_variant(runner, dataset, facts.head_format, facts.imgsz, facts.names, config)
            print(f"  {set_name} {name}: mAP50-95 {scores[name].map.map50_95:.4f} ({scores[name].seconds:.0f} s)")
        reference = scores["fp32"].map.map50_95
        for name, score in scores.items():
            rows.append(
                f"| {set_name} | {dataset.stats.num_images} | {dataset.stats.num_boxes} | {name} | "
                f"{score.map.map50_95:.4f} | {score.map.map50:.4f} | {(score.map.map50_95 - reference) * 100:+.2f} | "
                f"{score.timing.latency_ms_b1:.1f} | {score.timing.throughput_ips:.1f} |"
            )
    batch = params.validation.timing.batch_size
    print()
    print(
        f"model {params.model.path.name}, ONNX Runtime CPU, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; calibration {params.calibration.algorithm} on {calibration.num_images} images"
    )
    print(
        "| set | images | boxes | variant | mAP50-95 | mAP50 | Δ vs FP32 (points) | latency ms (b1) | "
        f"images/s (b{batch}) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
