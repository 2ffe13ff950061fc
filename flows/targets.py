"""Per-target builds: build, search and validate on each target's Prefect work pool, with no storage shared.

TensorRT engines and their speed are specific to a GPU model, so params.yaml can name build targets:

    targets:
      - {name: h100, work_pool: gpu-h100, backend: tensorrt}    # workers of pool gpu-h100 run on H100 machines
      - {name: l4, work_pool: gpu-l4}                            # backend: the variants' own (auto: resolved there)

The parent flow exports, simplifies and calibrates once (the Q/DQ model and the calibration statistics are
GPU-independent) and logs what the targets need to its MLflow run (`target-inputs/`, flows/target_inputs.py). For
each target it opens an MLflow child run `<target>` and starts a run of deployment
`yoloq-build-validate/build-validate-<pool>` (created or updated here), then waits for all of them at once.

Each worker downloads the inputs by the parent's run id through the MLflow server, and runs the same stages as a
local run (flows/stages.py) in a folder of its own: every variant built there, the INT8 search with its candidates
built and timed on that GPU (statistics from upstream), validation, speed, gate, ship decision, registry. It logs
its variant and candidate runs (`<target>/<variant>`, engines, profiles) and its results.json as children of the
target's run, and finishes that run. The parent reads each target's results.json from MLflow and logs the summary.

What a worker needs: yoloq installed (the deployment's entrypoint is the module `flows.targets`), PREFECT_API_URL,
and MLFLOW_TRACKING_URI (else the parent's tracking URI, passed with the run). Its folder is $YOLOQ_TARGET_DIR
(default ~/.cache/yoloq/targets): downloads in inputs/<parent run id>/, content-keyed outputs in cache/.
A target run that crashes (worker lost) is retried once; one that fails (an error in yoloq) is not; one that runs
past `timeout_s` is cancelled. A failed target ends the run with exit 2; a target's failed gate with exit 3.
"""

import asyncio
import os
from dataclasses import dataclass, replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.deployments import arun_deployment
from prefect.deployments.runner import EntrypointType
from prefect.states import Cancelled, Cancelling

from flows.context import RunContext, new_run_folder
from flows.outcome import FlowOutcome
from flows.prepare import prepare_models
from flows.results import log_run_summary
from flows.search import local_calibration, search_sizes
from flows.stages import TargetLabel, run_variants
from flows.target_inputs import (
    TARGET_INPUTS,
    download_target_inputs,
    prepared_from_inputs,
    shipped_calibration,
    stage_target_inputs,
    target_params,
    with_target_backend,
)
from flows.tracking import RunTracker
from yoloq.artifacts import read_json
from yoloq.backends import resolve_variants
from yoloq.calibrate import CalibrationStats
from yoloq.config import Params, TargetConfig
from yoloq.errors import ConfigError, YoloqError
from yoloq.report import GateVerdict, VariantResult

FLOW_NAME = "yoloq-build-validate"
TARGET_KIND = "target"  # the yoloq.kind tag of a target's MLflow run
TARGET_FILE = "target.json"  # in a target's run: its variant runs and where it ran
TARGET_DIR_ENV = "YOLOQ_TARGET_DIR"


class TargetFailed(YoloqError):
    """A target's build+validate run did not complete (exit 2: the message says which target and why)."""


def target_work_dir() -> Path:
    """The worker's own folder: $YOLOQ_TARGET_DIR, else ~/.cache/yoloq/targets."""
    configured = os.environ.get(TARGET_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "yoloq" / "targets"


# -- the worker side -------------------------------------------------------------------------------------------


@flow(name=FLOW_NAME, log_prints=True)
def build_validate_flow(
    params: dict[str, Any], target: dict[str, Any], parent_run_id: str, target_run_id: str, tracking_uri: str
) -> dict[str, Any]:
    """Download the parent run's inputs, then build, search, validate and time every variant on this machine,
    logging to the target's MLflow run `target_run_id`; returns the target's results document."""
    logger = get_run_logger()
    config = TargetConfig.model_validate(target)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri  # the worker's own route to the server wins
    client = MlflowClient(uri)
    tracker = RunTracker(client, uri, client.get_run(target_run_id).info.experiment_id, target_run_id, [target_run_id])
    try:
        parent_params = Params.model_validate(params)
        resolve_variants(with_target_backend(parent_params, config))  # exit 2 here, before any download
        work = target_work_dir().resolve()
        inputs = download_target_inputs(client, parent_run_id, work / "inputs" / parent_run_id)
        resolved = resolve_variants(target_params(parent_params, config, inputs, work))  # `auto`: what is here
        logger.info("target %s: inputs of run %s in %s; outputs in %s", config.name, parent_run_id, inputs.folder, work)
        prepared = prepared_from_inputs(resolved, inputs)
        ctx = RunContext(resolved, tracker, work / "cache", new_run_folder(work / "runs", config.name))
        flow_run_id = str(get_run_context().flow_run.id)
        label = TargetLabel(
            config.name, {"target": config.name, "work_pool": config.work_pool, "prefect.flow_run_id": flow_run_id}
        )
        tracker.set_tags(target_run_id, {"prefect.flow_run_id": flow_run_id, "target.work_dir": str(work)})
        done = run_variants(ctx, prepared, shipped_calibration(resolved, inputs), label)
    except BaseException as exc:
        tracker.fail_all(exc)
        raise
    summary = {"target": config.name, "flow_run_id": flow_run_id, "variant_runs": done.variant_runs}
    client.log_dict(target_run_id, summary, TARGET_FILE)
    return done.outcome.document()


# -- the parent side -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRun:
    target: TargetConfig
    mlflow_run_id: str  # the target's run (child of the parent run)
    flow_run_id: str = ""
    document: dict[str, Any] | None = None  # the target's results.json


def deployment_name(target: TargetConfig) -> str:
    return f"build-validate-{target.work_pool}"


def ensure_deployments(targets: list[TargetConfig]) -> None:
    """One deployment of the build+validate flow per work pool (created, or updated to this code's version)."""
    for pool in sorted({t.work_pool for t in targets}):
        build_validate_flow.deploy(
            name=f"build-validate-{pool}",
            work_pool_name=pool,
            entrypoint_type=EntrypointType.MODULE_PATH,
            print_next_steps=False,
            tags=["yoloq"],
        )


def _read_results(client: MlflowClient, run: TargetRun) -> dict[str, Any]:
    """The results.json the worker logged to the target's run."""
    with TemporaryDirectory() as tmp:
        try:
            return read_json(Path(client.download_artifacts(run.mlflow_run_id, "results.json", tmp)))
        except Exception as exc:
            raise TargetFailed(
                f"target {run.target.name}: its run completed but MLflow run {run.mlflow_run_id} holds no "
                f"results.json ({exc})"
            ) from exc


async def _run_target(job: TargetRun, parameters: dict[str, Any], client: MlflowClient, attempts: int = 2) -> TargetRun:
    target = job.target
    name = f"{FLOW_NAME}/{deployment_name(target)}"
    for attempt in range(1, attempts + 1):
        flow_run = await arun_deployment(
            name=name,
            parameters=parameters,
            timeout=target.timeout_s,
            poll_interval=2,
            flow_run_name=f"{target.name}-attempt{attempt}",
            tags=["yoloq", f"target:{target.name}"],
        )
        state = flow_run.state
        if state is not None and state.is_completed():
            done = replace(job, flow_run_id=str(flow_run.id))
            return replace(done, document=await asyncio.to_thread(_read_results, client, done))
        if state is None or not state.is_final():  # past the deadline: stop it for real
            await _cancel(flow_run.id, f"past the target's deadline of {target.timeout_s:g} s")
            raise TargetFailed(
                f"target {target.name}: run {flow_run.id} did not finish within {target.timeout_s:g} s (state "
                f"{state.name if state else 'unknown'}) and was cancelled; is a worker of pool {target.work_pool!r} "
                f"running (prefect worker start --pool {target.work_pool})? raise targets[].timeout_s if the build "
                "needs longer"
            )
        if not state.is_crashed() or attempt == attempts:
            raise TargetFailed(
                f"target {target.name}: run {flow_run.id} on pool {target.work_pool!r} ended {state.name}: "
                f"{state.message or 'see its Prefect logs'}"
            )
    raise AssertionError("unreachable")


async def _cancel(flow_run_id: Any, reason: str) -> None:
    """A run that never started is cancelled at once; a running one is set Cancelling (its worker kills it)."""
    async with get_client() as client:
        current = await client.read_flow_run(flow_run_id)
        started = current.state is not None and (current.state.is_running() or current.state.is_paused())
        state = Cancelling(message=reason) if started else Cancelled(message=reason)
        await client.set_flow_run_state(flow_run_id, state, force=True)


async def _run_all(jobs: list[tuple[TargetRun, dict[str, Any]]], client: MlflowClient) -> list[TargetRun]:
    """Every target's run, waited for together; all failures are reported, not only the first."""
    outcomes = await asyncio.gather(*(_run_target(j, p, client) for j, p in jobs), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise TargetFailed("; ".join(str(f) for f in failures))
    return [o for o in outcomes if isinstance(o, TargetRun)]


def upstream_statistics(ctx: RunContext, prepared: Any) -> tuple[list[CalibrationStats], int]:
    """The calibration statistics of every size the targets' searches use, computed here once."""
    params = ctx.params
    if not params.needs_selection:
        return [], 0
    source = local_calibration(ctx, prepared)
    sizes = sorted(
        {n for v in params.variants if v.quantized for n in search_sizes(params, v, source.available_images)}
    )
    return [source.statistics(n) for n in sizes], source.available_images


def run_targets(ctx: RunContext) -> FlowOutcome:
    """Prepare the models here, ship them through MLflow, build+search+validate on every target's pool, then log
    the targets' results side by side on the parent run."""
    logger = get_run_logger()
    params, tracker, report_dir = ctx.params, ctx.tracker, ctx.report_dir
    if not tracker.tracking_uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"build targets log to MLflow from other machines: the tracking URI {tracker.tracking_uri} is local. "
            "Start `mlflow server --serve-artifacts ...` and set MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to it"
        )
    prepared = prepare_models(ctx)  # here, once for all targets
    statistics, available = upstream_statistics(ctx, prepared)
    inputs = stage_target_inputs(params, prepared, statistics, available, report_dir / TARGET_INPUTS)
    tracker.log_artifacts(tracker.parent_run_id, [inputs], TARGET_INPUTS)
    logger.info("targets: inputs logged to MLflow run %s (%s/)", tracker.parent_run_id, TARGET_INPUTS)
    ensure_deployments(params.targets)
    portable = params.model_dump(mode="json")
    jobs = []
    for target in params.targets:
        run_params = {"target": target.name, "work_pool": target.work_pool, "backend": str(target.backend or "")}
        run_id = tracker.start_child(target.name, run_params, TARGET_KIND)
        parameters = {
            "params": portable,
            "target": target.model_dump(mode="json"),
            "parent_run_id": tracker.parent_run_id,
            "target_run_id": run_id,
            "tracking_uri": tracker.tracking_uri,
        }
        jobs.append((TargetRun(target, run_id), parameters))
        logger.info("target %s: starting a run on work pool %s (MLflow run %s)", target.name, target.work_pool, run_id)
    try:
        runs = asyncio.run(_run_all(jobs, tracker.client))
    finally:  # the workers finished (or failed) their targets' runs; those still open are failed with the run
        for job, _ in jobs:
            if tracker.client.get_run(job.mlflow_run_id).info.status != "RUNNING":
                tracker.open_runs.remove(job.mlflow_run_id)

    all_results: list[VariantResult] = []
    reasons: list[str] = []
    ship_tags: dict[str, str] = {"targets": ",".join(t.name for t in params.targets)}
    for run in runs:
        document = run.document or {}
        all_results += [
            _prefixed(VariantResult.from_json(row), run.target.name) for row in document.get("variants", [])
        ]
        reasons += [f"{run.target.name}/{reason}" for reason in document.get("gate_reasons", [])]
        ship = document.get("ship") or {}
        ship_tags |= {
            f"ship.{run.target.name}.variant": ship.get("variant") or "none",
            f"ship.{run.target.name}.reason": ship.get("reason", ""),
        }
    gate = GateVerdict(passed=not reasons, reasons=reasons)
    outcome = FlowOutcome(all_results, gate, tracker.parent_run_id, tracker.tracking_uri, report_dir)
    note = f"validation: {params.validation.images} ({len(prepared.dataset.truths)} images); targets: " + ", ".join(
        f"{r.target.name} (pool {r.target.work_pool}, flow run {r.flow_run_id}, MLflow run {r.mlflow_run_id})"
        for r in runs
    )
    table = log_run_summary(params, tracker, outcome, note, ship_tags)
    logger.info("targets:\n%s", table)
    tracker.finish(tracker.parent_run_id)
    return outcome


def _prefixed(result: VariantResult, target: str) -> VariantResult:
    return replace(result, name=f"{target}/{result.name}")
