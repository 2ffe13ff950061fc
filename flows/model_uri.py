"""`models:/NAME@ALIAS` (or `models:/NAME/VERSION`) -> the registered model file on this machine, and a Detector.

The registry (flows/registry.py) registers one file per version, `runs:/<run>/<file>`: an ONNX model (ONNX Runtime
variants) or a TensorRT engine. For an engine, its build record (`<engine>.json`: the model facts) and the ONNX it was
built from (logged beside it) are downloaded too, so that an engine built on another GPU can be rebuilt here or the
ONNX run on ONNX Runtime. Downloads go to `<cache>/registry/<name>-v<version>/` and are reused. MLflow is imported
only when a registry URI is resolved: predicting from a file needs no MLflow (the GPU kit has none).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yoloq.artifacts import read_json
from yoloq.detector import ENGINE_SUFFIXES, Detector, PredictBackend
from yoloq.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MODEL_URI_PREFIX = "models:/"


@dataclass(frozen=True)
class RegisteredModelFile:
    uri: str
    name: str
    version: str
    run_id: str
    path: Path  # the registered file (ONNX model or engine)
    source_onnx: Path | None  # the ONNX an engine was built from (before NMS / uint8 surgery), when logged
    tags: dict[str, str]

    @property
    def is_engine(self) -> bool:
        return self.path.suffix.lower() in ENGINE_SUFFIXES


def is_model_uri(text: str) -> bool:
    return str(text).startswith(MODEL_URI_PREFIX)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    rest = uri[len(MODEL_URI_PREFIX) :].strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, _, version = rest.partition("/")
        if name and version.isdigit():
            return name, None, version
    raise InputError(f"{uri}: a registry URI is models:/NAME@ALIAS (e.g. models:/yoloq-yolov5n@champion) or NAME/N")


def resolve_model_uri(uri: str, tracking_uri: str, cache_dir: Path) -> RegisteredModelFile:
    """Download the file a registry URI names (and, for an engine, its build record and source ONNX)."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    client = _client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        known = ", ".join(sorted(m.name for m in client.search_registered_models(max_results=50))) or "none"
        raise InputError(
            f"{uri}: no registered model {name!r} at {tracking_uri} (registered there: {known}); register one with "
            "`yoloq run` (registry.enabled), or point --tracking-uri at the store that has it"
        ) from exc
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        aliases = ", ".join(sorted(getattr(client.get_registered_model(name), "aliases", {}) or {})) or "none"
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise InputError(
            f"{uri}: registered model {name!r} has no {what} (aliases: {aliases}); a run sets `champion` when a "
            "variant passes the gate: run `yoloq run`, or name a version (models:/NAME/N)"
        ) from exc
    run_id, artifact = _run_artifact(found.source, found.run_id, uri)
    folder = cache_dir / "registry" / f"{name}-v{found.version}"
    path = _download(client, run_id, artifact, folder)
    source_onnx = None
    if path.suffix.lower() in ENGINE_SUFFIXES:
        record_name = str(Path(artifact).with_suffix(".json"))
        record = _download_optional(client, run_id, record_name, folder)
        if record is not None:  # the model before TensorRT-only surgery (NMS plugin, uint8 input) where logged
            details = read_json(record).get("details", {})
            source_name = Path(details.get("model_onnx") or details.get("source_onnx", "")).name
            if source_name:
                source_onnx = _download_optional(client, run_id, source_name, folder)
    return RegisteredModelFile(uri, name, str(found.version), run_id, path, source_onnx, dict(found.tags or {}))


def load_detector(
    model: str | Path,
    backend: PredictBackend = "auto",
    *,
    tracking_uri: str | None = None,
    cache_dir: Path = Path("runs/cache"),
    progress: Any = print,
    **options: Any,
) -> Detector:
    """`Detector.load` that also takes `models:/NAME@ALIAS`: the registered file is downloaded and loaded. A
    registered engine that cannot run here (no TensorRT, or built on another GPU or TensorRT) falls back to the ONNX
    it was built from when its run logged it: on ONNX Runtime without TensorRT, rebuilt for this GPU with it.
    `options` are Detector.load's (decoding, batch_size, ...); engines are built under `cache_dir`/build."""
    options.setdefault("build_dir", cache_dir / "build")
    if not is_model_uri(str(model)):
        return Detector.load(model, backend, **options)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    registered = resolve_model_uri(str(model), uri, cache_dir)
    progress(f"{model}: version {registered.version} of {registered.name} ({registered.path.name})")
    if not registered.is_engine:
        return Detector.load(registered.path, backend, **options)
    return _load_engine(registered, backend, progress, options)


def _load_engine(
    registered: RegisteredModelFile, backend: PredictBackend, progress: Any, options: dict[str, Any]
) -> Detector:
    source = registered.source_onnx
    built_on = registered.tags.get("target", "local")
    no_source = (
        "its run logged no source ONNX beside the engine: predict with the run's ONNX model (--model FILE.onnx), "
        "or run `yoloq run` on this machine, which registers what runs here"
    )
    if backend == "onnxruntime":
        if source is None:
            raise InputError(f"{registered.uri} is a TensorRT engine; {no_source}")
        progress(f"{registered.uri}: a TensorRT engine; running its source ONNX {source.name} on ONNX Runtime")
        return Detector.load(source, "onnxruntime", **options)
    try:
        return Detector.load(registered.path, "tensorrt", **options)
    except BackendUnavailable as exc:
        if backend == "tensorrt" or source is None:
            raise BackendUnavailable(
                f"{registered.uri} is a TensorRT engine (target {built_on}) and TensorRT cannot run here: {exc}"
                + ("" if source else f"; {no_source}")
            ) from exc
        progress(f"{registered.uri}: TensorRT is not available here ({exc}); running its source ONNX on ONNX Runtime")
        return Detector.load(source, "onnxruntime", **options)
    except InputError as exc:  # an engine of another GPU or TensorRT version does not deserialize
        if source is None:
            raise InputError(f"{registered.uri}: {exc}; {no_source}") from exc
        precision = registered.tags.get("precision", "fp32")
        if precision not in ("fp32", "fp16") and not _has_qdq(source):
            raise InputError(
                f"{registered.uri}: the engine does not load here ({exc}), and its {precision} source ONNX has no "
                "Q/DQ nodes (implicit INT8 calibrates in TensorRT): re-run `yoloq run` on this GPU"
            ) from exc
        progress(f"{registered.uri}: the engine does not load here ({exc}); building one from {source.name} here")
        options.setdefault("precision", precision if precision in ("fp32", "fp16") else "fp32")
        return Detector.load(source, "tensorrt", **options)


def _has_qdq(path: Path) -> bool:
    from yoloq.backends.onnxruntime import has_qdq

    return has_qdq(path)


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///") :])
        if not database.is_file():
            raise InputError(
                f"no MLflow store at {tracking_uri}: run `yoloq run` first, or pass --tracking-uri (or set "
                "MLFLOW_TRACKING_URI) to the store that holds the registered model"
            )
    return MlflowClient(tracking_uri=tracking_uri)


def _run_artifact(source: str, run_id: str | None, uri: str) -> tuple[str, str]:
    """(run id, artifact path) of a version's source `runs:/<run>/<path>` (what flows/registry.py registers)."""
    if source.startswith("runs:/"):
        found_run, _, artifact = source[len("runs:/") :].partition("/")
        if found_run and artifact:
            return found_run, artifact
    raise InputError(f"{uri}: its source {source!r} is not a run artifact (runs:/RUN/FILE) that yoloq registered")


def _download(client: MlflowClient, run_id: str, artifact: str, folder: Path) -> Path:
    """The artifact under `folder` (downloaded once: into a temporary folder, then renamed into place)."""
    final = folder / artifact
    if final.is_file():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        try:
            downloaded = Path(client.download_artifacts(run_id, artifact, tmp))
        except (MlflowException, OSError) as exc:
            raise InputError(f"cannot download {artifact} of run {run_id}: {exc}") from exc
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(downloaded), str(final))
    return final


def _download_optional(client: MlflowClient, run_id: str, artifact: str, folder: Path) -> Path | None:
    parent = str(Path(artifact).parent) if Path(artifact).parent != Path(".") else None
    names = {Path(f.path).name for f in client.list_artifacts(run_id, parent)}
    return _download(client, run_id, artifact, folder) if Path(artifact).name in names else None
