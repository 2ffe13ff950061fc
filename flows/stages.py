"""The stages after model preparation, shared by a local run (flows/quantize.py) and each build target's worker
(flows/targets.py): build + validate the variants not searched, the INT8 search, speed, gate, ship decision, and
their MLflow child runs, registry and summary under `ctx.tracker.parent_run_id` (the run's parent run locally, the
target's own run on a build target).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger

from flows.context import RunContext
from flows.outcome import FlowOutcome
from flows.prepare import PreparedModels
from flows.registry import register_champion, register_variants
from flows.results import log_run_summary, log_variant_run, preview_images
from flows.search import CalibrationSource, search_variant
from tasks.build import build_task
from tasks.profile import profile_task
from tasks.speed import speed_task
from tasks.validate import validate_task
from yoloq.backend_registry import backend_spec
from yoloq.backends import BuiltModel
from yoloq.calibrate import CalibrationResult
from yoloq.config import Params
from yoloq.metrics import per_class_table
from yoloq.quant.formats import FORMATS
from yoloq.report import (
    VariantResult,
    check_gate,
    ship_decision,
    variant_result,
    with_deltas,
    with_intervals,
    with_timing,
)


@dataclass(frozen=True)
class TargetLabel:
    """Which build target a worker's results belong to: prefixes run names, names registered models."""

    name: str
    run_params: dict[str, str]  # added to every variant run: target, work pool, Prefect flow run


@dataclass(frozen=True)
class StagesResult:
    outcome: FlowOutcome
    variant_runs: dict[str, str]  # variant name -> its MLflow child run id


def run_variants(
    ctx: RunContext,
    prepared: PreparedModels,
    calibration: CalibrationSource | None = None,
    target: TargetLabel | None = None,
) -> StagesResult:
    """Build, search, validate, time, judge and log every variant; finishes ctx.tracker's parent run."""
    params, tracker = ctx.params, ctx.tracker
    facts, dataset, fp32_onnx = prepared.facts, prepared.dataset, prepared.fp32_onnx
    plain = prepared.calibration

    searched = {v.name for v in params.variants if params.search.enabled and v.quantized}
    by_name: dict[str, VariantResult] = {}
    per_class: dict[str, str] = {}
    builds: dict[str, BuiltModel] = {}
    for variant in params.variants:  # every variant but the searched ones: the search is judged against these
        if variant.name in searched:
            continue
        qdq_onnx = plain.qdq_path if plain else None
        built = build_task(variant, params, fp32_onnx, qdq_onnx, ctx.build_dir)
        builds[variant.name] = built
        score = validate_task(built, dataset, facts, params)
        by_name[variant.name] = variant_result(variant.name, built, score)
        per_class[variant.name] = per_class_table(score.map)

    reference = params.reference_variant.name
    fp16_name = next((v.name for v in params.variants if v.precision == "fp16"), None)
    fp16 = builds[fp16_name] if fp16_name else None  # the search times its candidates interleaved with it
    for variant in (v for v in params.variants if v.name in searched):
        found = search_variant(ctx, prepared, variant, builds[reference], by_name[reference], fp16, calibration)
        by_name[variant.name] = found.result
        builds[variant.name] = found.built
        per_class[variant.name] = found.per_class
        tracker.log_artifacts(tracker.parent_run_id, found.artifacts, f"search-{variant.name}")
    timings = speed_task({v.name: builds[v.name] for v in params.variants}, dataset, facts, params)
    raw_results = [with_timing(by_name[v.name], timings[v.name]) for v in params.variants]

    results = with_intervals(with_deltas(raw_results, reference), reference, params.validation.interval)
    gate = check_gate(results, params.gate, reference)
    ship = ship_decision(results, params.gate, reference)
    data = data_roles(params, prepared)
    outcome = FlowOutcome(results, gate, tracker.parent_run_id, tracker.tracking_uri, ctx.report_dir, ship, data)
    _log_previews(ctx, prepared, builds)
    variant_runs = _log_results(ctx, outcome, per_class, builds, plain, target)
    return StagesResult(outcome, variant_runs)


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
    target: TargetLabel | None,
) -> dict[str, str]:
    params, tracker = ctx.params, ctx.tracker
    parent, report_dir = tracker.parent_run_id, outcome.report_dir
    prefix = f"{target.name}/" if target else ""
    note = "; ".join(f"{role}: {what}" for role, what in outcome.data.items())
    if outcome.ship is not None:
        note += f"\n\nship: {outcome.ship.reason}"
    child_runs: dict[str, str] = {}
    for result in outcome.results:
        built = builds[result.name]
        variant_params = {
            **built.variant.model_dump(mode="json"),
            "model": str(result.model_path),
            "model_sha256": result.model_sha256(),
            **{f"build.{k}": v for k, v in built.details.items()},
            **(target.run_params if target else {}),
        }
        artifacts = _build_artifacts(built)
        if calibration and built.variant.quantization == "qdq" and "calibration_manifest" not in built.details:
            artifacts.append(calibration.manifest_path)
        variant_dir = report_dir / result.name
        child = log_variant_run(
            tracker,
            prefix + result.name,
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
    target_name = target.name if target else None
    register_variants(tracker.client, params, outcome.results, outcome.gate, child_runs, target=target_name)
    if outcome.ship is not None:
        register_champion(tracker.client, params, outcome.ship, outcome.results, child_runs, target=target_name)
    tracker.finish(parent)  # the run completed; its `gate` tag says whether the variants may ship
    return child_runs


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
    an engine was built from, plus the model before TensorRT-only surgery (NMS plugin, uint8 input) when it differs
    (so a registered engine can be rebuilt on another GPU, or run on ONNX Runtime: flows/model_uri.py)."""
    keys = ("build_log", "timing_cache", "calibration_cache", "calibration_manifest", "source_onnx", "model_onnx")
    paths = [Path(built.details[k]) for k in keys if built.details.get(k)]
    record = built.path.with_suffix(".json")
    if built.details and record.is_file():
        paths.append(record)
    return [p for p in paths if p.is_file()]
