"""Per-target builds: the build+validate sub-DAG runs as a deployment run on each target's Prefect work pool.

TensorRT engines are specific to a GPU model, so params.yaml can name build targets:

    targets:
      - {name: h100, work_pool: gpu-h100}     # workers of pool gpu-h100 run on H100 machines
      - {name: l4, work_pool: gpu-l4}

The parent flow exports, simplifies and calibrates once (the Q/DQ model is GPU-independent), then for each target
starts a run of deployment `yoloq-build-validate/build-validate-<pool>` (created or updated here) and waits for
all of them at once. Each worker resolves `backend: auto` on its own machine, builds and validates every variant
there, and writes its results as JSON next to the run's reports. The parent logs one MLflow child run per
target x variant (`<target>/<variant>`), applies the gate and the registry per target, and fails with every
MLflow run marked FAILED when a target fails.

What a worker needs: yoloq installed (the deployment's entrypoint is the module `flows.targets`), and the same
paths as the parent: the ONNX/Q/DQ models, the validation images and output_dir must be on storage both machines
mount at the same path (NFS, a shared volume). Models are not copied through the MLflow artifact store.
A target run that crashes (worker lost) is retried once; one that fails (an error in yoloq) is not; one that runs
past `timeout_s` is cancelled.
"""

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import arun_deployment
from prefect.deployments.runner import EntrypointType
from prefect.states import Cancelled, Cancelling

from flows.context import RunContext
from flows.outcome import FlowOutcome
from flows.prepare import prepare_models
from flows.registry import register_champion, register_variants
from flows.results import engine_companions, log_run_summary, log_variant_run
from flows.tracking import RunTracker
from tasks.build import build_task
from tasks.speed import speed_task
from tasks.validate import validate_task
from yoloq.artifacts import atomic_write_json, read_json
from yoloq.backends import resolve_variants
from yoloq.config import Params, TargetConfig
from yoloq.errors import YoloqError
from yoloq.export import facts_for_onnx
from yoloq.metrics import per_class_table
from yoloq.report import GateVerdict, ShipDecision, VariantResult, check_gate, ship_decision, with_deltas
from yoloq.validate import load_validation_set

FLOW_NAME = "yoloq-build-validate"


class TargetFailed(YoloqError):
    """A target's build+validate run did not complete."""

    exit_code = 1


# -- the worker side -------------------------------------------------------------------------------------------


@flow(name=FLOW_NAME, log_prints=True)
def build_validate_flow(
    params: dict[str, Any], target: str, fp32_onnx: str, qdq_onnx: str | None, result_path: str
) -> list[dict[str, Any]]:
    """Build and validate every variant on this machine; results also written to `result_path` (JSON)."""
    logger = get_run_logger()
    resolved = resolve_variants(Params.model_validate(params))  # `auto` means what this worker's machine has
    fp32 = Path(fp32_onnx)
    qdq = Path(qdq_onnx) if qdq_onnx else None
    facts = facts_for_onnx(fp32, resolved.model.imgsz)
    dataset = load_validation_set(resolved.validation, len(facts.names))
    logger.info("target %s: %d variants, %d validation images", target, len(resolved.variants), len(dataset.truths))
    rows = []
    builds = {}
    for variant in resolved.variants:
        built = build_task(variant, resolved, fp32, qdq, resolved.output_dir / "cache" / "build" / target)
        builds[variant.name] = built
        score = validate_task(built, dataset, facts, resolved)
        rows.append(
            {
                "name": variant.name,
                "precision": variant.precision,
                "backend": variant.backend,
                "map50_95": score.map.map50_95,
                "map50": score.map.map50,
                "size_mb": built.size_mb,
                "model_path": str(built.path),
                "build_seconds": built.build_seconds,
                "per_class_ap": per_class_table(score.map),
            }
        )
    timings = speed_task(builds, dataset, facts, resolved)  # every variant timed interleaved, on this machine
    for row in rows:
        timing = timings[row["name"]]
        row |= {
            "latency_ms_b1": timing.latency_ms_b1,
            "throughput_ips": timing.throughput_ips,
            "throughput_batch": timing.throughput_batch,
        }
    atomic_write_json(Path(result_path), {"target": target, "variants": rows})
    return rows


# -- the parent side -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRun:
    target: TargetConfig
    flow_run_id: str
    rows: list[dict[str, Any]]


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


async def _run_target(
    target: TargetConfig, parameters: dict[str, Any], result_path: Path, attempts: int = 2
) -> TargetRun:
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
            if not result_path.is_file():
                raise TargetFailed(
                    f"target {target.name}: run {flow_run.id} completed but {result_path} is missing: the worker "
                    "and this flow must share output_dir (same path on both machines)"
                )
            return TargetRun(target, str(flow_run.id), read_json(result_path)["variants"])
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


async def _run_all(jobs: list[tuple[TargetConfig, dict[str, Any], Path]]) -> list[TargetRun]:
    """Every target's run, waited for together; all failures are reported, not only the first."""
    outcomes = await asyncio.gather(*(_run_target(t, p, r) for t, p, r in jobs), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise TargetFailed("; ".join(str(f) for f in failures))
    return [o for o in outcomes if isinstance(o, TargetRun)]


def run_targets(ctx: RunContext) -> FlowOutcome:
    """Prepare the models here, build+validate on every target's pool, log and judge the results."""
    logger = get_run_logger()
    params, tracker, report_dir = ctx.params, ctx.tracker, ctx.report_dir
    prepared = prepare_models(ctx)  # here, once for all targets
    fp32_onnx, num_images = prepared.fp32_onnx, len(prepared.dataset.truths)
    qdq_onnx = prepared.calibration.qdq_path if prepared.calibration else None
    if prepared.calibration:
        tracker.log_artifacts(tracker.parent_run_id, [prepared.calibration.manifest_path])
    ensure_deployments(params.targets)
    portable = params.model_dump(mode="json")  # paths are absolute: the workers must see the same paths
    jobs = []
    for target in params.targets:
        result_path = report_dir / "targets" / f"{target.name}.json"
        parameters = {
            "params": portable,
            "target": target.name,
            "fp32_onnx": str(fp32_onnx),
            "qdq_onnx": str(qdq_onnx) if qdq_onnx else None,
            "result_path": str(result_path),
        }
        jobs.append((target, parameters, result_path))
        logger.info("target %s: starting a run on work pool %s", target.name, target.work_pool)
    runs = asyncio.run(_run_all(jobs))

    all_results: list[VariantResult] = []
    reasons: list[str] = []
    ship_tags: dict[str, str] = {"targets": ",".join(t.name for t in params.targets)}
    for run in runs:
        results, gate, ship = _log_target(params, tracker, run, report_dir)
        all_results += [_prefixed(r, run.target.name) for r in results]
        reasons += [f"{run.target.name}/{reason}" for reason in gate.reasons]
        ship_tags |= {
            f"ship.{run.target.name}.variant": ship.variant or "none",
            f"ship.{run.target.name}.reason": ship.reason,
        }
    gate = GateVerdict(passed=not reasons, reasons=reasons)
    outcome = FlowOutcome(all_results, gate, tracker.parent_run_id, tracker.tracking_uri, report_dir)
    note = f"validation: {params.validation.images} ({num_images} images); targets: " + ", ".join(
        f"{r.target.name} (pool {r.target.work_pool}, flow run {r.flow_run_id})" for r in runs
    )
    table = log_run_summary(params, tracker, outcome, note, ship_tags)
    logger.info("targets:\n%s", table)
    tracker.finish(tracker.parent_run_id)
    return outcome


def _log_target(
    params: Params, tracker: RunTracker, run: TargetRun, report_dir: Path
) -> tuple[list[VariantResult], GateVerdict, ShipDecision]:
    raw = [VariantResult.from_json(row) for row in run.rows]
    reference = params.reference_variant.name
    results = with_deltas(raw, reference)
    gate = check_gate(results, params.gate, reference)
    children: dict[str, str] = {}
    for result, row in zip(results, run.rows, strict=True):
        run_params = {
            "variant": result.name,
            "precision": result.precision,
            "backend": result.backend,
            "target": run.target.name,
            "work_pool": run.target.work_pool,
            "prefect.flow_run_id": run.flow_run_id,
            "model": str(result.model_path),
        }
        folder = report_dir / run.target.name / result.name
        name = f"{run.target.name}/{result.name}"
        child = log_variant_run(
            tracker,
            name,
            run_params,
            result,
            row["per_class_ap"],
            folder,
            engine_companions(result.model_path),
            {"build_seconds": row["build_seconds"]},
        )
        children[result.name] = child
        tracker.finish(child)
    register_variants(tracker.client, params, results, gate, children, target=run.target.name)
    ship = ship_decision(results, params.gate, reference)  # per target: each GPU type ships its own fastest
    register_champion(tracker.client, params, ship, results, children, target=run.target.name)
    return results, gate, ship


def _prefixed(result: VariantResult, target: str) -> VariantResult:
    return replace(result, name=f"{target}/{result.name}")
