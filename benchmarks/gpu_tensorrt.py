"""TensorRT variants on a GPU: mAP, device latency and throughput, build time and engine size, in one table.

Two steps, because the GPU machine has no PyTorch-free exporter and no ONNX Runtime quantizer:

    # 1. here, on the CPU: export + simplify + explicit INT8 Q/DQ (reused from runs/cache), copied to DEST
    python benchmarks/gpu_tensorrt.py prepare --dest .trt-inputs

    # 2. on the GPU (TensorRT 8.6 kit: ../shared/gpu/README.md), from the project root
    python benchmarks/gpu_tensorrt.py run --inputs .trt-inputs --out OUT \\
        --set output_dir=/tmp/yoloq-trt --set tensorrt.builder_optimization_level=0 \\
        --set "tensorrt.tactic_sources=[EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS]"

`run` builds (or reuses, from output_dir/cache/tensorrt) the engines of fp32, fp16, int8 implicit with the
MinMax and Entropy2 calibrators (FP16 fallback per tensorrt.fp16_fallback) and int8-qdq (the Q/DQ ONNX from
step 1); measures COCO mAP on validation.images, device time (CUDA events, tensorrt.timing.iterations after
warm-up) at batch 1 and at the profile's max batch, and end-to-end time per image (read + letterbox + infer +
decode/NMS, batch 1). After each variant it rewrites OUT/results.json and OUT/table.md, and keeps every result
in output_dir/gpu_tensorrt_results.json, so a run split over several calls (--variants) ends with one table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from yoloq.artifacts import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from yoloq.config import Params, VariantConfig, load_params  # noqa: E402

FP32_NAME, QDQ_NAME, MANIFEST_NAME = "model.onnx", "model.int8-qdq.onnx", "inputs.json"
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "int8-minmax": {"precision": "int8", "quantization": "implicit", "calibrator": "minmax"},
    "int8-entropy2": {"precision": "int8", "quantization": "implicit", "calibrator": "entropy2"},
    "int8-qdq": {"precision": "int8", "quantization": "qdq"},
}


def prepare(params: Params, dest: Path) -> None:
    """CPU: the simplified FP32 ONNX and the Q/DQ ONNX that the GPU run builds from, copied into `dest`."""
    from yoloq.calibrate import calibrate
    from yoloq.export import export_model
    from yoloq.preprocess import list_images
    from yoloq.simplify import simplify_model

    cache = params.output_dir / "cache"
    exported = export_model(params.model, params.export, cache / "export")
    calib_images = list_images(params.calibration.images)
    simplified = simplify_model(
        exported.onnx_path, calib_images, exported.input_name, exported.facts.imgsz, params.simplify, cache / "simplify"
    )
    calibration = calibrate(
        simplified.onnx_path,
        exported.input_name,
        exported.facts.imgsz,
        params.calibration,
        list_images(params.validation.images),
        cache / "calibration",
        progress=print,
    )
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(simplified.onnx_path, dest / FP32_NAME)
    shutil.copyfile(calibration.qdq_path, dest / QDQ_NAME)
    manifest = {
        "model": params.model.path.name,
        "fp32_onnx": simplified.onnx_path.name,
        "qdq_onnx": calibration.qdq_path.name,
        "simplify": simplified.message,
        "qdq_calibration": {"algorithm": calibration.algorithm, "images": calibration.num_images},
    }
    atomic_write_json(dest / MANIFEST_NAME, manifest)
    print(f"prepared {dest}: {FP32_NAME} ({simplified.onnx_path.name}), {QDQ_NAME} ({calibration.qdq_path.name})")


def run(params: Params, inputs: Path, out: Path, names: list[str]) -> int:
    """GPU: build, validate and time each variant; write the table after each."""
    from yoloq.backends import get_backend, tensorrt_availability
    from yoloq.backends.tensorrt import TensorRTBackend, measure_device_timing, measure_end_to_end
    from yoloq.export import read_facts
    from yoloq.validate import evaluate, load_validation_set

    availability = tensorrt_availability()
    if not availability.available:
        print(availability.message(), file=sys.stderr)
        return 2
    fp32_onnx, qdq_onnx = inputs / FP32_NAME, inputs / QDQ_NAME
    for path in (fp32_onnx, qdq_onnx):
        if not path.is_file():
            print(
                f"{path} missing: run `python benchmarks/gpu_tensorrt.py prepare --dest {inputs}` first",
                file=sys.stderr,
            )
            return 2
    facts = read_facts(fp32_onnx)
    dataset = load_validation_set(params.validation, len(facts.names))
    backend = get_backend("tensorrt", params)
    assert isinstance(backend, TensorRTBackend)
    backend.progress = print
    build_dir = params.output_dir / "cache" / "tensorrt"
    history_path = params.output_dir / "gpu_tensorrt_results.json"
    history: dict[str, Any] = read_json(history_path) if history_path.is_file() else {}
    settings = params.tensorrt
    level = settings.builder_optimization_level
    out.mkdir(parents=True, exist_ok=True)
    sample_paths = [t.path for t in dataset.truths]
    sample = _sample_batch(sample_paths, facts.imgsz, 8)

    for name in names:
        variant = VariantConfig(name=name, backend="tensorrt", **VARIANTS[name])
        print(f"\n=== {name} (builder optimization level {level}) ===", flush=True)
        built = backend.build(variant, fp32_onnx, qdq_onnx, build_dir)
        runner = backend.load(built)
        try:
            start = time.perf_counter()
            result = evaluate(runner, dataset, facts.head_format, facts.imgsz, facts.names, params.validation, print)
            eval_seconds = time.perf_counter() - start
            b1, bmax = measure_device_timing(
                runner, sample, [1, settings.profile.max_batch], settings.timing.iterations, settings.timing.warmup
            )
            e2e_ms = measure_end_to_end(runner, sample_paths, facts.imgsz, facts.head_format, params.validation)
        finally:
            runner.close()
        row = {
            "variant": name,
            "map50_95": result.map50_95,
            "map50": result.map50,
            "latency_ms_b1": b1.latency_ms_median,
            "latency_ms_b1_p90": b1.latency_ms_p90,
            "images_per_s_b1": b1.images_per_s,
            "max_batch": bmax.batch,
            "latency_ms_bmax": bmax.latency_ms_median,
            "images_per_s_bmax": bmax.images_per_s,
            "end_to_end_ms_per_image": e2e_ms,
            "timing_iterations": b1.iterations,
            "build_seconds": built.build_seconds,
            "engine_mb": built.size_mb,
            "engine": built.path.name,
            "validation_images": len(dataset.truths),
            "validation_seconds": eval_seconds,
            "details": built.details,
        }
        history[f"{name}@level{level}"] = row
        atomic_write_json(history_path, history)
        _write_outputs(history, out)
        print(
            f"{name}: mAP50-95 {result.map50_95:.4f}, mAP50 {result.map50:.4f}, "
            f"{b1.latency_ms_median:.3f} ms at batch 1, "
            f"{bmax.images_per_s:.0f} images/s at batch {bmax.batch}, e2e {e2e_ms:.2f} ms/image, "
            f"build {built.build_seconds:.0f} s ({'reused' if built.details.get('reused') == 'true' else 'built'})",
            flush=True,
        )
    print()
    print((out / "table.md").read_text())
    return 0


def _sample_batch(paths: list[Path], imgsz: int, count: int) -> Any:
    import numpy as np

    from yoloq.preprocess import load_preprocessed

    frames = [load_preprocessed(p, imgsz) for p in paths[:count]]
    return np.stack([f[0] for f in frames if f is not None])


def table(rows: list[dict[str, Any]]) -> str:
    """The results as markdown: one line per variant and builder optimization level."""
    batch = str(rows[0]["max_batch"]) if rows else "max"
    lines = [
        f"| variant | mAP50-95 | mAP50 | latency ms (b1) | images/s (b{batch}) | e2e ms/image | build s | engine MB | "
        "card | TensorRT | opt level |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        d = r["details"]
        lines.append(
            f"| {r['variant']} | {r['map50_95']:.4f} | {r['map50']:.4f} | {r['latency_ms_b1']:.3f} | "
            f"{r['images_per_s_bmax']:,.0f} | {r['end_to_end_ms_per_image']:.2f} | {r['build_seconds']:.0f} | "
            f"{r['engine_mb']:.1f} | {d.get('gpu', '?')} | {d.get('tensorrt_version', '?')} "
            f"(lib {d.get('tensorrt_library_version', '?')}) | {d.get('builder_optimization_level', '?')} |"
        )
    return "\n".join(lines)


def _write_outputs(history: dict[str, Any], out: Path) -> None:
    order = {name: index for index, name in enumerate(VARIANTS)}
    rows = sorted(
        history.values(), key=lambda r: (r["details"].get("builder_optimization_level", ""), order[r["variant"]])
    )
    atomic_write_json(out / "results.json", {"rows": rows})
    atomic_write_text(out / "table.md", table(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("-p", "--params", type=Path, default=PROJECT / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--dest", "--inputs", dest="inputs", type=Path, default=PROJECT / ".trt-inputs")
    parser.add_argument("--out", type=Path, default=Path("gpu-results"), help="results.json and table.md")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    args = parser.parse_args()
    params = load_params(args.params, args.overrides)
    if args.step == "prepare":
        prepare(params, args.inputs)
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    return run(params, args.inputs, args.out, names)


if __name__ == "__main__":
    sys.exit(main())
