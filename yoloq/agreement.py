"""Label-free accuracy of a quantized model: how well its detections agree with FP32's on the same images.

FP32's confident detections (score >= `min_score`) are the pseudo ground truth, and the candidate's detections
(the validation settings: conf 0.001, NMS, 300 per image) are scored against them with COCO mAP50-95: 1.0 means
the candidate finds exactly what FP32 finds. It needs no labels, so it can judge INT8 candidates on many more
images than are labelled, and it measures the one thing quantization changes (the deviation from FP32) without
the label noise that makes small mAP differences unresolvable on a few hundred images.
"""

from __future__ import annotations

import dataclasses

from yoloq.heads import Detections
from yoloq.labels import ImageTruth
from yoloq.metrics import MapResult, coco_map

DEFAULT_MIN_SCORE = 0.25  # Ultralytics' default prediction confidence: what a user of the FP32 model would keep


def pseudo_truths(images: list[ImageTruth], reference: list[Detections], min_score: float) -> list[ImageTruth]:
    """`images` (ids, paths, sizes) with FP32's detections of at least `min_score` as their ground truth."""
    if len(images) != len(reference):
        raise ValueError(f"{len(images)} images but {len(reference)} reference detection lists")
    truths = []
    for image, found in zip(images, reference, strict=True):
        keep = found.scores >= min_score
        truths.append(
            dataclasses.replace(
                image, boxes_xyxy=found.boxes_xyxy[keep].astype("float64"), classes=found.classes[keep].astype("int64")
            )
        )
    return truths


def agreement(
    images: list[ImageTruth],
    reference: list[Detections],
    candidate: list[Detections],
    class_names: list[str],
    min_score: float = DEFAULT_MIN_SCORE,
) -> MapResult:
    """COCO mAP of `candidate`'s detections against `reference`'s (FP32's) confident ones, on the same images."""
    return coco_map(pseudo_truths(images, reference, min_score), candidate, class_names)
