"""The quantize DAG, logged to MLflow, judged by the gate, ending in a ship decision:

    params.yaml -> export -> simplify -> calibrate (statistics) -> build + validate (the variants not searched)
        -> INT8 search per quantized variant (candidates judged on the selection set, the chosen one validated on
           the report set) -> speed (every variant timed interleaved) -> gate -> ship decision
        -> MLflow parent run + one child run per variant (TensorRT variants: + per-layer profile of the engine)

The flow does all MLflow logging from its own thread (explicit run ids); tasks only compute.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.context import RunContext
from flows.outcome import FlowOutcome
from flows.prepare import PreparedModels, prepare_models
from flows.registry import register_champion, register_variants
from flows.results import log_run_summary, log_variant_run, preview_images
from flows.search import search_variant
from flows.targets import run_targets
from flows.tracking import RunTracker
from tasks.build import build_task
from tasks.profile import profile_task
from tasks.speed import speed_task
from tasks.validate import validate_task
from yoloq.artifacts import (
    file_sha256,
    remove_stale_temps,
)
from yoloq.backend_registry import backend_spec
from yoloq.backends import BuiltModel, resolve_variants
from yoloq.calibrate import CalibrationResult
from yoloq.config import Params, load_params
from yoloq.errors import GateFailed
from yoloq.metrics import per_class_table
from yoloq.preflight import check_inputs
from yoloq.quant.formats import FORMATS
from yoloq.report import (
    VariantResult,
    check_gate,
    ship_decision,
    variant_result,
    with_deltas,
    with_timing,
)
from yoloq.validate import validation_set_sha256


@flow(name="yoloq-quantize")
def quantize_flow(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Quantize the model in params.yaml and validate every variant; raises GateFailed when accuracy is lost."""
    loaded = load_params(Path(params_path), overrides or [])
    # exit 2 early if a backend is missing here; with build targets, each target's worker resolves `auto` itself
    params = loaded if loaded.targets else resolve_variants(loaded)
    check_inputs(params)
    outcome = run_pipeline(params, Path(params_path).resolve().parent)
    document = outcome.document()
    if not outcome.gate.passed:
        raise GateFailed("accuracy gate failed: " + "; ".join(outcome.gate.reasons), document)
    return document


def run_pipeline(params: Params, project_dir: Path) -> FlowOutcome:
    logger = get_run_logger()
    cache_dir = params.output_dir / "cache"
    stale = remove_stale_temps(cache_dir)
    if stale:
        logger.warning("removed %d half-written files left by an interrupted run", stale)
    data_hashes = {  # quantize_flow's check_inputs has made sure both exist
        "model_sha256": file_sha256(params.model.path),
        "validation_set_sha256": validation_set_sha256(params.validation),  # images scored + their labels
    }
    report_dir = new_run_folder(params.output_dir, params.model.path.stem)
    run_name = report_dir.name
    tracker = RunTracker.start(params, project_dir, run_name, data_hashes)
    logger.info("MLflow run %s at %s", tracker.parent_run_id, tracker.tracking_uri)
    ctx = RunContext(params, tracker, cache_dir, report_dir)
    try:
        if params.targets:  # build+validate on each target's Prefect work pool (flows/targets.py)
            if params.search.enabled:
                logger.warning(
                    "targets: the INT8 search is not run per target; INT8 variants use calibration.algorithm with "
                    "the stem and head convs in float (set search.enabled: false to silence this)"
                )
            outcome = run_targets(ctx)
        else:
            outcome = _run_stages(ctx)
    except BaseException as exc:
        tracker.fail_all(exc)
        raise
    return outcome


def new_run_folder(output_dir: Path, stem: str, now: time.struct_time | None = None) -> Path:
    """A new folder `output_dir/<stem>-<YYYYmmdd-HHMMSS>` for one run's reports, created here (mkdir fails when it
    exists) so no other run can get it; later runs started in the same second get `...-2`, `...-3`, ..."""
    stamp = time.strftime("%Y%m%d-%H%M%S", now or time.localtime())
    output_dir.mkdir(parents=True, exist_ok=True)
    count = 1
    while True:
        folder = output_dir / (f"{stem}-{stamp}" if count == 1 else f"{stem}-{stamp}-{count}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            count += 1


def _run_stages(ctx: RunContext) -> FlowOutcome:
    params, tracker = ctx.params, ctx.tracker
    prepared = prepare_models(ctx)
    facts, dataset, fp32_onnx = prepared.facts, prepared.dataset, prepared.fp32_onnx
    calibration = prepared.calibration

    searched = {v.name for v in params.variants if params.search.enabled and v.quantized}
    by_name: dict[str, VariantResult] = {}
    per_class: dict[str, str] = {}
    builds: dict[str, BuiltModel] = {}
    for variant in params.variants:  # every variant but the searched ones: the search is judged against these
        if variant.name in searched:
            continue
        qdq_onnx = calibration.qdq_path if calibration else None
        built = build_task(variant, params, fp32_onnx, qdq_onnx, ctx.build_dir)
        builds[variant.name] = built
        score = validate_task(built, dataset, facts, params)
        by_name[variant.name] = variant_result(variant.name, built, score)
        per_class[variant.name] = per_class_table(score.map)

    reference = params.reference_variant.name
    fp16_name = next((v.name for v in params.variants if v.precision == "fp16"), None)
    fp16 = builds[fp16_name] if fp16_name else None  # the search times its candidates interleaved with it
    for variant in (v for v in params.variants if v.name in searched):
        found = search_variant(ctx, prepared, variant, builds[reference], by_name[reference], fp16)
        by_name[variant.name] = found.result
        builds[variant.name] = found.built
        per_class[variant.name] = found.per_class
        tracker.log_artifacts(tracker.parent_run_id, found.artifacts, f"search-{variant.name}")
    timings = speed_task({v.name: builds[v.name] for v in params.variants}, dataset, facts, params)
    raw_results = [with_timing(by_name[v.name], timings[v.name]) for v in params.variants]

    results = with_deltas(raw_results, reference)
    gate = check_gate(results, params.gate, reference)
    ship = ship_decision(results, params.gate, reference)
    data = data_roles(params, prepared)
    outcome = FlowOutcome(results, gate, tracker.parent_run_id, tracker.tracking_uri, ctx.report_dir, ship, data)
    _log_previews(ctx, prepared, builds)
    _log_results(ctx, outcome, per_class, builds, calibration)
    return outcome


def _log_previews(ctx: RunContext, prepared: PreparedModels, builds: dict[str, BuiltModel]) -> None:
    """A few validation images with every variant's detections side by side, on the parent run (`previews/`):
    people look before they ship. A failure here only tags the run."""
    variants = [v.name for v in ctx.params.variants]
    folder = ctx.report_dir / "previews"
    try:
        paths = preview_images(ctx.params, builds, variants, prepared.dataset, prepared.facts, folder)
    except Exception as exc:  # drawing is not worth a failed run
        get_run_logger().warning("previews not drawn: %s", exc)
        ctx.tracker.set_tags(ctx.tracker.parent_run_id, {"previews.error": f"{type(exc).__name__}: {exc}"})
        return
    ctx.tracker.log_artifacts(ctx.tracker.parent_run_id, paths, "previews")


def data_roles(params: Params, prepared: PreparedModels) -> dict[str, str]:
    """Which images did what in this run (every number says which images it came from)."""
    folders = [params.validation.images, *(extra.images for extra in params.validation.extra_sets)]
    roles = {"report": f"{' + '.join(str(f) for f in folders)} ({len(prepared.dataset.truths)} images)"}
    if prepared.calibration is not None:
        roles["calibration"] = f"{params.calibration.images} ({prepared.calibration.num_images} images)"
    if prepared.selection is not None:
        roles["selection"] = prepared.selection.describe()
    return roles


def _log_results(
    ctx: RunContext,
    outcome: FlowOutcome,
    per_class: dict[str, str],
    builds: dict[str, BuiltModel],
    calibration: CalibrationResult | None,
) -> None:
    params, tracker = ctx.params, ctx.tracker
    parent, report_dir = tracker.parent_run_id, outcome.report_dir
    note = "; ".join(f"{role}: {what}" for role, what in outcome.data.items())
    if outcome.ship is not None:
        note += f"\n\nship: {outcome.ship.reason}"
    child_runs: dict[str, str] = {}
    for result in outcome.results:
        built = builds[result.name]
        variant_params = {
            **built.variant.model_dump(mode="json"),
            "model": str(result.model_path),
            **{f"build.{k}": v for k, v in built.details.items()},
        }
        artifacts = _build_artifacts(built)
        if calibration and built.variant.quantization == "qdq" and "calibration_manifest" not in built.details:
            artifacts.append(calibration.manifest_path)
        variant_dir = report_dir / result.name
        child = log_variant_run(
            tracker,
            result.name,
            {k: str(v) for k, v in variant_params.items()},
            result,
            per_class[result.name],
            variant_dir,
            artifacts,
            {"build_seconds": built.build_seconds} if built.build_seconds else None,
        )
        child_runs[result.name] = child
        if backend_spec(built.variant.backend).profiled:  # why the engine is as fast as it is: per-layer profile
            profiled = profile_task(built, params, variant_dir / "profile")
            tracker.log_artifacts(child, profiled.files, "profile")
            tracker.log_metrics(child, profiled.metrics)
            if profiled.error:
                tracker.set_tags(child, {"profile.error": profiled.error})
        tracker.finish(child)

    tracker.log_metrics(parent, fp16_vs_int8(outcome.results))
    ship_tags = {}
    if outcome.ship is not None:
        ship_tags = {"ship.variant": outcome.ship.variant or "none", "ship.reason": outcome.ship.reason}
    log_run_summary(params, tracker, outcome, note, ship_tags)
    register_variants(tracker.client, params, outcome.results, outcome.gate, child_runs)
    if outcome.ship is not None:
        register_champion(tracker.client, params, outcome.ship, outcome.results, child_runs)
    tracker.finish(parent)  # the run completed; its `gate` tag says whether the variants may ship


def fp16_vs_int8(results: list[VariantResult]) -> dict[str, float]:
    """For each INT8 variant, its mAP delta and speed-up against the first FP16 variant (if the run has one)."""
    fp16 = next((r for r in results if r.precision == "fp16"), None)
    if fp16 is None:
        return {}
    metrics: dict[str, float] = {}
    for r in results:
        if r.precision in FORMATS:
            metrics[f"{r.name}.delta_map50_95_vs_fp16"] = r.map50_95 - fp16.map50_95
            metrics[f"{r.name}.speedup_vs_fp16"] = r.throughput_ips / fp16.throughput_ips
            metrics[f"{r.name}.latency_ratio_vs_fp16"] = r.latency_ms_b1 / fp16.latency_ms_b1
    return metrics


def _build_artifacts(built: BuiltModel) -> list[Path]:
    """Files a build left beside the model that belong in MLflow: build log, caches, the build record, and the ONNX
    an engine was built from (so a registered engine can be rebuilt on another GPU: flows/model_uri.py)."""
    keys = ("build_log", "timing_cache", "calibration_cache", "calibration_manifest", "source_onnx")
    paths = [Path(built.details[k]) for k in keys if built.details.get(k)]
    record = built.path.with_suffix(".json")
    if built.details and record.is_file():
        paths.append(record)
    return [p for p in paths if p.is_file()]
