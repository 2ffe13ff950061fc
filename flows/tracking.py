"""MLflow logging for the quantize flow: one parent run per flow run, one child run per variant.

Everything goes through an explicit `MlflowClient` and run ids (never the thread-local active run), so logging
from the flow can never produce orphan runs, and a failure marks every open run FAILED with the error.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from yoloq.config import MlflowConfig, Params, flatten
from yoloq.errors import InputError

PACKAGES = ("yoloq", "prefect", "mlflow", "onnx", "onnxsim", "onnxruntime", "polygraphy", "numpy", "torch", "tensorrt")
_MAX_PARAM_LENGTH = 6000
KIND_TAG = "yoloq.kind"
"""What a run holds: `variant` (a child run per variant), `candidate` (the INT8 search's), `comparison`."""
VARIANT_KIND = "variant"
CANDIDATE_KIND = "candidate"
COMPARISON_KIND = "comparison"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""MLflow 3's experiment kind for model training: its UI then opens the experiment on the runs table (an experiment
without the tag and without runs opens on the GenAI traces overview)."""
DIGEST_LENGTH = 16
"""Hex digits of a data set's sha256 in its MLflow dataset digest (MLflow allows 36; the full hash is in the
dataset's profile and the run's `data.*` tags)."""


@dataclass(frozen=True)
class ImageSet:
    """Images a run read, logged as an MLflow dataset: `role` (calibration, selection, validation) is its name and
    context, `sha256` the content hash the run keys and `data.*` tags use."""

    role: str
    folder: Path
    sha256: str
    num_images: int

    def dataset_input(self) -> DatasetInput:
        source = LocalArtifactDatasetSource(str(self.folder))
        meta = MetaDataset(source, name=self.role, digest=self.sha256[:DIGEST_LENGTH]).to_dict()
        profile = json.dumps({"num_images": self.num_images, "sha256": self.sha256})
        dataset = Dataset(meta["name"], meta["digest"], meta["source_type"], meta["source"], profile=profile)
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", self.role)])


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
models run as an integer-exact simulation, see yoloq.quant.simulate; recorded so that a difference can be
traced)."""


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
    datasets: dict[str, ImageSet] = field(default_factory=dict)  # logged on the parent, by role
    source_tags: dict[str, str] = field(default_factory=dict)  # the parent's, repeated on every child

    @classmethod
    def start(
        cls, params: Params, project_dir: Path, run_name: str, data_hashes: dict[str, str], source: str = "yoloq run"
    ) -> RunTracker:
        """The parent run, in the params' experiment (created for model training when missing); `source` names what
        started it (the runs table's Source column), the yoloq code's git commit goes beside it."""
        uri = resolve_tracking_uri(params.mlflow, project_dir)
        client = MlflowClient(tracking_uri=uri)
        experiment_id = model_training_experiment(client, params.mlflow.experiment, project_dir)
        source_tags = {
            "mlflow.source.name": source,
            "mlflow.source.type": "JOB",
            "mlflow.source.git.commit": code_versions()["yoloq.git_commit"],
        }
        tags = {
            "mlflow.runName": run_name,
            **source_tags,
            "host": platform.node(),
            "host.platform": platform.platform(),
            "host.cpu_count": str(os.cpu_count()),
            **cpu_description(),
            "python": platform.python_version(),
            **{f"version.{k}": v for k, v in package_versions().items()},
            **{f"data.{k}": v for k, v in data_hashes.items()},
        }
        run = client.create_run(experiment_id, tags=tags)
        tracker = cls(client, uri, experiment_id, run.info.run_id, [run.info.run_id], source_tags=source_tags)
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

    def log_datasets(self, sets: list[ImageSet]) -> None:
        """`sets` as MLflow datasets of the parent run (the runs table's Dataset column); children name them by role."""
        self.client.log_inputs(self.parent_run_id, [s.dataset_input() for s in sets])
        self.datasets.update({s.role: s for s in sets})

    def start_child(
        self, name: str, params: dict[str, str], kind: str | None = None, datasets: tuple[str, ...] = ()
    ) -> str:
        """A child run of the parent run; `kind` becomes its yoloq.kind tag (e.g. VARIANT_KIND), `datasets` the roles
        of the parent's datasets it reads (those the parent has)."""
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": name,
            **self.source_tags,
        }
        if kind is not None:
            tags[KIND_TAG] = kind
        run = self.client.create_run(self.experiment_id, tags=tags)
        self.open_runs.append(run.info.run_id)
        self.log_params(run.info.run_id, params)
        inputs = [self.datasets[role].dataset_input() for role in datasets if role in self.datasets]
        if inputs:
            self.client.log_inputs(run.info.run_id, inputs)
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


def runs_page(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment. MLflow 3.17's UI opens an experiment on what its sidebar switch
    (GenAI / Model training, remembered per browser, GenAI at first) says, whatever the experiment's kind tag; this
    link asks for the model-training view."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def mlflow_ui_hint(tracking_uri: str, run_id: str) -> str:
    """Where to see run `run_id`'s experiment: its runs page on a tracking server, else how to start the UI."""
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    if tracking_uri.startswith(("http://", "https://")):
        return runs_page(tracking_uri, experiment_id)
    return f"mlflow ui --backend-store-uri {tracking_uri}, then {runs_page('http://127.0.0.1:5000', experiment_id)}"


def model_training_experiment(client: MlflowClient, name: str, project_dir: Path) -> str:
    """The id of experiment `name`, created when missing, tagged as model training unless it has a kind already;
    InputError (exit 2, before any run exists) when it was deleted."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        uri = client.tracking_uri
        location = (project_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        return client.create_experiment(name, artifact_location=location, tags=tags)
    if experiment.lifecycle_stage == "deleted":
        raise InputError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted at {client.tracking_uri}: restore "
            f"it (mlflow experiments restore --experiment-id {experiment.experiment_id}) or set mlflow.experiment to "
            "another name"
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


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
