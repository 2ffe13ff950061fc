"""Model preparation shared by the quantize flow and build targets: export -> simplify -> calibrate, logged."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger

from flows.context import RunContext
from flows.tracking import ImageSet
from tasks.calibrate import calibrate_task
from tasks.export import export_task
from tasks.simplify import simplify_task
from yoloq.calibrate import CalibrationResult
from yoloq.config import Params
from yoloq.export import ExportResult, ModelFacts
from yoloq.preprocess import list_images
from yoloq.selection import SelectionSet, load_selection_set
from yoloq.validate import ValidationSet, load_validation_set, validation_set_sha256


@dataclass(frozen=True)
class PreparedModels:
    exported: ExportResult
    dataset: ValidationSet
    fp32_onnx: Path  # the simplified FP32 model every variant starts from
    calibration: CalibrationResult | None  # None when no variant needs the Q/DQ model
    selection: SelectionSet | None  # the INT8 search's images (None without a search)

    @property
    def facts(self) -> ModelFacts:
        return self.exported.facts


def prepare_models(ctx: RunContext) -> PreparedModels:
    """Export (unless the run exported before it opened), load the validation set, simplify and (for INT8)
    calibrate; facts, metrics and the image sets (as MLflow datasets) go to the parent run."""
    logger = get_run_logger()
    params, tracker, cache_dir = ctx.params, ctx.tracker, ctx.cache_dir
    parent = tracker.parent_run_id
    exported = ctx.exported or export_task(params.model, params.export, cache_dir / "export")
    facts = exported.facts
    tracker.set_tags(parent, {"model.family": facts.family, "model.head_format": facts.head_format})
    tracker.log_params(parent, {"model.num_classes": str(len(facts.names)), "model.stride": str(facts.stride)})

    dataset = load_validation_set(params.validation, len(facts.names))
    stats = dataset.stats
    logger.info(
        "validation: %d images, %d boxes, %d background images (no label file), %d label files without image",
        stats.num_images,
        stats.num_boxes,
        stats.background_images,
        stats.orphan_labels,
    )
    validation_images = [t.path for t in dataset.truths]
    sha256 = validation_set_sha256(params.validation)
    tracker.log_datasets([ImageSet("validation", params.validation.images, sha256, len(validation_images))])

    simplify_images = simplify_check_images(params, validation_images)
    simplified = simplify_task(
        exported.onnx_path, simplify_images, exported.input_name, facts.imgsz, params.simplify, cache_dir / "simplify"
    )
    tracker.log_metrics(
        parent, {"simplify.max_abs_error": simplified.max_abs_error, "simplify.max_rel_error": simplified.max_rel_error}
    )
    tracker.set_tags(parent, {"simplify.result": simplified.message})

    calibration: CalibrationResult | None = None
    if params.needs_calibration:
        calibration = calibrate_task(
            simplified.onnx_path,
            exported.input_name,
            facts.imgsz,
            params.calibration,
            validation_images,
            cache_dir / "calibration",
        )
        tracker.set_tags(parent, {"data.calibration_images_sha256": calibration.images_sha256})
        images = params.calibration.images
        tracker.log_datasets([ImageSet("calibration", images, calibration.images_sha256, calibration.num_images)])
        tracker.log_metrics(
            parent,
            {
                "calibration.seconds": calibration.seconds,
                "calibration.validation_overlap": calibration.validation_overlap,
            },
        )
    selection: SelectionSet | None = None
    if params.needs_selection:
        calibration_images = list_images(params.calibration.images) if params.calibration.images.is_dir() else []
        selection = load_selection_set(params.selection, len(facts.names), validation_images, calibration_images)
        logger.info(
            "selection: the INT8 search judges candidates on %s; every reported number comes from the %d "
            "validation images",
            selection.describe(),
            len(validation_images),
        )
        tracker.set_tags(
            parent,
            {
                "data.selection_images_sha256": selection.images_sha256,
                "data.selection": selection.describe(),
                "data.report": f"{params.validation.images} + {len(params.validation.extra_sets)} extra sets "
                f"({len(validation_images)} images)",
            },
        )
        tracker.log_datasets(
            [ImageSet("selection", params.selection.images, selection.images_sha256, len(selection.truths))]
        )
    return PreparedModels(exported, dataset, simplified.onnx_path, calibration, selection)


def simplify_check_images(params: Params, validation_images: list[Path]) -> list[Path]:
    """The images that prove onnxsim changed nothing: the first `simplify.check_images` calibration images, or the
    validation images when the run does not calibrate (no INT8 variant) or the calibration folder is missing/empty."""
    count = params.simplify.check_images
    folder = params.calibration.images
    calibration = list_images(folder)[:count] if params.needs_calibration and folder.is_dir() else []
    return calibration or validation_images[:count]
