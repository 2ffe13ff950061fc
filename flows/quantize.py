"""The quantize DAG, logged to MLflow, judged by the gate, ending in a ship decision:

    params.yaml -> export -> simplify -> calibrate (statistics) -> build + validate (the variants not searched)
        -> INT8 search per quantized variant (candidates judged on the selection set, the chosen one validated on
           the report set) -> speed (every variant timed interleaved) -> gate -> ship decision
        -> MLflow parent run + one child run per variant (TensorRT variants: + per-layer profile of the engine)

Preparation is flows/prepare.py, the stages after it flows/stages.py (shared with build targets, which run them on
each target's worker: flows/targets.py). The flow does all MLflow logging from its own thread (explicit run ids);
tasks only compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.context import RunContext, new_run_folder
from flows.outcome import FlowOutcome
from flows.prepare import prepare_models
from flows.stages import run_variants
from flows.targets import run_targets
from flows.tracking import RunTracker
from tasks.export import export_task
from yoloq.artifacts import (
    file_sha256,
    remove_stale_temps,
)
from yoloq.backends import resolve_variants
from yoloq.config import Params, load_params
from yoloq.errors import GateFailed
from yoloq.preflight import check_data, check_inputs
from yoloq.validate import validation_set_sha256


@flow(name="yoloq-quantize")
def quantize_flow(
    params_path: str = "params.yaml", overrides: list[str] | None = None, source: str = "yoloq run"
) -> dict[str, Any]:
    """Quantize the model in params.yaml and validate every variant; raises GateFailed when accuracy is lost.

    `source` names what started the run in MLflow (its Source column): `yoloq run`, or the Prefect deployment."""
    loaded = load_params(Path(params_path), overrides or [])
    # exit 2 early if a backend is missing here; with build targets, each target's worker resolves `auto` itself
    params = loaded if loaded.targets else resolve_variants(loaded)
    check_inputs(params)
    outcome = run_pipeline(params, Path(params_path).resolve().parent, source)
    document = outcome.document()
    if not outcome.gate.passed:
        raise GateFailed("accuracy gate failed: " + "; ".join(outcome.gate.reasons), document)
    return document


def run_pipeline(params: Params, project_dir: Path, source: str = "yoloq run") -> FlowOutcome:
    """Export and check the data, then (only then) open the MLflow run and run the stages into it: a mistake in the
    model or the data fails with exit 2 and leaves no MLflow run behind."""
    logger = get_run_logger()
    cache_dir = params.output_dir / "cache"
    stale = remove_stale_temps(cache_dir)
    if stale:
        logger.warning("removed %d half-written files left by an interrupted run", stale)
    exported = export_task(params.model, params.export, cache_dir / "export")  # content-keyed: reused on a re-run
    check_data(params, len(exported.facts.names))
    data_hashes = {  # quantize_flow's check_inputs has made sure both exist
        "model_sha256": file_sha256(params.model.path),
        "validation_set_sha256": validation_set_sha256(params.validation),  # images scored + their labels
    }
    report_dir = new_run_folder(params.output_dir, params.model.path.stem)
    run_name = report_dir.name
    tracker = RunTracker.start(params, project_dir, run_name, data_hashes, source)
    logger.info("MLflow run %s at %s", tracker.parent_run_id, tracker.tracking_uri)
    ctx = RunContext(params, tracker, cache_dir, report_dir, exported)
    try:
        if params.targets:  # build, search and validate on each target's Prefect work pool (flows/targets.py)
            outcome = run_targets(ctx)
        else:
            outcome = run_variants(ctx, prepare_models(ctx)).outcome
    except BaseException as exc:
        tracker.fail_all(exc)
        raise
    return outcome
