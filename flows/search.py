"""The INT8 search stage of the quantize flow, for one INT8 variant (see yoloq.search).

Each candidate is a real variant: a Q/DQ model written from cached calibration statistics, built by the variant's
backend and scored on the selection set (yoloq.selection), never on the validation set: only the chosen candidate
is then scored on the validation (report) set, and that is the number the run prints and gates on. Every
candidate becomes an MLflow child run (tag `yoloq.kind=candidate`) so the MLflow UI shows them side by side;
the parent run gets the candidates table, the sensitivity ranking and plot, and the list of convs kept in float
with the reason for each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger

from flows.context import RunContext
from flows.prepare import PreparedModels
from flows.tracking import CANDIDATE_KIND, RunTracker
from tasks.build import build_task
from tasks.calibrate import qdq_task, sensitivity_task, statistics_task
from tasks.profile import ProfileOutcome, profile_task
from tasks.speed import speed_task
from tasks.validate import detect_task, validate_task
from yoloq.artifacts import atomic_write_json, atomic_write_text
from yoloq.backends import BuiltModel
from yoloq.backends.tensorrt.profile import profile_line
from yoloq.calibrate import CalibrationStats
from yoloq.config import Params, VariantConfig
from yoloq.errors import EngineBuildError
from yoloq.metrics import per_class_table
from yoloq.preprocess import list_images
from yoloq.quant.graph import HeadAnalysis, analyze_head, default_float_convs, prepare_model
from yoloq.report import VariantResult, variant_result
from yoloq.search import (
    Candidate,
    CandidateFailed,
    CandidateResult,
    SearchOutcome,
    candidates_table,
    effective_sizes,
    run_search,
)
from yoloq.selection import SelectionScorer, SelectionSet
from yoloq.sensitivity import LayerSensitivity, SensitivityReport, sensitivity_plot, sensitivity_table
from yoloq.validate import NOT_TIMED, Timing


@dataclass(frozen=True)
class SearchedVariant:
    result: VariantResult  # the chosen candidate, named after the variant, scored and timed on the report set
    built: BuiltModel
    float_nodes: list[str]  # convs the chosen candidate keeps out of INT8
    outcome: SearchOutcome
    per_class: str  # per-class AP table of the chosen candidate
    artifacts: list[Path]  # for the parent MLflow run


@dataclass(frozen=True)
class _Evaluated:
    built: BuiltModel
    float_nodes: list[str]
    manifest: Path | None  # the Q/DQ model's calibration manifest (Q/DQ variants)
    profile: ProfileOutcome  # TensorRT candidates timed against FP16: their per-layer profile (else empty)


@dataclass(frozen=True)
class CalibrationSource:
    """Where the search's calibration statistics come from: computed here on first use (`local_calibration`), or
    computed once upstream and shipped to a build target (flows/target_inputs.py)."""

    statistics: Callable[[int], CalibrationStats]  # num_images -> the statistics of that many calibration images
    available_images: int  # images in calibration.images: search.calibration_sizes are capped at it


def local_calibration(ctx: RunContext, prepared: PreparedModels) -> CalibrationSource:
    """Statistics computed (or reused from the cache) here, once per calibration size."""
    params = ctx.params
    computed: dict[int, CalibrationStats] = {}
    validation_images = [t.path for t in prepared.dataset.truths]

    def statistics(num_images: int) -> CalibrationStats:
        if num_images not in computed:
            computed[num_images] = statistics_task(
                prepared.fp32_onnx,
                prepared.exported.input_name,
                prepared.facts.imgsz,
                params.calibration,
                validation_images,  # overlap with the selection images is refused by load_selection_set
                ctx.calibration_dir,
                num_images,
            )
        return computed[num_images]

    return CalibrationSource(statistics, len(list_images(params.calibration.images)))


def search_sizes(params: Params, variant: VariantConfig, available_images: int) -> list[int]:
    """The calibration sizes the search of `variant` builds candidates from (and asks statistics for)."""
    if variant.quantization == "implicit":
        return effective_sizes([params.calibration.num_images], available_images)
    return effective_sizes(params.search.calibration_sizes, available_images)


def search_variant(
    ctx: RunContext,
    prepared: PreparedModels,
    variant: VariantConfig,
    fp32_built: BuiltModel,
    fp32: VariantResult,
    fp16: BuiltModel | None,
    calibration: CalibrationSource | None = None,
) -> SearchedVariant:
    """Run the search for `variant`, judging candidates on the selection set; log every candidate to MLflow; then
    score the chosen one on the validation (report) set, the only numbers the run reports and gates on.

    Q/DQ variants: candidates differ in calibration algorithm, calibration size and the convs left out of Q/DQ.
    Implicit variants (TensorRT 8.6-10.x): the variant's TensorRT calibrator on calibration.num_images images,
    then the same sensitivity ranking held out of INT8 by layer precision constraints (float_layers).
    `calibration` gives the statistics (default: computed here)."""
    logger = get_run_logger()
    params, tracker, facts = ctx.params, ctx.tracker, prepared.facts
    if prepared.selection is None:
        raise ValueError("search_variant needs the selection set (prepare_models loads it when the search runs)")
    selection = prepared.selection
    dataset = prepared.dataset
    fp32_onnx = prepared.fp32_onnx
    source = calibration or local_calibration(ctx, prepared)
    stats = source.statistics
    percentile = params.calibration.percentile
    timed = fp16 is not None and params.gate.min_speedup_vs_fp16 > 0  # speed decides too: time every candidate
    fp16_speed: dict[str, float] = {}  # candidate -> FP16's images/s, timed interleaved with that candidate
    implicit = variant.quantization == "implicit"
    evaluated: dict[str, _Evaluated] = {}
    reports: list[SensitivityReport] = []
    scorer = SelectionScorer(selection, detect_task(fp32_built, selection.images, facts, params), facts.names)
    tolerance = selection.config.tolerance
    logger.info(
        "search: candidates judged on %s (FP32 scores %.4f there); a candidate passes at most %.2f points below "
        "the reference, the best score with no more convs in float than the default",
        selection.describe(),
        scorer.reference_score,
        tolerance * 100,
    )

    def build(candidate: Candidate) -> tuple[BuiltModel, list[str], Path | None]:
        floats = list(candidate.float_nodes)
        if implicit:
            update = {"name": candidate.name, "float_layers": floats}
            built = build_task(variant.model_copy(update=update), params, fp32_onnx, None, ctx.build_dir)
            return built, floats, None
        qdq = qdq_task(
            fp32_onnx,
            stats(candidate.num_images),
            candidate.algorithm,
            percentile,
            floats,
            ctx.calibration_dir,
            facts.imgsz,
        )
        built = build_task(
            variant.model_copy(update={"name": candidate.name}), params, fp32_onnx, qdq.path, ctx.build_dir
        )
        return built, qdq.float_nodes, qdq.manifest_path

    def evaluate(candidate: Candidate) -> VariantResult:
        try:
            built, float_nodes, manifest = build(candidate)
        except EngineBuildError as exc:  # e.g. a TensorRT internal error on one mixed-precision layout
            raise CandidateFailed(str(exc)) from exc
        score = round(scorer.score(detect_task(built, selection.images, facts, params)), 4)  # 0.01 points: no CPU noise
        timing = NOT_TIMED
        profile = ProfileOutcome()
        if fp16 is not None and timed:
            timings = speed_task({"fp16": fp16, candidate.name: built}, dataset, facts, params)
            timing, fp16_speed[candidate.name] = timings[candidate.name], timings["fp16"].throughput_ips
            profile = profile_task(
                built, params, ctx.report_dir / f"search-{variant.name}" / "profiles" / candidate.name
            )
        result = selection_result(candidate.name, built, score, scorer.reference_score, timing)
        evaluated[candidate.name] = _Evaluated(built, float_nodes, manifest, profile)
        return result

    def judge(result: VariantResult, best: VariantResult) -> list[str]:
        reasons = []
        below = best.map50_95 - result.map50_95
        if below > tolerance + 1e-12:
            reasons.append(
                f"{result.name}: {selection.config.metric} {result.map50_95:.4f} on the selection set is "
                f"{below * 100:.2f} points below the reference, {best.name} at {best.map50_95:.4f} (the search "
                f"allows {tolerance * 100:.2f})"
            )
        if fp16_speed.get(result.name, 0.0) > 0:
            speedup = result.throughput_ips / fp16_speed[result.name]
            if speedup < params.gate.min_speedup_vs_fp16:
                reasons.append(
                    too_slow(result, speedup, params.gate.min_speedup_vs_fp16, evaluated[result.name].profile.metrics)
                )
        return reasons

    def rank(algorithm: str, num_images: int) -> list[LayerSensitivity]:
        ranges = "minmax" if implicit else algorithm  # implicit: yoloq's minmax ranges stand in for TensorRT's
        report = sensitivity_task(
            fp32_onnx,
            stats(num_images),
            ranges,
            percentile,
            params.search.sensitivity_images,
            facts.imgsz,
            facts.head_format,
            ctx.calibration_dir,
        )
        reports.append(report)
        return report.layers

    sizes = search_sizes(params, variant, source.available_images)
    algorithms: list[str] = [variant.trt_calibrator] if implicit else list(params.search.algorithms)
    if not implicit and sizes != list(dict.fromkeys(params.search.calibration_sizes)):
        logger.warning(
            "search.calibration_sizes %s capped at the %d images of %s: %s",
            params.search.calibration_sizes,
            source.available_images,
            params.calibration.images,
            sizes,
        )
    head = analyze_head(prepare_model(fp32_onnx))
    outcome = run_search(
        variant.name,
        algorithms,
        sizes,
        params.search.float_steps,
        evaluate,
        judge,
        rank,
        logger.info,
        default_float=[] if implicit else default_float_convs(head),
    )
    for tried in outcome.evaluated:  # every candidate is an MLflow child run, judged as the search judged it
        kept = evaluated.get(tried.candidate.name)
        _log_candidate(
            tracker,
            tried,
            kept.float_nodes if kept else list(tried.candidate.float_nodes),
            kept.manifest if kept else None,
            fp16_speed.get(tried.candidate.name),
            selection,
            kept.profile if kept else ProfileOutcome(),
        )
    chosen = evaluated[outcome.chosen.candidate.name]
    details = dict(chosen.built.details)
    if chosen.manifest:
        details["calibration_manifest"] = str(chosen.manifest)
    details["selected_as"] = outcome.chosen.candidate.name
    built = dataclasses.replace(chosen.built, variant=variant, details=details)
    report = validate_task(built, dataset, facts, params)  # the report set, seen only now
    result = variant_result(variant.name, built, report, fp32)
    artifacts = _write_report(
        variant.name,
        outcome,
        reports[-1],
        chosen.float_nodes,
        head,
        ctx.report_dir / f"search-{variant.name}",
        selection,
    )
    tracker.set_tags(
        tracker.parent_run_id,
        {
            f"{variant.name}.search.summary": outcome.summary,
            f"{variant.name}.search.chosen": outcome.chosen.candidate.name,
            f"{variant.name}.search.reference": outcome.reference.name,
            f"{variant.name}.search.float_convs": ",".join(chosen.float_nodes),
            f"{variant.name}.search.selected_on": selection.describe(),
        },
    )
    tracker.log_metrics(
        tracker.parent_run_id,
        {
            f"{variant.name}.search.candidates": len(outcome.evaluated),
            f"{variant.name}.search.float_convs": len(chosen.float_nodes),
            f"{variant.name}.search.selection_score": outcome.chosen.result.map50_95 if outcome.chosen.result else 0.0,
        },
    )
    return SearchedVariant(result, built, chosen.float_nodes, outcome, per_class_table(report.map), artifacts)


def selection_result(
    name: str, built: BuiltModel, score: float, reference_score: float, timing: Timing
) -> VariantResult:
    """A candidate's result in the search: its selection score in place of mAP (never a report number)."""
    return VariantResult(
        name=name,
        precision=built.variant.precision,
        backend=built.variant.backend,
        map50_95=score,
        map50=0.0,
        latency_ms_b1=timing.latency_ms_b1,
        throughput_ips=timing.throughput_ips,
        throughput_batch=timing.throughput_batch,
        size_mb=built.size_mb,
        model_path=built.path,
        delta_map50_95=score - reference_score,
    )


def too_slow(result: VariantResult, speedup: float, minimum: float, profile: dict[str, float]) -> str:
    """Why a candidate fails the speed gate, with its per-layer profile when there is one."""
    why = f"; why, per layer: {profile_line(profile)}" if profile else ""
    return (
        f"{result.name}: {speedup:.2f}x the FP16 throughput at batch {result.throughput_batch} "
        f"(gate wants at least {minimum:.2f}x{why})"
    )


def _log_candidate(
    tracker: RunTracker,
    tried: CandidateResult,
    float_nodes: list[str],
    manifest: Path | None,
    fp16_ips: float | None,
    selection: SelectionSet,
    profile: ProfileOutcome,
) -> None:
    candidate, result = tried.candidate, tried.result
    params = {
        "search.stage": candidate.stage,
        "calibration.algorithm": candidate.algorithm,
        "calibration.num_images": str(candidate.num_images),
        "float_convs": ",".join(float_nodes),
        "float_convs.count": str(len(float_nodes)),
        "float_convs.why": candidate.why,
        "selection.metric": selection.config.metric,
        "selection.images": f"{selection.config.images} ({len(selection.truths)} images)",
    }
    if result is not None:
        params["model"] = str(result.model_path)
    run_id = tracker.start_child(candidate.name, params, CANDIDATE_KIND, datasets=("selection",))
    tags = {"gate": "passed" if tried.passed else "failed", "gate.reasons": "; ".join(tried.reasons)}
    if result is None:
        tags["error"] = "; ".join(tried.reasons)
    tracker.set_tags(run_id, tags)
    if result is not None:
        metrics = {
            "selection.score": result.map50_95,
            "selection.delta_vs_fp32": result.delta_map50_95,
            "float_convs": len(float_nodes),
        }
        if result.throughput_ips > 0:
            metrics |= {"throughput_ips": result.throughput_ips, "latency_ms_b1": result.latency_ms_b1}
            if fp16_ips:
                metrics["speedup_vs_fp16"] = result.throughput_ips / fp16_ips
        tracker.log_metrics(run_id, metrics | profile.metrics)
    if manifest:
        tracker.log_artifacts(run_id, [manifest])
    if profile.files:
        tracker.log_artifacts(run_id, profile.files, "profile")
    tracker.finish(run_id)


def _write_report(
    name: str,
    outcome: SearchOutcome,
    sensitivity: SensitivityReport,
    float_nodes: list[str],
    head: HeadAnalysis,
    folder: Path,
    selection: SelectionSet,
) -> list[Path]:
    """The candidates table, the sensitivity table and plot, and the convs kept in float with their reasons."""
    ranks = {layer.node: (index + 1, layer) for index, layer in enumerate(sensitivity.layers)}
    lines = ["| conv kept in float | why | sensitivity rank | gain (share of all-INT8 error) |", "|---|---|---:|---:|"]
    for node in float_nodes:
        rank, layer = ranks.get(node, (0, None))
        if outcome.chosen.candidate.stage == "calibration":
            why = "default: " + (
                "the stem (reads the image)"
                if node in head.stem_convs
                else "a head prediction conv (raw boxes, scores)"
            )
        else:
            why = f"sensitivity rank {rank}: keeping it float removes {layer.gain * 100:.1f} % of the all-INT8 error"
        lines.append(f"| {node} | {why} | {rank or ''} | {f'{layer.gain * 100:+.1f} %' if layer else ''} |")
    lines.append("\nAlso in float: the head's box-decoding tail (pixels and probabilities in one tensor).")
    report = (
        f"# INT8 search for {name}\n\n{outcome.summary}\n\nCandidates were judged on the selection set, "
        f"{selection.describe()}: scores are {selection.config.metric}, not report numbers (the validation set's "
        "mAP of the chosen candidate is in the run's results table). The reference, the best score with no more "
        f"convs in float than the default: {outcome.reference.name}; a candidate passes at most "
        f"{selection.config.tolerance * 100:.2f} points below it.\n\n## Candidates (in the order tried)\n\n"
        f"{candidates_table(outcome)}\n\n## Convs kept in float\n\n" + "\n".join(lines) + "\n\n"
        f"## Sensitivity ({sensitivity.algorithm} ranges, {sensitivity.num_images} calibration images)\n\n"
        f"{sensitivity_table(sensitivity.layers, float_nodes)}\n"
    )
    return [
        atomic_write_text(folder / "search.md", report),
        atomic_write_json(
            folder / "search.json",
            {
                "summary": outcome.summary,
                "passed": outcome.passed,
                "chosen": outcome.chosen.candidate.name,
                "calibration": outcome.calibration.name,
                "reference": outcome.reference.name,
                "float_convs": float_nodes,
                "selection": {
                    "images": str(selection.config.images),
                    "num_images": len(selection.truths),
                    "metric": selection.config.metric,
                    "images_sha256": selection.images_sha256,
                },
                "candidates": [
                    {
                        "name": r.candidate.name,
                        "stage": r.candidate.stage,
                        "algorithm": r.candidate.algorithm,
                        "num_images": r.candidate.num_images,
                        "float_convs": r.candidate.num_float,
                        "selection_score": r.result.map50_95 if r.result else None,
                        "selection_delta_vs_fp32": r.result.delta_map50_95 if r.result else None,
                        "throughput_ips": r.result.throughput_ips if r.result else None,
                        "passed": r.passed,
                        "reasons": r.reasons,
                    }
                    for r in outcome.evaluated
                ],
            },
        ),
        sensitivity_plot(sensitivity.layers, folder / "sensitivity.png", f"{name}: per-conv sensitivity", float_nodes),
        sensitivity.path,
    ]
