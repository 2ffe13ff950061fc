"""MLflow logging for the quantize flow: one parent run per flow run, one child run per variant.

Everything goes through an explicit `MlflowClient` and run ids (never the thread-local active run), so logging
from the flow can never produce orphan runs, and a failure marks every open run FAILED with the error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from yoloq.config import MlflowConfig, Params, flatten

PACKAGES = ("yoloq", "prefect", "mlflow", "onnx", "onnxsim", "onnxruntime", "polygraphy", "numpy", "torch", "tensorrt")
_MAX_PARAM_LENGTH = 6000
KIND_TAG = "yoloq.kind"
"""What a run holds: `variant` (a child run per variant), `candidate` (the INT8 search's), `comparison`."""
VARIANT_KIND = "variant"
CANDIDATE_KIND = "candidate"
COMPARISON_KIND = "comparison"


def resolve_tracking_uri(config: MlflowConfig, project_dir: Path) -> str:
    """params.yaml's mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db."""
    if config.tracking_uri:
        return config.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(project_dir / 'mlflow.db').resolve()}"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
"""CPU features that change which ONNX Runtime kernels run (the numbers yoloq reports do not depend on them: Q/DQ
models run as written, see yoloq.backends.onnxruntime; recorded so that a difference can be traced)."""


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """`host.cpu` (model name) and `host.isa` (which of ISA_FLAGS this CPU has) for the MLflow run."""
    try:
        first = cpuinfo.read_text().split("\n\n", 1)[0]  # the first processor's block
    except OSError:
        return {"host.cpu": platform.processor() or "unknown", "host.isa": "unknown"}
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    flags = set(fields.get("flags", "").split())
    return {
        "host.cpu": fields.get("model name") or platform.processor() or "unknown",
        "host.isa": " ".join(flag for flag in ISA_FLAGS if flag in flags) or "none of " + ",".join(ISA_FLAGS),
    }


def git_commit(project_dir: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_versions() -> dict[str, str]:
    """Besides the model and params, what decides a run's outcome: the yoloq code (version, and git commit when it
    runs from a checkout, else "unknown") and the TensorRT that builds the engines ("none" without one)."""
    import yoloq

    checkout = Path(yoloq.__file__).resolve().parents[1]
    commit = git_commit(checkout) if (checkout / ".git").exists() else "unknown"  # a wheel install has no .git
    return {"yoloq": yoloq.__version__, "yoloq.git_commit": commit, "tensorrt": tensorrt_version()}


def tensorrt_version() -> str:
    """The importable TensorRT's version, "none" when it is not installed, "unimportable (Error)" when it fails."""
    try:
        if importlib.util.find_spec("tensorrt") is None:
            return "none"
        return str(importlib.import_module("tensorrt").__version__)
    except Exception as exc:  # a broken install raises ImportError, OSError (libnvinfer), AttributeError...
        return f"unimportable ({type(exc).__name__})"


@dataclass
class RunTracker:
    client: MlflowClient
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    open_runs: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, params: Params, project_dir: Path, run_name: str, data_hashes: dict[str, str]) -> RunTracker:
        uri = resolve_tracking_uri(params.mlflow, project_dir)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(params.mlflow.experiment)
        if experiment is None:
            location = (project_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            experiment_id = client.create_experiment(params.mlflow.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        tags = {
            "mlflow.runName": run_name,
            "mlflow.source.git.commit": git_commit(project_dir),
            "host": platform.node(),
            "host.platform": platform.platform(),
            "host.cpu_count": str(os.cpu_count()),
            **cpu_description(),
            "python": platform.python_version(),
            **{f"version.{k}": v for k, v in package_versions().items()},
            **{f"data.{k}": v for k, v in data_hashes.items()},
        }
        run = client.create_run(experiment_id, tags=tags)
        tracker = cls(client, uri, experiment_id, run.info.run_id, [run.info.run_id])
        tracker.log_params(tracker.parent_run_id, flatten(params))
        return tracker

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        items = [Metric(k, float(v), 0, 0) for k, v in metrics.items()]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, paths: list[Path], folder: str | None = None) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), folder)
            elif path.is_file():
                self.client.log_artifact(run_id, str(path), folder)

    def start_child(self, name: str, params: dict[str, str], kind: str | None = None) -> str:
        """A child run of the parent run; `kind` becomes its yoloq.kind tag (e.g. VARIANT_KIND)."""
        tags = {"mlflow.parentRunId": self.parent_run_id, "mlflow.runName": name}
        if kind is not None:
            tags[KIND_TAG] = kind
        run = self.client.create_run(self.experiment_id, tags=tags)
        self.open_runs.append(run.info.run_id)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")
        self.open_runs.remove(run_id)

    def fail_all(self, error: BaseException) -> None:
        """Mark every run still open FAILED, with the error as a tag (children first)."""
        message = error_message(error)
        for run_id in reversed(list(self.open_runs)):
            try:
                self.set_tags(run_id, {"error": message})
                self.client.set_terminated(run_id, "FAILED")
            finally:
                self.open_runs.remove(run_id)


def error_message(error: BaseException) -> str:
    """One line for the `error` tag: the stop signal when the run was stopped, else the error itself.

    A cancellation reaches the flow as a signal (Prefect's TerminationSignal, KeyboardInterrupt, SystemExit) that can
    strike inside Prefect's own task bookkeeping, which then raises an unrelated error ("Task run is not set") while
    handling it. The signal is the real reason, so it is looked for along the exception chain first.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    stop = next((e for e in chain if not isinstance(e, Exception)), None)
    if stop is None:
        return f"{type(error).__name__}: {str(error) or '(no message)'}"
    message = f"{type(stop).__name__}: {str(stop) or 'the run was stopped (cancelled, interrupted or killed)'}"
    return message if stop is error else f"{message} (then {type(error).__name__}: {error})"
