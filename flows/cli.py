"""The `yoloq` command: `run` the quantize flow, `validate` one model, `predict` with one, `profile` a TensorRT engine
layer by layer.

Exit codes: 0 success, 1 unexpected error, 2 bad input or configuration, 3 accuracy gate failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from yoloq.errors import GateFailed, YoloqError


def _quiet_prefect_defaults() -> None:
    """Offline-friendly defaults for Prefect's temporary server (the user's environment wins)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("YOLO_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yoloq", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the quantize flow on params.yaml")
    run.add_argument("-p", "--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a params.yaml key, e.g. --set calibration.num_images=64 (repeatable)",
    )
    run.add_argument("--json", type=Path, help="write the results as JSON to this file")

    validate = commands.add_parser("validate", help="COCO mAP of one ONNX model")
    validate.add_argument("--model", type=Path, required=True, help="ONNX model (exported by yoloq or Ultralytics)")
    validate.add_argument("--images", type=Path, required=True, help="folder of images")
    validate.add_argument("--labels", type=Path, required=True, help="folder of YOLO .txt labels or a COCO json")
    validate.add_argument("--imgsz", type=int, default=640, help="input size when the model does not say (640)")
    validate.add_argument("--num-images", type=int, default=None, help="first N images only")
    validate.add_argument("--json", type=Path, help="write the result as JSON to this file")

    predict = commands.add_parser(
        "predict", help="detections of a model on an image, a folder of images or a video (drawn, JSON, COCO)"
    )
    predict.add_argument(
        "--model", required=True, help="ONNX model, TensorRT engine built by yoloq, or models:/NAME@ALIAS (registry)"
    )
    predict.add_argument("--source", type=Path, required=True, help="an image, a folder of images, or a video file")
    predict.add_argument("--save", type=Path, metavar="DIR", help="write drawn images (a drawn .mp4 for a video) here")
    predict.add_argument("--json", type=Path, metavar="F", help="write the detections of every image as JSON")
    predict.add_argument("--coco", type=Path, metavar="F", help="write COCO results JSON (image_id, bbox, score)")
    predict.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "tensorrt"),
        default="auto",
        help="auto: an engine on TensorRT, an ONNX model on ONNX Runtime; tensorrt with an ONNX model builds an "
        "engine on this GPU (reused)",
    )
    predict.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    predict.add_argument("--iou", type=float, default=0.6, help="NMS IoU threshold (default 0.6, as validation)")
    predict.add_argument("--max-det", type=int, default=300, help="detections kept per image (default 300)")
    predict.add_argument("--batch", type=int, default=8, help="images per inference batch (default 8)")
    predict.add_argument(
        "--workers",
        type=int,
        help="threads that read + letterbox and decode + NMS around inference (default: the CPU count, at most 12, "
        "the best on the 16-core H200 host; with --decode gpu 2, the best there; 0 = none)",
    )
    predict.add_argument(
        "--decode",
        choices=("cpu", "gpu"),
        default="cpu",
        help="where JPEGs are decoded and letterboxed: cpu (OpenCV, validation's pixels) or gpu (nvJPEG + a CUDA "
        "kernel, for a TensorRT engine with a uint8 input; default cpu)",
    )
    predict.add_argument("--imgsz", type=int, default=640, help="input size when the model does not say (640)")
    predict.add_argument(
        "--precision", choices=("fp32", "fp16"), default="fp32", help="engine built from a float ONNX (fp32)"
    )
    predict.add_argument(
        "-p",
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file for mlflow.tracking_uri, output_dir and engine builds (tensorrt; default params.yaml)",
    )
    predict.add_argument(
        "--tracking-uri", help="MLflow tracking URI for models:/ (default: as yoloq run: params, $MLFLOW_TRACKING_URI)"
    )
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")

    profile = commands.add_parser(
        "profile", help="per-layer time, kernel precision, reformats and Q/DQ of a TensorRT engine (needs a GPU)"
    )
    profile.add_argument("engine", type=Path, metavar="ENGINE", help="a TensorRT engine (built by yoloq: trt-*.engine)")
    profile.add_argument("--batch", type=int, default=None, help="batch to profile (default: the profile's max batch)")
    profile.add_argument("--iterations", type=int, default=50, help="profiled executions to average (default 50)")
    profile.add_argument("--warmup", type=int, default=10, help="executions before profiling (default 10)")
    profile.add_argument("--top", type=int, default=10, help="slowest layers to list (default 10)")
    profile.add_argument("--out", type=Path, help="folder for profile.md/.png/.json (default runs/profile/ENGINE-STEM)")

    compare = commands.add_parser("compare", help="side-by-side table and plot of variants across MLflow runs")
    compare.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="parent run ids (default: the two latest runs)")
    compare.add_argument("--experiment", default="yoloq", help="MLflow experiment (default yoloq)")
    compare.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"
    )
    compare.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for compare.md/.png")

    watch = commands.add_parser("watch", help="send a Prefect event for each new .pt/.onnx content in a folder")
    watch.add_argument("folder", type=Path, help="folder where new checkpoints land")
    watch.add_argument("--once", action="store_true", help="scan once and exit")
    watch.add_argument("--interval", type=float, default=30.0, help="seconds between scans (default 30)")
    watch.add_argument("--settle", type=float, default=5.0, help="skip files modified this recently (default 5 s)")
    watch.add_argument("--state", type=Path, help="hashes already announced (default FOLDER/.yoloq-watch.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.params, args.overrides, args.json)
        if args.command == "compare":
            return _compare(args)
        if args.command == "watch":
            return _watch(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "predict":
            return _predict(args)
        return _validate(args)
    except GateFailed as exc:
        if exc.document:
            _print_document(exc.document)
            _write_json(args.json, exc.document)
        print(f"\nyoloq: {exc}", file=sys.stderr)
        return exc.exit_code
    except YoloqError as exc:
        print(f"yoloq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("yoloq: interrupted; finished outputs are kept, partial ones were discarded", file=sys.stderr)
        return 130


def _run(params: Path, overrides: list[str], json_path: Path | None) -> int:
    from yoloq.backends import resolve_variants
    from yoloq.config import load_params
    from yoloq.preflight import check_inputs

    loaded = load_params(params, overrides)
    check_inputs(loaded if loaded.targets else resolve_variants(loaded))  # bad input: exit 2 before Prefect starts
    _quiet_prefect_defaults()
    from flows.prefect_server import start_temporary_server
    from flows.quantize import quantize_flow
    from yoloq.logs import quiet_expected_errors

    quiet_expected_errors()  # a YoloqError ends the run with our one-line message, not a Prefect traceback
    server_log = loaded.output_dir / "prefect-server.log"
    if api_url := start_temporary_server(server_log):  # its shutdown noise goes to the log, not the terminal
        print(f"prefect: temporary server {api_url.removesuffix('/api')} (its output: {server_log})", flush=True)
    document = quantize_flow(params_path=str(params), overrides=overrides)
    _print_document(document)
    _write_json(json_path, document)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from flows.compare import compare_runs
    from flows.tracking import resolve_tracking_uri
    from yoloq.config import MlflowConfig

    uri = resolve_tracking_uri(MlflowConfig(tracking_uri=args.tracking_uri), Path.cwd())
    table, plot, run_id = compare_runs(uri, args.run_ids, args.experiment, args.out)
    print(table)
    print(f"\nplot: {plot}\nMLflow comparison run: {run_id} at {uri}")
    return 0


def _watch(args: argparse.Namespace) -> int:
    _quiet_prefect_defaults()
    from flows.deploy import prefect_api_url
    from flows.watch import watch

    if not prefect_api_url():
        raise YoloqError("yoloq watch sends events to a Prefect server: set PREFECT_API_URL (see README, Operations)")

    state = args.state or args.folder / ".yoloq-watch.json"
    announced = watch(args.folder, state, args.interval, args.settle, args.once)
    print(f"announced {announced} new checkpoint(s)")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from yoloq.errors import InputError

    engine: Path = args.engine
    if not engine.is_file():
        raise InputError(f"engine {engine} not found")
    from yoloq.backends.tensorrt.environment import load_environment

    environment = load_environment()  # BackendUnavailable (exit 2) with the reason and the install hint
    from yoloq.backends.tensorrt.profile import profile_engine
    from yoloq.backends.tensorrt.profile_report import write_profile

    profiled = profile_engine(engine, args.batch, args.iterations, args.warmup, environment.describe())
    files = write_profile(profiled, args.out or Path("runs") / "profile" / engine.stem, args.top)
    print(files.text)
    print(f"\nwritten: {', '.join(str(p) for p in files.paths)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from flows.model_uri import is_model_uri, load_detector
    from flows.predict import image_sources, is_video, predict_images, predict_video
    from yoloq.config import MlflowConfig, load_params
    from yoloq.errors import InputError
    from yoloq.heads import DecodeSettings

    source: Path = args.source
    if not source.exists():
        raise InputError(f"source {source} not found: give an image, a folder of images or a video file")
    images = None if is_video(source) else image_sources(source)  # bad sources exit 2 before the model loads
    mlflow_config, project_dir, cache_dir = MlflowConfig(), Path.cwd(), Path("runs") / "cache"
    tensorrt = None  # engines built here (--backend tensorrt with an ONNX model) use params.yaml's tensorrt section
    if args.params.is_file():
        params = load_params(args.params)
        mlflow_config, project_dir = params.mlflow, args.params.resolve().parent
        cache_dir, tensorrt = params.output_dir / "cache", params.tensorrt
    if args.tracking_uri:
        mlflow_config = MlflowConfig(tracking_uri=args.tracking_uri)
    tracking_uri = None  # MLflow is imported only for a registry URI (a file needs none: the GPU kit has no MLflow)
    if is_model_uri(args.model):
        from flows.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(mlflow_config, project_dir)
    try:
        decoding = DecodeSettings(args.conf, args.iou, args.max_det)
    except ValueError as exc:
        raise InputError(f"--conf/--iou/--max-det: {exc}") from exc
    detector = load_detector(
        args.model,
        args.backend,
        tracking_uri=tracking_uri,
        cache_dir=cache_dir,
        decoding=decoding,
        batch_size=args.batch,
        imgsz=args.imgsz,
        precision=args.precision,
        tensorrt=tensorrt,
        decode=args.decode,
    )
    if args.workers is None:
        args.workers = 2 if args.decode == "gpu" else min(12, os.cpu_count() or 1)
    with detector:  # frees the runner (GPU memory) on every exit
        print(f"model: {detector.model_path} on {detector.backend} ({detector.head_format} head, {detector.imgsz})")
        if detector.gpu_letterbox is not None:
            where = "on the CPU: --save needs the images on the host" if args.save else "on the GPU (nvJPEG)"
            print(f"images decoded and letterboxed {where}")
        progress = not args.no_progress
        if images is None:
            summary = predict_video(detector, source, args.save, args.json, args.coco, args.workers, progress)
            print(summary.line(source, "frames"))
        else:
            summary = predict_images(detector, images, args.save, args.json, args.coco, args.workers, progress)
            print(summary.line(source))
    for path in summary.written:
        print(f"written: {path}")
    return 0


def _print_document(document: dict[str, Any]) -> None:
    from flows.tracking import mlflow_ui_hint
    from yoloq.report import VariantResult, interval_note, results_table

    rows = [VariantResult.from_json(v) for v in document["variants"]]
    print()
    print(results_table(rows))
    print()
    if note := interval_note(rows):
        print(note)
    for role, what in (document.get("data") or {}).items():
        print(f"{role + ':':13}{what}")
    print(f"gate: {'passed' if document.get('gate_passed', True) else 'FAILED'}")
    if document.get("ship"):
        print(f"ship: {document['ship']['reason']}")
    print(f"MLflow run id: {document['mlflow_run_id']}")
    print(f"tracking URI:  {document['tracking_uri']}")
    print(f"MLflow UI:     {mlflow_ui_hint(document['tracking_uri'], document['mlflow_run_id'])}")


def _write_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is None:
        return
    from yoloq.artifacts import atomic_write_json

    atomic_write_json(path, document)
    print(f"results written to {path}")


def _engine_runner(engine: Path, imgsz: int) -> tuple[Any, Any, Any]:
    """A TensorRT runner for an engine built by yoloq; its model facts come from its build record."""
    from yoloq.config import TensorRTConfig
    from yoloq.detector import engine_facts, require_tensorrt

    require_tensorrt()  # BackendUnavailable (exit 2) with the reason and the install hint
    from yoloq.backends.tensorrt.runner import TensorRTRunner
    from yoloq.backends.tensorrt.timing import device_timing_fn

    facts = engine_facts(engine, imgsz)
    timing_fn = device_timing_fn(facts.imgsz, TensorRTConfig())
    runner = TensorRTRunner(engine)  # last: the caller closes it
    if runner.has_nms:
        facts = dataclasses.replace(facts, head_format="end2end")
    return runner, facts, timing_fn


def _validate(args: argparse.Namespace) -> int:
    from yoloq.backends import closing_runner
    from yoloq.backends.onnxruntime import OnnxRuntimeRunner
    from yoloq.config import ValidationConfig
    from yoloq.detector import ENGINE_SUFFIXES
    from yoloq.errors import InputError
    from yoloq.export import facts_for_onnx
    from yoloq.validate import load_validation_set, score_variant

    model: Path = args.model
    if not model.is_file():
        raise InputError(f"model {model} not found")
    if model.suffix.lower() in ENGINE_SUFFIXES:
        runner, facts, timing_fn = _engine_runner(model, args.imgsz)
    elif model.suffix.lower() == ".onnx":
        facts = facts_for_onnx(model, args.imgsz)  # may raise: before the runner exists
        runner, timing_fn = OnnxRuntimeRunner(model), None
    else:
        raise InputError(f"model {model}: validate takes an .onnx model or a TensorRT engine built by yoloq")
    with closing_runner(runner):  # an engine's runner holds GPU memory
        config = ValidationConfig(images=args.images, labels=args.labels, num_images=args.num_images)
        dataset = load_validation_set(config, len(facts.names))
        score = score_variant(runner, dataset, facts.head_format, facts.imgsz, facts.names, config, print, timing_fn)
    result, timing = score.map, score.timing
    document = {
        "model": str(model),
        "images": str(args.images),
        "num_images": result.num_images,
        "num_boxes": result.num_boxes,
        "map50_95": round(result.map50_95, 5),
        "map50": round(result.map50, 5),
        "latency_ms_b1": round(timing.latency_ms_b1, 3),
        "throughput_ips": round(timing.throughput_ips, 2),
        "per_class_ap": {k: round(v, 5) for k, v in result.per_class_ap.items()},
    }
    print(
        f"{model.name}: mAP50-95 {result.map50_95:.4f}  mAP50 {result.map50:.4f}  on {result.num_images} images "
        f"({result.num_boxes} boxes); {timing.latency_ms_b1:.1f} ms at batch 1, {timing.throughput_ips:.1f} images/s "
        f"at batch {timing.throughput_batch}"
    )
    _write_json(args.json, document)
    print(json.dumps({k: document[k] for k in ("map50_95", "map50")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
