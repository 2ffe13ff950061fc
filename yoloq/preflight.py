"""Checks of the files a run needs, made before any work starts (and before Prefect starts a server)."""

from __future__ import annotations

from yoloq.config import Params
from yoloq.errors import InputError


def check_inputs(params: Params) -> None:
    """Raise InputError naming every missing input of `params` and the key that points at it."""
    problems = []
    if not params.model.path.is_file():
        problems.append(f"model.path: {params.model.path} not found (a .pt, model .yaml or .onnx file)")
    if params.needs_calibration and not params.calibration.images.is_dir():
        problems.append(f"calibration.images: folder {params.calibration.images} not found (training images)")
    if not params.validation.images.is_dir():
        problems.append(f"validation.images: folder {params.validation.images} not found")
    if not params.validation.labels.exists():
        problems.append(f"validation.labels: {params.validation.labels} not found (YOLO label folder or COCO json)")
    if params.needs_selection and not params.selection.images.is_dir():
        problems.append(
            f"selection.images: folder {params.selection.images} not found (images the INT8 search judges on)"
        )
    for index, extra in enumerate(params.validation.extra_sets):
        if not extra.images.is_dir():
            problems.append(f"validation.extra_sets.{index}.images: folder {extra.images} not found")
        if not extra.labels.exists():
            problems.append(f"validation.extra_sets.{index}.labels: {extra.labels} not found")
    if problems:
        raise InputError("missing inputs:\n  " + "\n  ".join(problems) + "\nfix params.yaml or pass --set KEY=PATH")
