"""The INT8 search stage of the quantize flow, for one explicit Q/DQ variant (see yoloq.search).

Each candidate is a real variant: a Q/DQ model written from cached calibration statistics, built by the variant's
backend and scored on the validation set. Every candidate becomes an MLflow child run (tag `yoloq.kind=candidate`)
so the MLflow UI shows them side by side; the parent run gets the candidates table, the sensitivity ranking and
plot, and the list of convs kept in float with the reason for each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger

from flows.tracking import RunTracker
from tasks.build import build_task
from tasks.calibrate import qdq_task, sensitivity_task, statistics_task
from tasks.validate import timing_task, validate_task
from yoloq.artifacts import atomic_write_json, atomic_write_text
from yoloq.backends import BuiltModel
from yoloq.calibrate import CalibrationStats
from yoloq.config import Params, VariantConfig
from yoloq.errors import EngineBuildError
from yoloq.export import ModelFacts
from yoloq.metrics import per_class_table
from yoloq.preprocess import list_images
from yoloq.quant.graph import HeadAnalysis, analyze_head, default_float_convs, prepare_model
from yoloq.report import VariantResult, gate_reasons, variant_result
from yoloq.search import Candidate, CandidateFailed, SearchOutcome, candidates_table, effective_sizes, run_search
from yoloq.sensitivity import LayerSensitivity, SensitivityReport, sensitivity_plot, sensitivity_table
from yoloq.validate import ValidationSet


@dataclass(frozen=True)
class SearchedVariant:
    result: VariantResult  # the chosen candidate, named after the variant, timed
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
    per_class: str


def search_variant(
    variant: VariantConfig,
    params: Params,
    fp32_onnx: Path,
    input_name: str,
    facts: ModelFacts,
    dataset: ValidationSet,
    fp32: VariantResult,
    fp16: VariantResult | None,
    tracker: RunTracker,
    cache_dir: Path,
    report_dir: Path,
) -> SearchedVariant:
    """Run the search for `variant` against the FP32 (and FP16) results; log every candidate to MLflow.

    Q/DQ variants: candidates differ in calibration algorithm, calibration size and the convs left out of Q/DQ.
    Implicit variants (TensorRT 8.6-10.x): the variant's TensorRT calibrator on calibration.num_images images,
    then the same sensitivity ranking held out of INT8 by layer precision constraints (float_layers)."""
    logger = get_run_logger()
    validation_images = [t.path for t in dataset.truths]
    calibration_dir = cache_dir / "calibration"
    percentile = params.calibration.percentile
    timed = fp16 is not None and params.gate.min_speedup_vs_fp16 > 0  # speed decides too: time every candidate
    implicit = variant.quantization == "implicit"
    statistics: dict[int, CalibrationStats] = {}
    evaluated: dict[str, _Evaluated] = {}
    reports: list[SensitivityReport] = []

    def stats(num_images: int) -> CalibrationStats:
        if num_images not in statistics:
            statistics[num_images] = statistics_task(
                fp32_onnx, input_name, facts.imgsz, params.calibration, validation_images, calibration_dir, num_images
            )
        return statistics[num_images]

    def build(candidate: Candidate) -> tuple[BuiltModel, list[str], Path | None]:
        floats = list(candidate.float_nodes)
        if implicit:
            update = {"name": candidate.name, "float_layers": floats}
            built = build_task(variant.model_copy(update=update), params, fp32_onnx, None, cache_dir / "build")
            return built, floats, None
        qdq = qdq_task(
            fp32_onnx,
            stats(candidate.num_images),
            candidate.algorithm,
            percentile,
            floats,
            calibration_dir,
            facts.imgsz,
        )
        update = {"name": candidate.name}
        built = build_task(variant.model_copy(update=update), params, fp32_onnx, qdq.path, cache_dir / "build")
        return built, qdq.float_nodes, qdq.manifest_path

    def evaluate(candidate: Candidate) -> VariantResult:
        try:
            built, float_nodes, manifest = build(candidate)
        except EngineBuildError as exc:  # e.g. a TensorRT internal error on one mixed-precision layout
            run_id = tracker.start_child(candidate.name, {"search.stage": candidate.stage})
            tracker.set_tags(run_id, {"yoloq.kind": "candidate", "gate": "failed", "error": str(exc)})
            tracker.finish(run_id)
            raise CandidateFailed(str(exc)) from exc
        score = validate_task(built, dataset, facts, params, measure_speed=timed)
        result = variant_result(candidate.name, built, score, fp32)
        evaluated[candidate.name] = _Evaluated(built, float_nodes, manifest, per_class_table(score.map))
        reasons = gate_reasons(result, fp32, fp16, params.gate)
        _log_candidate(tracker, candidate, result, float_nodes, manifest, fp16, reasons)
        return result

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
            calibration_dir,
        )
        reports.append(report)
        return report.layers

    available = len(list_images(params.calibration.images))
    if implicit:
        algorithms: list[str] = [variant.trt_calibrator]
        sizes = effective_sizes([params.calibration.num_images], available)
    else:
        algorithms = list(params.search.algorithms)
        sizes = effective_sizes(params.search.calibration_sizes, available)
        if sizes != list(dict.fromkeys(params.search.calibration_sizes)):
            logger.warning(
                "search.calibration_sizes %s capped at the %d images of %s: %s",
                params.search.calibration_sizes,
                available,
                params.calibration.images,
                sizes,
            )
    head = analyze_head(prepare_model(fp32_onnx))
    stem = head.stem_convs  # reads 3 channels; INT8 there made the TensorRT 8.6 engine 27 % slower (measured)
    outcome = run_search(
        variant.name,
        algorithms,
        sizes,
        params.search.float_steps,
        evaluate,
        lambda result: gate_reasons(result, fp32, fp16, params.gate),
        rank,
        logger.info,
        keep_float=stem,
        default_float=[] if implicit else default_float_convs(head),
    )
    chosen = evaluated[outcome.chosen.candidate.name]
    details = dict(chosen.built.details)
    if chosen.manifest:
        details["calibration_manifest"] = str(chosen.manifest)
    built = dataclasses.replace(chosen.built, variant=variant, details=details)
    result = dataclasses.replace(outcome.chosen.result, name=variant.name)
    if not timed:
        timing = timing_task(built, dataset, facts, params)
        result = dataclasses.replace(
            result,
            latency_ms_b1=timing.latency_ms_b1,
            throughput_ips=timing.throughput_ips,
            throughput_batch=timing.throughput_batch,
        )
    artifacts = _write_report(
        variant.name, outcome, reports[-1], chosen.float_nodes, head, report_dir / f"search-{variant.name}"
    )
    tracker.set_tags(
        tracker.parent_run_id,
        {
            f"{variant.name}.search.summary": outcome.summary,
            f"{variant.name}.search.chosen": outcome.chosen.candidate.name,
            f"{variant.name}.search.float_convs": ",".join(chosen.float_nodes),
        },
    )
    tracker.log_metrics(
        tracker.parent_run_id,
        {
            f"{variant.name}.search.candidates": len(outcome.evaluated),
            f"{variant.name}.search.float_convs": len(chosen.float_nodes),
        },
    )
    return SearchedVariant(result, built, chosen.float_nodes, outcome, chosen.per_class, artifacts)


def _log_candidate(
    tracker: RunTracker,
    candidate: Candidate,
    result: VariantResult,
    float_nodes: list[str],
    manifest: Path | None,
    fp16: VariantResult | None,
    reasons: list[str],
) -> None:
    run_id = tracker.start_child(
        candidate.name,
        {
            "search.stage": candidate.stage,
            "calibration.algorithm": candidate.algorithm,
            "calibration.num_images": str(candidate.num_images),
            "float_convs": ",".join(float_nodes),
            "float_convs.count": str(len(float_nodes)),
            "float_convs.why": candidate.why,
            "model": str(result.model_path),
        },
    )
    tracker.set_tags(
        run_id,
        {"yoloq.kind": "candidate", "gate": "passed" if not reasons else "failed", "gate.reasons": "; ".join(reasons)},
    )
    metrics = {
        "map50_95": result.map50_95,
        "map50": result.map50,
        "delta_map50_95_vs_fp32": result.delta_map50_95,
        "float_convs": len(float_nodes),
    }
    if result.throughput_ips > 0:
        metrics |= {"throughput_ips": result.throughput_ips, "latency_ms_b1": result.latency_ms_b1}
    if fp16 is not None:
        metrics["delta_map50_95_vs_fp16"] = result.map50_95 - fp16.map50_95
        if result.throughput_ips > 0 and fp16.throughput_ips > 0:
            metrics["speedup_vs_fp16"] = result.throughput_ips / fp16.throughput_ips
    tracker.log_metrics(run_id, metrics)
    if manifest:
        tracker.log_artifacts(run_id, [manifest])
    tracker.finish(run_id)


def _write_report(
    name: str,
    outcome: SearchOutcome,
    sensitivity: SensitivityReport,
    float_nodes: list[str],
    head: HeadAnalysis,
    folder: Path,
) -> list[Path]:
    """The candidates table, the sensitivity table and plot, and the convs kept in float with their reasons."""
    ranks = {layer.node: (index + 1, layer) for index, layer in enumerate(sensitivity.layers)}
    lines = ["| conv kept in float | why | sensitivity rank | gain (share of all-INT8 error) |", "|---|---|---:|---:|"]
    for node in float_nodes:
        rank, layer = ranks.get(node, (0, None))
        if node in head.stem_convs:
            why = "the stem: reads the 3-channel image; INT8 there made the TensorRT 8.6 engine 27 % slower"
        elif outcome.chosen.candidate.stage == "calibration":
            why = "default: a head prediction conv (raw boxes and scores)"
        else:
            why = f"sensitivity rank {rank}: keeping it float removes {layer.gain * 100:.1f} % of the all-INT8 error"
        lines.append(f"| {node} | {why} | {rank or ''} | {f'{layer.gain * 100:+.1f} %' if layer else ''} |")
    lines.append("\nAlso in float: the head's box-decoding tail (pixels and probabilities in one tensor).")
    report = (
        f"# INT8 search for {name}\n\n{outcome.summary}\n\n## Candidates (in the order tried)\n\n"
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
                "float_convs": float_nodes,
                "candidates": [
                    {
                        "name": r.candidate.name,
                        "stage": r.candidate.stage,
                        "algorithm": r.candidate.algorithm,
                        "num_images": r.candidate.num_images,
                        "float_convs": r.candidate.num_float,
                        "map50_95": r.result.map50_95 if r.result else None,
                        "delta_map50_95_vs_fp32": r.result.delta_map50_95 if r.result else None,
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
