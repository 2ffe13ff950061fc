"""COCO mAP (pycocotools, bbox) from in-memory ground truth and detections in original-image pixels."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yoloq.errors import InputError
from yoloq.heads import Detections
from yoloq.interval import Matches, matches_from_evaluation, no_detections
from yoloq.labels import ImageTruth


@dataclass
class MapResult:
    """COCO bbox mAP. per_class_ap: AP50-95 by class name, only classes that have ground-truth boxes."""

    map50_95: float
    map50: float
    per_class_ap: dict[str, float]
    num_images: int
    num_boxes: int
    matches: Matches | None = field(default=None, compare=False, repr=False)  # for bootstrap intervals


def _category_id(class_index: int) -> int:
    """The category id both sides use: class index + 1 (pycocotools treats 0 ids as 'none')."""
    return class_index + 1


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _check_inputs(truths: list[ImageTruth], detections: list[Detections], class_names: list[str]) -> None:
    if len(truths) != len(detections):
        raise InputError(
            f"{len(truths)} ground-truth images but {len(detections)} detection lists; "
            "pass one Detections per image, in the same order."
        )
    ids = [t.image_id for t in truths]
    if len(set(ids)) != len(ids):
        raise InputError("ground truth has repeated image ids; give every image a distinct file stem.")
    num_classes = len(class_names)
    for truth, found in zip(truths, detections, strict=True):
        for name, classes in (("ground truth", truth.classes), ("detections", found.classes)):
            if len(classes) and not (0 <= int(classes.min()) and int(classes.max()) < num_classes):
                raise InputError(
                    f"{truth.path}: {name} class ids {int(classes.min())}..{int(classes.max())} are outside "
                    f"0..{num_classes - 1}; pass the model's class names."
                )
    if sum(len(t.classes) for t in truths) == 0:
        raise InputError("the ground truth has no boxes, so mAP is undefined; check the labels path.")


def coco_ground_truth(truths: list[ImageTruth], class_names: list[str]) -> dict[str, Any]:
    """A COCO instances dict: every image (also those without boxes), bbox xywh, area w*h, iscrowd 0, ids from 1."""
    images = [{"id": t.image_id, "file_name": t.path.name, "width": t.width, "height": t.height} for t in truths]
    annotations: list[dict[str, Any]] = []
    for truth in truths:
        for box, class_index in zip(_xyxy_to_xywh(truth.boxes_xyxy).tolist(), truth.classes.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": truth.image_id,
                    "category_id": _category_id(class_index),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": _category_id(i), "name": name} for i, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(truths: list[ImageTruth], detections: list[Detections]) -> list[dict[str, Any]]:
    """Detections as COCO result dicts (image_id, category_id, bbox xywh, score)."""
    return [row for truth, found in zip(truths, detections, strict=True) for row in result_rows(truth.image_id, found)]


def result_rows(
    image_id: int, found: Detections, category_id: Callable[[int], int] = _category_id
) -> list[dict[str, Any]]:
    """One image's detections as COCO result dicts; `category_id` maps a class index to the id written."""
    boxes = _xyxy_to_xywh(found.boxes_xyxy).tolist()
    return [
        {"image_id": int(image_id), "category_id": category_id(int(class_index)), "bbox": box, "score": score}
        for box, score, class_index in zip(boxes, found.scores.tolist(), found.classes.tolist(), strict=True)
    ]


def _per_class_ap(precision: np.ndarray, present: list[int], class_names: list[str]) -> dict[str, float]:
    """AP50-95 per class from COCOeval precision [iou, recall, class, area, maxdets]: area all, maxDets 100."""
    per_class: dict[str, float] = {}
    for class_index in present:
        values = precision[:, :, class_index, 0, -1]
        values = values[values > -1]
        per_class[class_names[class_index]] = float(values.mean()) if values.size else 0.0
    return per_class


def coco_map(
    truths: list[ImageTruth], detections: list[Detections], class_names: list[str], keep_matches: bool = False
) -> MapResult:
    """COCO bbox mAP50-95 and mAP50 (maxDets 100) of detections (original pixels, same order as truths); with
    `keep_matches`, also the per-detection matching that bootstrap intervals re-accumulate (yoloq.interval)."""
    _check_inputs(truths, detections, class_names)
    present = sorted({int(c) for t in truths for c in t.classes.tolist()})
    num_boxes = sum(len(t.classes) for t in truths)
    results = coco_results(truths, detections)
    if not results:  # pycocotools' loadRes cannot take an empty list
        zeros = {class_names[i]: 0.0 for i in present}
        matches = no_detections(truths, len(class_names)) if keep_matches else None
        return MapResult(0.0, 0.0, zeros, len(truths), num_boxes, matches)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = coco_ground_truth(truths, class_names)
        ground_truth.createIndex()
        predicted = ground_truth.loadRes(results)
        evaluation = COCOeval(ground_truth, predicted, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # Categories are ids 1..len(class_names) in order, so precision's class axis is the class index.
    per_class = _per_class_ap(evaluation.eval["precision"], present, class_names)
    map50_95, map50 = (max(float(v), 0.0) for v in evaluation.stats[:2])
    matches = matches_from_evaluation(evaluation, [t.image_id for t in truths]) if keep_matches else None
    return MapResult(map50_95, map50, per_class, len(truths), num_boxes, matches)


def per_class_table(result: MapResult) -> str:
    """Markdown table of per-class AP50-95, best first (ties by name)."""
    rows = sorted(result.per_class_ap.items(), key=lambda item: (-item[1], item[0]))
    lines = ["| class | AP50-95 |", "|---|---:|"]
    lines += [f"| {name} | {ap:.4f} |" for name, ap in rows]
    return "\n".join(lines) + "\n"
