"""Deployments of the quantize flow: a cron schedule, a typed flat-parameter form, and the new-checkpoint trigger.

    python -m flows.deploy serve [-p params.yaml] [--cron "0 3 * * *"] [--name nightly]    # serve in this process
    # the schedule: --cron, else params.yaml's schedule.cron (and schedule.timezone)
    python -m flows.deploy deploy --pool POOL [-p params.yaml] [--cron ...]               # for `prefect worker`

The deployed flow, `quantize_deployment`, takes flat parameters; the deployment's parameter schema (flows/form.py)
types them from the pydantic config, so the Prefect UI's custom-run form shows params.yaml's value in each field,
enums as dropdowns, ranges as checked number fields, and each key's description. A field that is unset (None) or
still at the value the form showed keeps params.yaml's value; one that is changed becomes a `--set
section.key=value` override, so editing one field never resets the others (Prefect replaces a deployment parameter
as a whole: nested dicts would be replaced entirely).

A `yoloq.checkpoint.created` event (sent by `yoloq watch`) starts a run with `model_path` from the event and
`skip_if_done`: a run whose model content and parameters already have a finished MLflow run made by the same yoloq
code (version and git commit) and TensorRT version returns that run instead of quantizing again. The trigger
itself starts one run per checkpoint content within schedule.checkpoint_dedupe_hours (for_each resource id, which
names the content); the deployment allows one run at a time, so a later repeat queues up and finds the finished run.

Trust: run parameters come from whoever can post to the Prefect API (the trigger copies an event's payload), while
params.yaml and the serve/deploy options are the operator's. So a run quantizes params.yaml's model.path, or a
checkpoint inside the watched folder (`--watch-root`, required with the trigger; symlinks and `..` resolved), and
uses the params file the deployment was created with; anything else fails with exit 2 before any MLflow run.
"""

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.form import ALL_IMAGES, changed_fields, form_values, parameter_schema
from flows.quantize import quantize_flow
from flows.tracking import code_versions, resolve_tracking_uri
from flows.watch import CHECKPOINT_EVENT
from yoloq.artifacts import content_key, file_sha256, files_sha256
from yoloq.checkpoints import inside_folder
from yoloq.config import BackendName, CalibrationAlgorithm, Params, flatten, load_params
from yoloq.errors import GateFailed, InputError, YoloqError
from yoloq.preprocess import list_images
from yoloq.validate import validation_set_sha256

DEPLOYMENT_NAME = "yoloq-quantize"
RUN_KEY_TAG = "yoloq.run_key"
# Set by serve (in the serving process, whose runs inherit it) and deploy (the work pool job's env), not by a run.
WATCH_ROOT_ENV = "YOLOQ_WATCH_ROOT"
PARAMS_ENV = "YOLOQ_PARAMS"
FORM_VALUES_ENV = "YOLOQ_FORM_VALUES"  # JSON: what the form showed in each field (flows.form.form_values)


def flat_overrides(
    model_path: str | None = None,
    backend: str | None = None,
    calibration_algorithm: str | None = None,
    calibration_images: int | None = None,
    validation_images: int | None = None,
    max_map_drop: float | None = None,
    output_dir: str | None = None,
    extra: list[str] | None = None,
    search_enabled: bool | None = None,
    max_map_drop_vs_fp16: float | None = None,
    min_speedup_vs_fp16: float | None = None,
) -> list[str]:
    """The flat form's fields that are set, as `section.key=value` overrides (None = as in params.yaml;
    validation_images 0 = all)."""
    fields = {
        "model.path": model_path,
        "backend": backend,
        "calibration.algorithm": calibration_algorithm,
        "calibration.num_images": calibration_images,
        "validation.num_images": "null" if validation_images == ALL_IMAGES else validation_images,
        "gate.max_map_drop": max_map_drop,
        "gate.max_map_drop_vs_fp16": max_map_drop_vs_fp16,
        "gate.min_speedup_vs_fp16": min_speedup_vs_fp16,
        "search.enabled": None if search_enabled is None else str(search_enabled).lower(),
        "output_dir": output_dir,
    }
    return [f"{key}={value}" for key, value in fields.items() if value is not None] + list(extra or [])


def confined_overrides(
    params_path: Path, overrides: list[str], watch_root: Path | None, deployment_params: Path | None = None
) -> list[str]:
    """`overrides`, checked against what the operator configured; InputError (exit 2) when a run asks for more.

    The params file must be the deployment's own (when it has one). A model other than that file's model.path
    must lie inside `watch_root` once symlinks and `..` are resolved, and the run then uses that resolved path."""
    if deployment_params is not None and params_path.resolve() != deployment_params.resolve():
        raise InputError(
            f"params_path {params_path}: this deployment runs with {deployment_params}; leave params_path as it is"
        )
    trusted = load_params(params_path).model.path
    chosen = load_params(params_path, overrides).model.path
    if chosen == trusted:
        return overrides
    if watch_root is None:
        raise InputError(
            f"model {chosen}: this deployment quantizes only the model.path of {params_path} ({trusted}); "
            "serve or deploy it with --watch-root FOLDER to accept checkpoints from that folder"
        )
    return [*overrides, f"model.path={inside_folder(chosen, watch_root)}"]


def _configured_path(variable: str) -> Path | None:
    value = os.environ.get(variable)
    return Path(value) if value else None


def run_key(params: Params, versions: dict[str, str]) -> str:
    """What makes two runs the same: the model file's content, every resolved parameter except its path, the
    contents of the images and labels it reads (new images under the same paths run again), and the code and
    TensorRT versions (`flows.tracking.code_versions()`): an upgraded yoloq or TensorRT runs again. `schedule.*`
    decides when a run starts, not what it makes, so it is left out."""
    settings = {k: v for k, v in flatten(params).items() if k != "model.path" and not k.startswith("schedule.")}
    return content_key(file_sha256(params.model.path), settings, data_hashes(params), versions, length=32)


def data_hashes(params: Params) -> dict[str, str]:
    """Content hashes of the validation set (images and labels), and of the calibration and selection folders."""

    def folder(path: Path) -> str:
        return files_sha256(list_images(path)) if path.is_dir() else "absent"

    return {
        "validation": validation_set_sha256(params.validation),
        "calibration": folder(params.calibration.images),
        "selection": folder(params.selection.images),
    }


def finished_run_with_key(tracking_uri: str, experiment: str, key: str) -> str | None:
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'", max_results=1
    )
    return runs[0].info.run_id if runs else None


@flow(name="yoloq-quantize-deployment", log_prints=True)
def quantize_deployment(
    params_path: str = "params.yaml",
    model_path: str | None = None,
    backend: BackendName | None = None,
    calibration_algorithm: CalibrationAlgorithm | None = None,
    calibration_images: int | None = None,
    validation_images: int | None = None,
    max_map_drop: float | None = None,
    max_map_drop_vs_fp16: float | None = None,
    min_speedup_vs_fp16: float | None = None,
    search_enabled: bool | None = None,
    output_dir: str | None = None,
    skip_if_done: bool = False,
    extra_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Quantize and validate with params.yaml, changing only the fields that are changed.

    The deployment's form (flows/form.py) shows and checks these fields; each one None, or at the value the form
    showed, keeps params.yaml's value (ranges are checked by params.yaml's own validation, exit 2)."""
    logger = get_run_logger()
    values = {
        "model_path": model_path,
        "backend": backend,
        "calibration_algorithm": calibration_algorithm,
        "calibration_images": calibration_images,
        "validation_images": validation_images,
        "max_map_drop": max_map_drop,
        "max_map_drop_vs_fp16": max_map_drop_vs_fp16,
        "min_speedup_vs_fp16": min_speedup_vs_fp16,
        "search_enabled": search_enabled,
        "output_dir": output_dir,
    }
    changed = changed_fields(values, _shown_form_values())
    overrides = flat_overrides(**changed, extra=extra_overrides)
    logger.info("params %s with overrides: %s", params_path, " ".join(overrides) or "(none)")
    path = Path(params_path)
    overrides = confined_overrides(path, overrides, _configured_path(WATCH_ROOT_ENV), _configured_path(PARAMS_ENV))
    params = load_params(path, overrides)
    if not params.model.path.is_file():
        raise InputError(f"model {params.model.path} not found: check model_path or model.path in {params_path}")
    tracking_uri = resolve_tracking_uri(params.mlflow, path.resolve().parent)
    key = run_key(params, code_versions())
    if skip_if_done:
        existing = finished_run_with_key(tracking_uri, params.mlflow.experiment, key)
        if existing:
            logger.info("skipped: MLflow run %s already holds this model content with these parameters", existing)
            return {"skipped": True, "mlflow_run_id": existing, "tracking_uri": tracking_uri, "run_key": key}
    source = f"prefect:{deployment_name() or DEPLOYMENT_NAME}"  # MLflow's Source column: the deployment
    try:
        document = quantize_flow(params_path=str(path), overrides=overrides, source=source)
    except GateFailed as exc:
        _tag_run_key(exc.document, key)
        raise
    _tag_run_key(document, key)
    return {**document, "skipped": False, "run_key": key}


def _shown_form_values() -> dict[str, Any]:
    """What the deployment's form showed in each field (set by serve/deploy); {} outside a deployment."""
    value = os.environ.get(FORM_VALUES_ENV)
    return json.loads(value) if value else {}


def deployment_name() -> str | None:
    """The name of the deployment running this flow run (None outside one, or when Prefect cannot say)."""
    from prefect.runtime import deployment

    try:
        return deployment.name
    except Exception:  # the API is unreachable: the name is only for MLflow's Source column
        return None


def _tag_run_key(document: dict[str, Any], key: str) -> None:
    if document.get("mlflow_run_id"):
        MlflowClient(document["tracking_uri"]).set_tag(document["mlflow_run_id"], RUN_KEY_TAG, key)


def checkpoint_trigger(dedupe_hours: float = 24.0) -> DeploymentEventTrigger:
    """Start a run for a `yoloq.checkpoint.created` event, with the checkpoint path from the event: one run per
    checkpoint content within `dedupe_hours` (the resource id carries the content's sha256; a reactive trigger
    with threshold 1 fires on the first event of each resource, then ignores that resource for the window)."""
    return DeploymentEventTrigger(
        name="yoloq-new-checkpoint",
        expect={CHECKPOINT_EVENT},
        match={"prefect.resource.id": "yoloq.checkpoint.*"},
        for_each={"prefect.resource.id"},
        posture="Reactive",
        threshold=1,
        within=timedelta(hours=dedupe_hours),
        parameters={"model_path": "{{ event.payload.path }}", "skip_if_done": True},
    )


def declared_schedule(params_path: Path, cron: str | None) -> tuple[str | None, str | None, float]:
    """The cron schedule (--cron, else params.yaml's schedule.cron), its time zone and the trigger's window."""
    schedule = load_params(params_path).schedule
    return (cron if cron is not None else schedule.cron), schedule.timezone, schedule.checkpoint_dedupe_hours


def deployment_parameters(params_path: Path) -> dict[str, Any]:
    return {"params_path": str(params_path.resolve())}


def deployment_env(params_path: Path, watch_root: Path | None) -> dict[str, str]:
    """What the deployment's runs check their parameters against (`confined_overrides`), and what its form showed."""
    env = {
        PARAMS_ENV: str(params_path.resolve()),
        FORM_VALUES_ENV: json.dumps(form_values(load_params(params_path))),
    }
    if watch_root is not None:
        env[WATCH_ROOT_ENV] = str(watch_root.resolve())
    return env


def serve(
    params_path: Path, name: str, cron: str | None, with_trigger: bool = True, watch_root: Path | None = None
) -> None:
    """Serve the deployment from this process (runs execute here, one at a time, and inherit its environment)."""
    from prefect import serve as serve_deployments

    os.environ.pop(WATCH_ROOT_ENV, None)
    os.environ.update(deployment_env(params_path, watch_root))
    cron, timezone, dedupe_hours = declared_schedule(params_path, cron)
    deployment = quantize_deployment.to_deployment(
        name=name,
        schedule=Cron(cron, timezone=timezone) if cron else None,
        parameters=deployment_parameters(params_path),
        triggers=[checkpoint_trigger(dedupe_hours)] if with_trigger else None,
        concurrency_limit=1,
        description=quantize_deployment.description,
        tags=["yoloq"],
    )
    serve_deployments(with_form(deployment, params_path))


def deploy(
    params_path: Path, name: str, cron: str | None, pool: str, with_trigger: bool = True, watch_root: Path | None = None
) -> Any:
    """Register the deployment on a work pool; `prefect worker start --pool POOL` runs it (yoloq importable).

    The watched folder and params file reach the runs as job environment variables (a run started through the
    API with its own job_variables could replace them: on a shared Prefect server prefer `serve`)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.deployments.runner import deploy as deploy_deployments

    cron, timezone, dedupe_hours = declared_schedule(params_path, cron)
    import flows.deploy  # under `python -m flows.deploy` this file runs as __main__, which a worker cannot import

    deployment = flows.deploy.quantize_deployment.to_deployment(
        name=name,
        work_pool_name=pool,
        schedule=Cron(cron, timezone=timezone) if cron else None,
        parameters=deployment_parameters(params_path),
        job_variables={"env": deployment_env(params_path, watch_root)},
        triggers=[checkpoint_trigger(dedupe_hours)] if with_trigger else None,
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=quantize_deployment.description,
        tags=["yoloq"],
    )
    (deployment_id,) = deploy_deployments(
        with_form(deployment, params_path), work_pool_name=pool, print_next_steps_message=False
    )
    return deployment_id


def with_form(deployment: Any, params_path: Path) -> Any:
    """`deployment` (a RunnerDeployment) with the typed form of flows/form.py as its parameter schema, in place of
    the one Prefect derives from the flow's signature (Prefect offers no public argument for it)."""
    from prefect.utilities.callables import ParameterSchema

    deployment._parameter_openapi_schema = ParameterSchema(
        **parameter_schema(load_params(params_path), params_path.resolve())
    )
    return deployment


def prefect_api_url() -> str | None:
    """The Prefect server this process talks to ($PREFECT_API_URL or the active Prefect profile), if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve", "deploy"])
    parser.add_argument("-p", "--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default {DEPLOYMENT_NAME})")
    parser.add_argument(
        "--cron", default=None, help='cron schedule, e.g. "0 3 * * *" (default: schedule.cron of the params file)'
    )
    parser.add_argument("--pool", help="work pool (deploy)")
    parser.add_argument("--no-trigger", action="store_true", help="no new-checkpoint trigger")
    parser.add_argument(
        "--watch-root",
        type=Path,
        help="the folder `yoloq watch` watches: runs may quantize checkpoints inside it (required with the trigger)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not prefect_api_url():
        print("set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) to a running Prefect server", file=sys.stderr)
        return 2
    if not args.params.is_file():
        print(f"params file {args.params} not found", file=sys.stderr)
        return 2
    try:  # a bad params file: one line and exit 2 (the form shows its values, the schedule is read from it)
        load_params(args.params)
    except YoloqError as exc:
        print(f"{args.params}: {exc}", file=sys.stderr)
        return 2
    if args.watch_root is None and not args.no_trigger:
        print(
            "the new-checkpoint trigger needs --watch-root FOLDER (the folder `yoloq watch` watches; runs it starts "
            "may quantize only checkpoints inside it), or pass --no-trigger",
            file=sys.stderr,
        )
        return 2
    if args.watch_root is not None and not args.watch_root.is_dir():
        print(
            f"--watch-root {args.watch_root} is not a folder: create it (the folder `yoloq watch` watches)",
            file=sys.stderr,
        )
        return 2
    if args.command == "serve":
        serve(args.params, args.name, args.cron, not args.no_trigger, args.watch_root)
        return 0
    if not args.pool:
        print("deploy needs --pool NAME (create it: prefect work-pool create NAME --type process)", file=sys.stderr)
        return 2
    deployment_id = deploy(args.params, args.name, args.cron, args.pool, not args.no_trigger, args.watch_root)
    print(f"deployment {deployment_id}: start a worker with `prefect worker start --pool {args.pool}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
