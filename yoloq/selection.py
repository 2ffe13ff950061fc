"""The selection set: the images on which the INT8 search judges its candidates, apart from the images it reports.

Choosing the best of a dozen candidates on the images whose mAP is then printed overfits those images (measured:
+0.26 points printed, -0.90 on 524 images nobody chose on). So the search scores candidates on the selection set
only, and every number a run prints and gates on comes from the validation set (the report set). The two sets,
and the calibration images, must not share an image (compared by content).

Two metrics (`selection.metric`):
- agreement (default): label-free; a candidate's detections scored against FP32's confident detections on the same
  images (yoloq.agreement). 1.0 = it finds what FP32 finds.
- map: mAP50-95 against the selection set's labels.
Measured on yolov5n (benchmarks/selection.py: 12 candidates, 512 selection images, report = the 525 images of
val + val-extra): agreement ranks the candidates closer to their report-set mAP than labelled mAP does on 64 to
256 images (Spearman 0.77-0.81 against 0.61-0.70), and equally on 512 (0.73 / 0.72).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yoloq.agreement import agreement
from yoloq.artifacts import content_key, file_sha256
from yoloq.config import SelectionConfig
from yoloq.errors import ConfigError, InputError
from yoloq.heads import Detections
from yoloq.labels import ImageTruth, image_id_for, image_size, load_ground_truth
from yoloq.metrics import coco_map
from yoloq.preprocess import list_images


@dataclass(frozen=True)
class SelectionSet:
    truths: list[ImageTruth]  # with labels for metric map; without boxes for agreement
    config: SelectionConfig
    images_sha256: str

    @property
    def images(self) -> list[Path]:
        return [t.path for t in self.truths]

    def describe(self) -> str:
        return f"{self.config.images} ({len(self.truths)} images, metric {self.config.metric})"


def _unlabelled(images: list[Path]) -> list[ImageTruth]:
    truths = []
    for path in images:
        width, height = image_size(path)
        truths.append(ImageTruth(image_id_for(path), path, width, height, np.zeros((0, 4)), np.zeros(0, np.int64)))
    return truths


def load_selection_set(
    config: SelectionConfig, num_classes: int, report_images: list[Path], calibration_images: list[Path]
) -> SelectionSet:
    """The selection images (first `num_images` by name) with their labels for metric map; refuses images that are
    also report (validation) or calibration images."""
    if not config.images.is_dir():
        raise InputError(
            f"selection.images: folder {config.images} not found: the INT8 search judges candidates on images apart "
            "from the validation set; point it at a folder of images (no labels needed for metric agreement)"
        )
    images = list_images(config.images)[: config.num_images]
    if not images:
        raise InputError(f"selection.images: {config.images} holds no images")
    hashes = [file_sha256(p) for p in images]
    for role, others in (("validation (report)", report_images), ("calibration", calibration_images)):
        shared = sorted({file_sha256(p) for p in others} & set(hashes))
        if shared:
            names = [p.name for p, h in zip(images, hashes, strict=True) if h in set(shared)]
            raise InputError(
                f"{len(shared)} selection images are also {role} images (same content), e.g. {names[:3]}: the search "
                f"would choose on images it reports or calibrated on. Use disjoint folders"
            )
    if config.metric == "map":
        if config.labels is None:
            raise ConfigError("selection.metric map needs selection.labels (a YOLO label folder or COCO json)")
        truths, _ = load_ground_truth(images, config.labels, num_classes)
    else:
        truths = _unlabelled(images)
    return SelectionSet(truths, config, content_key(hashes, length=32))


class SelectionScorer:
    """Scores a candidate's detections on the selection set; FP32's detections are the reference."""

    def __init__(self, selection: SelectionSet, reference: list[Detections], class_names: list[str]) -> None:
        if len(reference) != len(selection.truths):
            raise ValueError("the reference detections do not match the selection images")
        self.selection = selection
        self.reference = reference
        self.class_names = class_names
        self.reference_score = self.score(reference)

    def score(self, detections: list[Detections]) -> float:
        """Agreement with FP32 or mAP50-95 against the labels, by `selection.metric` (higher is better)."""
        config = self.selection.config
        if config.metric == "agreement":
            return agreement(
                self.selection.truths, self.reference, detections, self.class_names, config.min_score
            ).map50_95
        return coco_map(self.selection.truths, detections, self.class_names).map50_95
