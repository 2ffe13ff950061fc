"""Checks of the files a run needs, made before any work starts (and before Prefect starts a server), and of the
data they hold, made before the run's MLflow run exists.

`check_inputs` is cheap and static: the model file is classified without unpickling it (yoloq/checkpoint_sniff.py),
and image folders are counted by reading each file's first bytes, so a bad input fails in about a second with exit
2. `check_data` reads the labels and images (it needs the exported model's class count): a mistake found there fails
with exit 2 too, before any MLflow run is created.
"""

from __future__ import annotations

from pathlib import Path

from yoloq.checkpoint_sniff import sniff_model
from yoloq.config import Params
from yoloq.errors import InputError
from yoloq.preprocess import IMAGE_SUFFIXES, list_images, looks_like_image


def check_inputs(params: Params) -> None:
    """Raise InputError naming every unusable input of `params` and the key that points at it."""
    problems = []
    try:
        sniff_model(params.model.path)
    except InputError as exc:
        problems.append(f"model.path: {exc}")
    if params.needs_calibration:
        calibration, key = params.calibration, "calibration.min_images"
        problems += image_folder_problems(
            "calibration.images", calibration.images, "training images", calibration.min_images, key
        )
    problems += image_folder_problems("validation.images", params.validation.images, "validation images")
    if not params.validation.labels.exists():
        problems.append(f"validation.labels: {params.validation.labels} not found (YOLO label folder or COCO json)")
    if params.needs_selection and not params.selection.images.is_dir():
        problems.append(
            f"selection.images: folder {params.selection.images} not found (images the INT8 search judges on)"
        )
    labels = params.selection.labels
    if params.needs_selection and params.selection.metric == "map" and labels is not None and not labels.exists():
        problems.append(f"selection.labels: {labels} not found (metric map needs labels; agreement needs none)")
    for index, extra in enumerate(params.validation.extra_sets):
        problems += image_folder_problems(f"validation.extra_sets.{index}.images", extra.images, "validation images")
        if not extra.labels.exists():
            problems.append(f"validation.extra_sets.{index}.labels: {extra.labels} not found")
    if problems:
        raise InputError(
            "inputs that cannot be used:\n  " + "\n  ".join(problems) + "\nfix params.yaml or pass --set KEY=PATH"
        )


def count_images(folder: Path) -> tuple[int, list[Path]]:
    """(readable images, files with an image suffix that are not images) of `folder`, by their first bytes."""
    readable, unreadable = 0, []
    for path in list_images(folder):
        if looks_like_image(path):
            readable += 1
        else:
            unreadable.append(path)
    return readable, unreadable


def image_folder_problems(key: str, folder: Path, what: str, minimum: int = 1, minimum_key: str = "") -> list[str]:
    """What is wrong with an image folder: missing, no readable image, or fewer than `minimum` (`minimum_key`)."""
    if not folder.is_dir():
        return [f"{key}: folder {folder} not found ({what})"]
    readable, unreadable = count_images(folder)
    if readable >= max(minimum, 1):
        return []
    bad = f"; {len(unreadable)} files are not images, e.g. {unreadable[0].name}" if unreadable else ""
    if readable == 0:
        return [f"{key}: folder {folder} holds no readable images ({' '.join(IMAGE_SUFFIXES)}){bad}: add {what}"]
    return [
        f"{key}: folder {folder} holds only {readable} readable images{bad}, fewer than {minimum_key}={minimum}: "
        f"add {what} or lower {minimum_key}"
    ]


def check_data(params: Params, num_classes: int) -> None:
    """Read what the run will read, so that a mistake in the data fails (InputError, exit 2) before the MLflow run
    exists: the validation labels (against the model's `num_classes`), the calibration images at every size the
    run calibrates on and their overlap with the validation images, and the selection set (disjoint from both)."""
    from yoloq.calibrate import check_overlap  # imported here: check_inputs runs before the heavy modules load
    from yoloq.calibration_data import CalibrationSet, select_calibration_images
    from yoloq.selection import load_selection_set
    from yoloq.validate import load_validation_set

    validation = load_validation_set(params.validation, num_classes)
    validation_images = [t.path for t in validation.truths]
    calibration_images: list[Path] = []
    if params.needs_calibration:
        config = params.calibration
        sizes = {config.num_images, *(params.search.calibration_sizes if params.search.enabled else [])}
        largest = select_calibration_images(config.images, max(sizes), config.min_images)
        for size in sorted(sizes):  # the search's smaller sets are the first images of the largest
            first = CalibrationSet(largest.images[:size], largest.skipped, largest.image_hashes[:size])
            check_overlap(first, validation_images, config.max_validation_overlap)
        calibration_images = list_images(config.images)
    if params.needs_selection:
        load_selection_set(params.selection, num_classes, validation_images, calibration_images)
