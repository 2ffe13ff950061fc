"""Where do two machines part? A fingerprint of `make run`'s default INT8 candidate, stage by stage.

    python benchmarks/fingerprint.py run --model SIMPLIFIED.onnx --calib data/coco/calib/images \\
        --report data/coco/report --out D            # on each machine (the GPU kit: bash benchmarks/kit.sh ...)
    python benchmarks/fingerprint.py compare D1/fingerprint.json D2/fingerprint.json

`run` repeats what the flow does for `mse-64.default` (calibration statistics on the first 64 calibration images,
MSE ranges, the default float convs: `yoloq.calibrate.calibrate`), then scores the Q/DQ model (the integer-exact
simulation) and the FP32 model on the report set. It prints and writes the sha256 of the statistics' contents, of
the Q/DQ model, of every image's detections and the mAP. `compare` says at which stage two fingerprints first
differ and on how many images. Take the simplified model from `runs/cache/simplify/` of a `make run`: export
needs PyTorch, which the GPU kit does not carry (the export is the same on this machine with ATen's default, AVX2
and AVX-512 kernels: checked 2026-12-03).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from yoloq.errors import YoloqError  # noqa: E402
from yoloq.heads import Detections  # noqa: E402

CALIBRATION_IMAGES = 64  # the default candidate's calibration size


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _stats_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with np.load(path) as data:
        for key in sorted(data.files):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(data[key]).tobytes())
    return digest.hexdigest()


def _detections_sha256(detections: Detections) -> str:
    data = detections.boxes_xyxy.tobytes() + detections.scores.tobytes() + detections.classes.tobytes()
    return hashlib.sha256(data).hexdigest()


def run(model: Path, calib: Path, report: Path, out: Path) -> dict[str, object]:
    import onnx

    from yoloq.artifacts import file_sha256
    from yoloq.backends.onnxruntime import OnnxRuntimeRunner
    from yoloq.calibrate import calibrate
    from yoloq.checkpoint_sniff import check_onnx
    from yoloq.config import CalibrationConfig, ValidationConfig
    from yoloq.export import facts_for_onnx
    from yoloq.metrics import coco_map
    from yoloq.validate import detect, load_validation_set

    check_onnx(model)  # a file that is not a model: one line, before anything is written
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    facts = facts_for_onnx(model, 640)
    config = CalibrationConfig(images=calib, num_images=CALIBRATION_IMAGES, algorithm="mse")
    input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    calibrated = calibrate(model, input_name, facts.imgsz, config, [], out)
    stats = next(out.glob("stats-*.npz"))
    document: dict[str, object] = {
        "cpu": _cpu(),
        "fp32_model_sha256": file_sha256(model),
        "stats_sha256": _stats_sha256(stats),
        "qdq_model_sha256": file_sha256(calibrated.qdq_path),
    }
    validation = ValidationConfig(images=report / "images", labels=report / "labels")
    dataset = load_validation_set(validation, len(facts.names))
    images = [truth.path for truth in dataset.truths]
    for name, path in (("int8", calibrated.qdq_path), ("fp32", model)):
        with OnnxRuntimeRunner(path) as runner:
            detections = detect(runner, images, facts.head_format, facts.imgsz, validation)
        scored = coco_map(dataset.truths, detections, facts.names)
        document[name] = {
            "map50_95": round(scored.map50_95, 5),
            "map50": round(scored.map50, 5),
            "detections_sha256": {p.name: _detections_sha256(d) for p, d in zip(images, detections, strict=True)},
        }
    document["seconds"] = round(time.perf_counter() - start, 1)
    (out / "fingerprint.json").write_text(json.dumps(document, indent=1))
    return document


def summary(document: dict[str, object]) -> str:
    lines = [f"cpu: {document['cpu']}"]
    for key in ("fp32_model_sha256", "stats_sha256", "qdq_model_sha256"):
        lines.append(f"{key}: {str(document[key])[:16]}")
    for name in ("int8", "fp32"):
        variant = document[name]
        assert isinstance(variant, dict)
        joined = hashlib.sha256("".join(sorted(variant["detections_sha256"].values())).encode()).hexdigest()
        lines.append(
            f"{name}: mAP50-95 {variant['map50_95']:.5f}, mAP50 {variant['map50']:.5f}, detections {joined[:16]}"
        )
    return "\n".join(lines)


def compare(a: dict[str, object], b: dict[str, object]) -> str:
    """The first stage where two fingerprints differ, and on how many images each variant's detections do."""
    for key in ("fp32_model_sha256", "stats_sha256", "qdq_model_sha256"):
        if a[key] != b[key]:
            return f"first difference: {key} ({str(a[key])[:16]} vs {str(b[key])[:16]})"
    lines = ["models and statistics equal"]
    for name in ("int8", "fp32"):
        da, db = a[name]["detections_sha256"], b[name]["detections_sha256"]  # type: ignore[index]
        differing = sorted(k for k in da if da[k] != db.get(k))
        lines.append(f"{name}: detections differ on {len(differing)} of {len(da)} images {differing[:5]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("run")
    r.add_argument("--model", type=Path, required=True, help="the simplified FP32 ONNX (runs/cache/simplify/)")
    r.add_argument("--calib", type=Path, default=PROJECT / "data/coco/calib/images")
    r.add_argument("--report", type=Path, default=PROJECT / "data/coco/report", help="folder with images/, labels/")
    r.add_argument("--out", type=Path, required=True)
    c = commands.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args()
    given = (args.model, args.calib, args.report / "images", args.report / "labels") if args.command == "run" else ()
    for path in given or (args.a, args.b):
        if not path.exists():
            print(f"{path} not found", file=sys.stderr)
            return 2
    if args.command == "run":
        try:
            print(summary(run(args.model, args.calib, args.report, args.out)))
        except YoloqError as exc:  # a bad model or image set
            print(f"fingerprint: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        print(compare(json.loads(args.a.read_text()), json.loads(args.b.read_text())))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        print(f"fingerprint: {args.a} or {args.b} is not a fingerprint.json of `run` ({exc!r})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
