"""Operations against real servers on loopback: `prefect server start`, `mlflow server --serve-artifacts`, a served
deployment with its schedule from params.yaml, the new-checkpoint trigger, and per-target builds on two process
work pools whose `prefect worker` processes share no storage with the flow (each in its own folder and HOME, and,
where user namespaces allow it, with the flow's output_dir, the MLflow artifact store and the project's data/
hidden by an empty tmpfs mounted over each).

One Prefect server and one MLflow server serve the whole module (started once, killed at the end even on failure).
Small data (16 calibration, 8 validation images) keeps it to a few minutes; the caches in one shared output_dir
make every run after the first reuse the export, simplified and Q/DQ models.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from benchmarks.loopback import Processes, free_port, http_ok, server_env, small_run_params, wait_until
from tests.conftest import PROJECT

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
DEPLOYMENT = "yoloq-quantize-deployment/ops-test"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("ops")
    prefect_port, mlflow_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    env = server_env(root, api_url, tracking_uri, PROJECT, BIN)
    env.update(PREFECT_LOGGING_LEVEL="INFO", PREFECT_WORKER_QUERY_SECONDS="2")  # workers pick up runs quickly
    processes = Processes(env, root, PROJECT)
    try:
        server_log = processes.start(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        )
        mlflow_log = processes.start(
            "mlflow-server",
            [
                str(BIN / "mlflow"), "server", "--serve-artifacts",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "mlartifacts"),
                "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
            ],
        )  # fmt: skip
        wait_until(lambda: http_ok(f"{api_url}/health"), 90, "prefect server", [server_log])
        wait_until(lambda: http_ok(f"{tracking_uri}/health"), 90, "mlflow server", [mlflow_log])
        with temporary_settings({PREFECT_API_URL: api_url}):
            try:
                yield {
                    "root": root,
                    "env": env,
                    "api_url": api_url,
                    "tracking_uri": tracking_uri,
                    "processes": processes,
                }
            finally:  # send this process's pending logs and events before the server goes away
                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def project(servers) -> Path:
    """A params.yaml with small data, logging to the MLflow server; one output_dir shared by every run."""
    data = small_run_params(servers["tracking_uri"], servers["root"] / "runs")
    data["selection"].update(images=str(PROJECT / "data/coco/select/images"), num_images=8)
    data["schedule"] = {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}  # the served deployment's schedule
    path = servers["root"] / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def served(servers, project) -> str:
    """`python -m flows.deploy serve` in the background; returns the deployment name once it is registered.

    Its trigger accepts checkpoints from servers["root"]/drop, the folder the watcher test watches."""
    from prefect.client.orchestration import get_client

    drop = servers["root"] / "drop"
    drop.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "flows.deploy", "serve", "-p", str(project), "--name", "ops-test"]
    log = servers["processes"].start("serve", [*command, "--watch-root", str(drop)])
    with get_client(sync_client=True) as client:
        wait_until(lambda: client.read_deployment_by_name(DEPLOYMENT), 90, "served deployment", [log])
    return DEPLOYMENT


def parent_runs(tracking_uri: str) -> list[Any]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("yoloq")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "yoloq.kind" not in r.data.tags]


def children(client: MlflowClient, parent: Any) -> dict[str, Any]:
    found = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["mlflow.runName"]: r for r in found}


def test_deployment_run_through_the_api_with_one_changed_parameter(servers, project, served, capsys):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as prefect:
        schedules = prefect.read_deployment_by_name(served).schedules
    assert [(s.schedule.cron, s.schedule.timezone) for s in schedules] == [("0 3 * * *", "Europe/Berlin")]

    flow_run = run_deployment(served, parameters={"max_map_drop": 0.05}, timeout=420, poll_interval=2)
    assert flow_run.state.is_completed(), f"{flow_run.state.name}: {flow_run.state.message}"

    client = MlflowClient(servers["tracking_uri"])
    parent = parent_runs(servers["tracking_uri"])[-1]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["gate.max_map_drop"] == "0.05"  # the field that was set
    assert parent.data.params["calibration.num_images"] == "16"  # every other field as in params.yaml
    assert parent.data.params["validation.num_images"] == "8"
    assert parent.data.tags["mlflow.source.name"] == "prefect:ops-test"  # the deployment, in MLflow's Source column
    assert {"comparison.png", "results.md"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}
    runs = children(client, parent)
    assert set(runs) == {"fp32", "int8"} and all(r.info.status == "FINISHED" for r in runs.values())

    version = client.get_model_version_by_alias("yoloq-yolov5n-int8", runs["int8"].data.tags["registry.alias"])
    assert version.run_id == runs["int8"].info.run_id and version.source.endswith(".int8-qdq.onnx")
    assert runs["int8"].data.tags["registry.alias"] == (
        "champion" if parent.data.tags["gate"] == "passed" else "challenger"
    )

    from flows.cli import main

    assert (
        main(
            [
                "compare",
                parent.info.run_id,
                "--tracking-uri",
                servers["tracking_uri"],
                "--out",
                str(servers["root"] / "cmp"),
            ]
        )
        == 0
    )
    assert "| int8 |" in capsys.readouterr().out
    experiment_id = parent.info.experiment_id
    comparisons = client.search_runs([experiment_id], "tags.`yoloq.kind` = 'comparison'")
    assert comparisons and comparisons[0].data.tags["yoloq.compared_runs"] == parent.info.run_id


def test_a_new_checkpoint_starts_one_run_per_content(servers, project, served):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.watch import announce
    from yoloq.checkpoints import new_checkpoints

    drop = servers["root"] / "drop"  # the served deployment's --watch-root
    shutil.copy(PROJECT / "data/models/yolov5n.pt", drop / "retrained.pt")
    shutil.copy(PROJECT / "data/models/yolov5n.pt", drop / "retrained-copy.pt")  # same content, other name
    before = len(parent_runs(servers["tracking_uri"]))
    watcher = subprocess.run(
        [str(BIN / "yoloq"), "watch", str(drop), "--once", "--settle", "0"],
        env=servers["env"], cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert watcher.returncode == 0, watcher.stderr
    assert "announced 1 new checkpoint(s)" in watcher.stdout
    rerun = subprocess.run(
        [str(BIN / "yoloq"), "watch", str(drop), "--once", "--settle", "0"],
        env=servers["env"], cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "announced 0 new checkpoint(s)" in rerun.stdout  # the state file remembers the content
    # the same content announced again (a watcher that lost its state): the trigger itself starts no second run
    announce(new_checkpoints(drop, {}, settle_s=0)[0])

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(served)

        def triggered_runs() -> list[Any]:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )
            return [r for r in runs if r.parameters.get("skip_if_done")]

        def one_finished() -> list[Any]:
            runs = triggered_runs()
            return runs if any(r.state and r.state.is_final() for r in runs) else []

        wait_until(one_finished, 420, "the triggered run", [servers["root"] / "serve.log"])
        time.sleep(5)  # both events were sent a whole run ago: a second run would exist by now
        runs = triggered_runs()
    assert len(runs) == 1, [(r.name, r.parameters["model_path"]) for r in runs]  # two events, one content: one run
    assert runs[0].state.is_completed(), runs[0].state.message
    assert Path(runs[0].parameters["model_path"]).parent == drop.resolve()
    new_parents = parent_runs(servers["tracking_uri"])[before:]
    assert len(new_parents) == 1
    assert new_parents[0].data.params["model.path"].startswith(str(drop.resolve()))
    assert new_parents[0].info.status == "FINISHED"


def test_a_cancelled_run_leaves_its_mlflow_runs_failed(servers, project, served):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    # a unique gate value marks this run's MLflow parent; 64 validation images keep it busy long enough
    flow_run = run_deployment(served, parameters={"max_map_drop": 0.07, "validation_images": 64}, timeout=0)

    def running_parent() -> Any:
        runs = [r for r in parent_runs(servers["tracking_uri"]) if r.data.params.get("gate.max_map_drop") == "0.07"]
        return runs[0] if runs and runs[0].info.status == "RUNNING" else None

    parent = wait_until(running_parent, 180, "MLflow parent run of the run to cancel", [servers["root"] / "serve.log"])
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by the test"), force=True)
        final = wait_until(
            lambda: (run := client.read_flow_run(flow_run.id)).state.is_final() and run,
            120,
            "cancelled flow run",
            [servers["root"] / "serve.log"],
        )
    assert final.state.is_cancelled(), final.state
    client = MlflowClient(servers["tracking_uri"])
    failed = wait_until(
        lambda: (run := client.get_run(parent.info.run_id)).info.status == "FAILED" and run, 30, "FAILED parent"
    )
    assert failed.data.tags["error"].startswith("TerminationSignal: the run was stopped")
    assert all(r.info.status == "FAILED" for r in children(client, failed).values() if r.info.status != "FINISHED")


POOLS = ("cpu-a", "cpu-b")


def namespaces_work() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs in a user + mount namespace of its own."""
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs none /mnt"],
            capture_output=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def workers(servers) -> dict[str, Path]:
    """One `prefect worker` per pool, each a "host" of its own: its own folder, HOME, PREFECT_HOME, working folder
    and YOLOQ_TARGET_DIR, and (with namespaces) the flow's output_dir, the MLflow artifact store and the project's
    data/ hidden behind empty tmpfs mounts. It shares with the flow only the two servers' URLs."""
    root, processes = servers["root"], servers["processes"]
    hidden = [root / "runs", root / "mlartifacts", PROJECT / "data"]
    for folder in hidden:
        folder.mkdir(exist_ok=True)
    isolate = namespaces_work()
    folders = {}
    for pool in POOLS:
        created = subprocess.run(
            [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"],
            env=servers["env"], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        host = root / f"host-{pool}"
        for sub in ("home", "prefect", "work", "cwd"):
            (host / sub).mkdir(parents=True)
        env = {
            **servers["env"],
            "HOME": str(host / "home"),
            "PREFECT_HOME": str(host / "prefect"),
            "YOLOQ_TARGET_DIR": str(host / "work"),
        }
        env.pop("MLFLOW_TRACKING_URI")  # the flow passes its tracking URI with the run
        prefect = shlex.quote(str(BIN / "prefect"))
        worker = f"cd {shlex.quote(str(host / 'cwd'))} && exec {prefect} worker start --pool {pool}"
        if isolate:
            mounts = "".join(f"mount -t tmpfs none {shlex.quote(str(f))} && " for f in hidden)
            command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mounts + worker]
        else:
            command = ["sh", "-c", worker]
        processes.start(f"worker-{pool}", command, env)
        folders[pool] = host / "work"
    return folders


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_targets_share_nothing_but_the_servers_and_search_on_each_target(servers, project, workers):
    from flows.quantize import quantize_flow
    from yoloq.artifacts import file_sha256

    targets = "[{name: gpu-a, work_pool: cpu-a, backend: onnxruntime}, {name: gpu-b, work_pool: cpu-b}]"
    small_search = [  # one calibration candidate and one precision candidate per target
        "search.enabled=true", "search.algorithms=[minmax]", "search.calibration_sizes=[16]",
        "search.float_steps=[0]", "search.sensitivity_images=1", "gate.max_map_drop=0.2",
    ]  # fmt: skip
    logs = [servers["root"] / f"worker-{pool}.log" for pool in POOLS]
    try:
        document = quantize_flow(params_path=str(project), overrides=[f"targets={targets}", *small_search])
    except Exception:
        print("\n".join(p.read_text()[-4000:] for p in logs))
        raise
    assert {v["name"] for v in document["variants"]} == {"gpu-a/fp32", "gpu-a/int8", "gpu-b/fp32", "gpu-b/int8"}

    client = MlflowClient(servers["tracking_uri"])
    parent = client.get_run(document["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["targets"] == "gpu-a,gpu-b"
    target_runs = children(client, parent)
    assert set(target_runs) == {"gpu-a", "gpu-b"}
    inputs = {f.path for f in client.list_artifacts(parent.info.run_id, "target-inputs")}
    assert {
        "target-inputs/inputs.json",
        "target-inputs/models",
        "target-inputs/statistics",
        "target-inputs/data",
    } <= inputs

    for target, pool in (("gpu-a", "cpu-a"), ("gpu-b", "cpu-b")):
        run = target_runs[target]
        work = workers[pool]
        assert run.info.status == "FINISHED" and run.data.tags["yoloq.kind"] == "target"
        assert run.data.tags["target.work_dir"] == str(work.resolve())
        assert {"results.json", "target.json", "search-int8"} <= {
            f.path for f in client.list_artifacts(run.info.run_id)
        }
        assert run.data.tags["int8.search.chosen"].startswith("int8.minmax-16.")  # the search ran on the target
        runs = children(client, run)
        variants = {name: r for name, r in runs.items() if r.data.tags["yoloq.kind"] == "variant"}
        candidates = [r for r in runs.values() if r.data.tags["yoloq.kind"] == "candidate"]
        assert set(variants) == {f"{target}/fp32", f"{target}/int8"} and len(candidates) == 2
        for variant in variants.values():
            assert variant.info.status == "FINISHED" and variant.data.params["work_pool"] == pool
            assert variant.data.metrics["map50_95"] > 0.1
            model = Path(variant.data.params["model"])
            assert model.is_relative_to(work.resolve())  # built in the worker's folder, not in output_dir
            assert model.name in {f.path for f in client.list_artifacts(variant.info.run_id)}  # and in MLflow
            assert not any(str(servers["root"] / "runs") in value for value in variant.data.params.values())
        alias = variants[f"{target}/int8"].data.tags["registry.alias"]
        version = client.get_model_version_by_alias(f"yoloq-yolov5n-{target}-int8", alias)
        assert version.run_id == variants[f"{target}/int8"].info.run_id

        # the worker's folder holds what it downloaded (inputs/, every file as the parent logged it) and what it
        # made from that (cache/, runs/): nothing else
        assert {path.split("/")[0] for path in files_under(work)} <= {"inputs", "cache", "runs"}
        downloaded = work / "inputs" / parent.info.run_id / "target-inputs"
        listed = json.loads((downloaded / "inputs.json").read_text())["files"]
        assert files_under(downloaded) == {*listed, "inputs.json"}
        assert all(file_sha256(downloaded / name) == sha for name, sha in listed.items())


def test_a_failed_target_exits_2_and_its_mlflow_runs_are_failed(servers, project, workers):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from flows.cli import main

    created = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", "cpu-idle", "--type", "process"],
        env=servers["env"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    # one pool no worker serves (cancelled past its deadline), one target asking for TensorRT on a CPU worker
    targets = "[{name: idle, work_pool: cpu-idle, timeout_s: 3}, {name: trt, work_pool: cpu-a, backend: tensorrt}]"
    assert main(["run", "-p", str(project), "--set", f"targets={targets}", "--set", "search.enabled=false"]) == 2

    parent = parent_runs(servers["tracking_uri"])[-1]
    assert parent.info.status == "FAILED" and "did not finish within 3 s" in parent.data.tags["error"]
    assert "target trt" in parent.data.tags["error"] and "tensorrt" in parent.data.tags["error"]
    client = MlflowClient(servers["tracking_uri"])
    target_runs = children(client, parent)
    assert {name: r.info.status for name, r in target_runs.items()} == {"idle": "FAILED", "trt": "FAILED"}
    assert "BackendUnavailable" in target_runs["trt"].data.tags["error"]  # tagged by the worker itself
    assert not (workers["cpu-a"] / "inputs" / parent.info.run_id).exists()  # it failed before downloading
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["idle-attempt1"])))
    assert runs and runs[0].state.is_cancelled()
