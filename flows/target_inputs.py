"""What a build target downloads from MLflow, and how its worker turns the download into a run of its own.

The parent run logs, once per run, under its artifact folder `target-inputs/`:

    models/                      the simplified FP32 ONNX every variant starts from; the plain Q/DQ model and its
                                 manifest (INT8 variants the search does not decide)
    statistics/                  the calibration statistics of every calibration size the search uses (computed
                                 once, upstream; the worker writes each candidate's Q/DQ model from them)
    data/validation/<i>/         exactly the images the validation scores (images/) with their labels (labels/
                                 or the COCO json), one folder per labelled set
    data/selection/              the selection set's images (and labels, for selection.metric map)
    data/calibration/images/     the first calibration images: the sensitivity ranking's (and, for implicit
                                 INT8, the TensorRT calibrator's)
    inputs.json                  what each file is for, with its sha256

A worker needs only the Prefect API and the MLflow tracking server: it downloads that folder by the parent's run
id (proxied artifact serving, `mlflow server --serve-artifacts`: no artifact store credentials on the worker),
checks every file's sha256, and runs with params whose paths all point into its own folder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from flows.prepare import PreparedModels
from flows.search import CalibrationSource
from yoloq.artifacts import atomic_write_json, file_sha256, read_json
from yoloq.calibrate import CalibrationResult, CalibrationStats
from yoloq.calibration_data import CalibrationSet, select_calibration_images
from yoloq.config import Params, SelectionConfig, TargetConfig
from yoloq.errors import InputError
from yoloq.export import ExportResult, facts_for_onnx, io_names
from yoloq.labels import yolo_label_path
from yoloq.preprocess import list_images
from yoloq.quant.statistics import TensorStats
from yoloq.selection import load_selection_set
from yoloq.validate import load_validation_set, validation_sources

TARGET_INPUTS = "target-inputs"  # the parent run's artifact folder
INPUTS_FILE = "inputs.json"
INPUTS_VERSION = "target-inputs-v1"


def _place(source: Path, dest: Path, files: dict[str, str], root: Path) -> str:
    """`source` at `dest` (a hard link where possible, else a copy); recorded in `files` with its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)
    relative = dest.relative_to(root).as_posix()
    files[relative] = file_sha256(source)
    return relative


def _place_labelled(images: list[Path], labels: Path | None, folder: Path, files: dict[str, str], root: Path) -> dict:
    """Images into folder/images; their YOLO label files into folder/labels, or the COCO json as folder/<name>."""
    for image in images:
        _place(image, folder / "images" / image.name, files, root)
    if labels is None:
        return {"images": (folder / "images").relative_to(root).as_posix(), "labels": None}
    if labels.is_dir():
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        for image in images:
            label = yolo_label_path(image, labels)
            if label.is_file():
                _place(label, folder / "labels" / label.name, files, root)
        where = (folder / "labels").relative_to(root).as_posix()
    else:
        where = _place(labels, folder / labels.name, files, root)
    return {"images": (folder / "images").relative_to(root).as_posix(), "labels": where}


def stage_target_inputs(
    params: Params,
    prepared: PreparedModels,
    statistics: list[CalibrationStats],
    available_images: int,
    folder: Path,
) -> Path:
    """Write the target-inputs folder (see the module docstring) under `folder`; returns it."""
    files: dict[str, str] = {}
    models = folder / "models"
    document: dict[str, Any] = {
        "version": INPUTS_VERSION,
        "fp32_onnx": _place(prepared.fp32_onnx, models / prepared.fp32_onnx.name, files, folder),
        "imgsz": prepared.facts.imgsz,
        "plain_calibration": None,
        "statistics": [],
        "calibration_available_images": available_images,
    }
    plain = prepared.calibration
    if plain is not None:
        document["plain_calibration"] = {
            "qdq": _place(plain.qdq_path, models / plain.qdq_path.name, files, folder),
            "manifest": _place(plain.manifest_path, models / plain.manifest_path.name, files, folder),
            "num_images": plain.num_images,
            "skipped_images": plain.skipped_images,
            "validation_overlap": plain.validation_overlap,
            "algorithm": plain.algorithm,
            "excluded_nodes": plain.excluded_nodes,
            "images_sha256": plain.images_sha256,
        }
    for stats in statistics:
        document["statistics"].append(
            {
                "num_images": len(stats.images.images),
                "file": _place(stats.path, folder / "statistics" / stats.path.name, files, folder),
                "key": stats.key,
                "fp32_sha256": stats.fp32_sha256,
                "images": [p.name for p in stats.images.images],
                "image_hashes": stats.images.image_hashes,
                "skipped": [p.name for p in stats.images.skipped],
                "validation_overlap": stats.validation_overlap,
            }
        )
    data = folder / "data"
    document["validation"] = [
        _place_labelled(source.images, source.labels, data / "validation" / str(index), files, folder)
        for index, source in enumerate(validation_sources(params.validation))
    ]
    document["selection"] = None
    if prepared.selection is not None:
        labels = params.selection.labels if params.selection.metric == "map" else None
        document["selection"] = _place_labelled(prepared.selection.images, labels, data / "selection", files, folder)
    count = calibration_images_needed(params)
    document["calibration_images"] = None
    if count:
        chosen = select_calibration_images(params.calibration.images, count, min_images=1)
        for image in chosen.images:
            _place(image, data / "calibration" / "images" / image.name, files, folder)
        document["calibration_images"] = (data / "calibration" / "images").relative_to(folder).as_posix()
    document["files"] = files
    atomic_write_json(folder / INPUTS_FILE, document)
    return folder


def calibration_images_needed(params: Params) -> int:
    """How many calibration images a target reads: the sensitivity ranking's (search), and calibration.num_images
    for an implicit INT8 variant (TensorRT's calibrator reads the images on the GPU machine)."""
    needed = params.search.sensitivity_images if params.needs_selection else 0
    if any(v.quantization == "implicit" for v in params.variants):
        needed = max(needed, params.calibration.num_images)
    return needed


# -- the worker side -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetInputs:
    folder: Path
    document: dict[str, Any]

    def path(self, relative: str) -> Path:
        return self.folder / relative


def download_target_inputs(client: MlflowClient, parent_run_id: str, dest: Path) -> TargetInputs:
    """Download the parent run's target-inputs folder into `dest` (reused when a complete copy is there) and check
    every file's sha256 against inputs.json."""
    folder = dest / TARGET_INPUTS
    problems = _check_download(folder)
    if problems:
        shutil.rmtree(folder, ignore_errors=True)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            client.download_artifacts(parent_run_id, TARGET_INPUTS, str(dest))
        except Exception as exc:
            raise InputError(
                f"could not download {TARGET_INPUTS}/ of MLflow run {parent_run_id} from {client.tracking_uri}: "
                f"{exc}; the worker needs MLFLOW_TRACKING_URI pointing at the server the flow logs to"
            ) from exc
        problems = _check_download(folder)
        if problems:
            raise InputError(f"{TARGET_INPUTS}/ of MLflow run {parent_run_id}: {problems}")
    return TargetInputs(folder, read_json(folder / INPUTS_FILE))


def _check_download(folder: Path) -> str:
    """What is wrong with a downloaded inputs folder ('' when complete, every sha256 as logged)."""
    if not (folder / INPUTS_FILE).is_file():
        return f"{INPUTS_FILE} missing"
    document = read_json(folder / INPUTS_FILE)
    if document.get("version") != INPUTS_VERSION:
        return (
            f"version {document.get('version')}, this yoloq reads {INPUTS_VERSION}: install the same yoloq on the "
            "workers as where the flow runs"
        )
    files: dict[str, str] = document["files"]
    bad = [name for name, sha in files.items() if not (folder / name).is_file() or file_sha256(folder / name) != sha]
    return f"files differ from what the parent logged: {bad[:5]}" if bad else ""


def with_target_backend(params: Params, target: TargetConfig) -> Params:
    """`params` with the target's backend (when it names one) on every variant."""
    if target.backend is None:
        return params
    data = params.model_dump(mode="json")
    data["variants"] = [{**v, "backend": target.backend} for v in data["variants"]]
    return Params.model_validate(data)


def target_params(params: Params, target: TargetConfig, inputs: TargetInputs, output_dir: Path) -> Params:
    """The parent's params with every path the worker reads pointing into `inputs`, output_dir its own folder, the
    target's backend (if it names one) on every variant."""
    data = with_target_backend(params, target).model_dump(mode="json")
    validation = inputs.document["validation"]
    data["validation"]["images"] = str(inputs.path(validation[0]["images"]))
    data["validation"]["labels"] = str(inputs.path(validation[0]["labels"]))
    data["validation"]["num_images"] = None  # the download holds exactly the images scored
    data["validation"]["extra_sets"] = [
        {"images": str(inputs.path(s["images"])), "labels": str(inputs.path(s["labels"]))} for s in validation[1:]
    ]
    selection = inputs.document["selection"]
    if selection is not None:
        data["selection"]["images"] = str(inputs.path(selection["images"]))
        data["selection"]["labels"] = str(inputs.path(selection["labels"])) if selection["labels"] else None
        data["selection"]["num_images"] = None
    if inputs.document["calibration_images"]:
        data["calibration"]["images"] = str(inputs.path(inputs.document["calibration_images"]))
    data["output_dir"] = str(output_dir)
    data["tensorrt"]["timing_cache"] = None  # one per TensorRT version and GPU under the worker's output_dir
    return Params.model_validate(data)


def prepared_from_inputs(params: Params, inputs: TargetInputs) -> PreparedModels:
    """The models and data of the parent's preparation, read from the download (nothing is exported again)."""
    document = inputs.document
    fp32 = inputs.path(document["fp32_onnx"])
    facts = facts_for_onnx(fp32, document["imgsz"])
    input_name, output_name = io_names(fp32)
    exported = ExportResult(fp32, facts, input_name, output_name, reused=True)
    dataset = load_validation_set(params.validation, len(facts.names))
    plain = document["plain_calibration"]
    calibration = None
    if plain is not None:
        calibration = CalibrationResult(
            qdq_path=inputs.path(plain["qdq"]),
            manifest_path=inputs.path(plain["manifest"]),
            num_images=plain["num_images"],
            skipped_images=plain["skipped_images"],
            validation_overlap=plain["validation_overlap"],
            algorithm=plain["algorithm"],
            excluded_nodes=plain["excluded_nodes"],
            seconds=0.0,
            reused=True,
            images_sha256=plain["images_sha256"],
        )
    selection = None
    if document["selection"] is not None:
        config: SelectionConfig = params.selection
        calibration_images = list_images(params.calibration.images) if document["calibration_images"] else []
        selection = load_selection_set(config, len(facts.names), [t.path for t in dataset.truths], calibration_images)
    return PreparedModels(exported, dataset, fp32, calibration, selection)


def shipped_calibration(params: Params, inputs: TargetInputs) -> CalibrationSource:
    """The search's statistics, as computed upstream: one CalibrationStats per shipped calibration size."""
    shipped = {entry["num_images"]: entry for entry in inputs.document["statistics"]}
    images = Path(params.calibration.images)

    def statistics(num_images: int) -> CalibrationStats:
        entry = shipped.get(num_images)
        if entry is None:
            raise InputError(
                f"the target inputs hold calibration statistics of {sorted(shipped)} images, not {num_images}: "
                "the parent and the worker run different yoloq versions (install the same on both)"
            )
        path = inputs.path(entry["file"])
        chosen = CalibrationSet(  # names and hashes of every image; only the first ones are downloaded
            [images / name for name in entry["images"]], [Path(n) for n in entry["skipped"]], entry["image_hashes"]
        )
        stats = TensorStats.load(path)
        return CalibrationStats(
            path, entry["key"], stats, entry["fp32_sha256"], chosen, entry["validation_overlap"], 0.0, True
        )

    return CalibrationSource(statistics, inputs.document["calibration_available_images"])
