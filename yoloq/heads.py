"""Decode raw detector outputs (YOLOv5, YOLOv8/11, end-to-end) into boxes in network-input pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from yoloq.errors import InputError

HeadFormat = Literal["yolov5", "yolov8", "end2end"]

MAX_NMS_CANDIDATES = 30000
"""Highest-scoring candidates per image that go into NMS (YOLOv5/Ultralytics `max_nms`)."""

END2END_MAX_ROWS = 1000
"""With one class, an (N, K, 6) output fits yolov5 and end2end; K <= this reads as end2end (300 by default)."""

SUPPORTED_SHAPES = (
    "yolov5 (N, anchors, 5+num_classes) e.g. (1, 25200, 85) [cx cy w h obj cls...]; "
    "yolov8/yolo11 (N, 4+num_classes, anchors) e.g. (1, 84, 8400) [cx cy w h cls...]; "
    "end2end (N, max_det, 6) e.g. (1, 300, 6) [x1 y1 x2 y2 score class]"
)


@dataclass(frozen=True)
class DecodeSettings:
    """How raw outputs become detections: score threshold, class-aware NMS IoU threshold, detections kept per image."""

    conf_threshold: float = 0.25
    iou_threshold: float = 0.6
    max_detections: int = 300

    def __post_init__(self) -> None:
        _check_decode_args(self.conf_threshold, self.iou_threshold, self.max_detections, MAX_NMS_CANDIDATES)


@dataclass
class Detections:
    """Detections of one image: boxes (n, 4) float32 x1 y1 x2 y2, scores (n,) float32, classes (n,) int64."""

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @staticmethod
    def empty() -> Detections:
        return Detections(
            np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        )

    def __len__(self) -> int:
        return len(self.scores)


def detect_head_format(shape: tuple[int, ...], num_classes: int) -> HeadFormat:
    """Which head produced an output of this shape. Unknown shapes raise InputError listing the supported ones."""
    if len(shape) == 3 and num_classes >= 1:
        _, rows, cols = shape
        if cols == 6 and rows <= END2END_MAX_ROWS:
            return "end2end"
        if cols == 5 + num_classes:
            return "yolov5"
        if rows == 4 + num_classes:
            return "yolov8"
        if cols == 6:
            return "end2end"
    raise InputError(
        f"model output shape {tuple(shape)} does not match a supported head for num_classes={num_classes}; "
        f"supported: {SUPPORTED_SHAPES}. Check the model's class count or export it with one of these heads."
    )


def _check_decode_args(conf_threshold: float, iou_threshold: float, max_detections: int, max_candidates: int) -> None:
    if not 0.0 <= conf_threshold < 1.0:
        raise ValueError(f"conf_threshold is {conf_threshold}; it must be in [0, 1).")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold is {iou_threshold}; it must be in (0, 1].")
    if max_detections < 1 or max_candidates < 1:
        raise ValueError(f"max_detections ({max_detections}) and max_candidates ({max_candidates}) must be >= 1.")


def _check_output_shape(output: np.ndarray, head_format: HeadFormat) -> None:
    shape = output.shape
    if len(shape) != 3:
        ok = False
    elif head_format == "yolov5":
        ok = shape[2] >= 6  # cx cy w h obj + at least one class
    elif head_format == "yolov8":
        ok = shape[1] >= 5  # cx cy w h + at least one class
    else:
        ok = shape[2] == 6
    if not ok:
        raise InputError(f"output shape {shape} is not a {head_format} head output; supported: {SUPPORTED_SHAPES}.")


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) cx cy w h -> x1 y1 x2 y2, float32."""
    half = boxes[:, 2:4] / 2
    return np.concatenate([boxes[:, 0:2] - half, boxes[:, 0:2] + half], axis=1).astype(np.float32, copy=False)


def nms(
    boxes_xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_detections: int
) -> np.ndarray:
    """Class-aware NMS: indices (int64) of kept boxes, highest score first, at most max_detections.

    Greedy, torchvision semantics: a box is dropped when its IoU with a kept, higher-scoring box of the same class
    is > iou_threshold; equal scores keep input order. Runs cv2.dnn.NMSBoxes on boxes shifted so that every class
    lies in its own disjoint region (the "batched NMS" offset trick, measured from the smallest coordinate so
    negative coordinates are safe). cv2's top_k cuts candidates *before* NMS, so instead NMS runs on the best
    4 * max_detections candidates, then 4x more, until max_detections survive: greedy NMS of a score-sorted prefix
    is a prefix of the full result, so this is exact and avoids comparing thousands of boxes that cannot make it.
    """
    count = len(scores)
    if count == 0:
        return np.zeros((0,), dtype=np.int64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    boxes = boxes_xyxy[order].astype(np.float64)
    low = float(boxes.min())
    span = float(boxes.max()) - low + 1.0
    offset = (classes[order].astype(np.float64) * span - low)[:, None]
    xywh = np.empty_like(boxes)
    xywh[:, 0:2] = boxes[:, 0:2] + offset
    xywh[:, 2:4] = boxes[:, 2:4] - boxes[:, 0:2]
    # cv2 drops scores <= its (non-negative) score threshold, so it gets ranks instead: the same order, ties already
    # broken, and zero or negative scores are kept like any other.
    ranks = np.arange(count, 0, -1, dtype=np.float32)
    prefix = min(count, 4 * max_detections)
    while True:
        keep = np.sort(
            np.asarray(cv2.dnn.NMSBoxes(xywh[:prefix], ranks[:prefix], 0.0, iou_threshold), np.int64).reshape(-1)
        )
        if len(keep) >= max_detections or prefix == count:
            return order[keep[:max_detections]].astype(np.int64)
        prefix = min(count, 4 * prefix)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first (stable for ties)."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")


def _select(
    boxes_cxcywh: np.ndarray,
    class_scores: np.ndarray,
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    max_candidates: int,
) -> Detections:
    """Multi-label candidates (every class score > conf), top max_candidates, class-aware NMS, top max_detections."""
    finite = np.isfinite(boxes_cxcywh).all(axis=1)  # one NaN box would suppress everything after it in NMS
    if not finite.all():
        boxes_cxcywh, class_scores = boxes_cxcywh[finite], class_scores[finite]
    flat_scores = np.ascontiguousarray(class_scores).reshape(-1)
    flat = np.flatnonzero(flat_scores > conf_threshold)
    scores = flat_scores[flat]
    flat = flat[_top_k(scores, max_candidates)]
    rows, classes = np.divmod(flat, class_scores.shape[1])
    scores = flat_scores[flat]
    boxes = cxcywh_to_xyxy(boxes_cxcywh[rows])
    keep = nms(boxes, scores, classes, iou_threshold, max_detections)
    return Detections(boxes[keep], scores[keep].astype(np.float32), classes[keep])


def _decode_yolov5(item: np.ndarray, conf: float, iou: float, max_det: int, max_cand: int) -> Detections:
    objectness = item[:, 4]
    item = item[objectness > conf]
    class_scores = item[:, 5:] * item[:, 4:5]
    return _select(item[:, :4], class_scores, conf, iou, max_det, max_cand)


def _decode_yolov8(item: np.ndarray, conf: float, iou: float, max_det: int, max_cand: int) -> Detections:
    """item is (4+nc, anchors); anchors with no class above conf are dropped before transposing."""
    alive = item[4:].max(axis=0) > conf
    selected = item[:, alive].T
    return _select(selected[:, :4], selected[:, 4:], conf, iou, max_det, max_cand)


def _decode_end2end(item: np.ndarray, conf: float, max_det: int) -> Detections:
    item = item[item[:, 4] > conf]
    order = _top_k(item[:, 4], max_det)
    item = item[order]
    return Detections(
        np.ascontiguousarray(item[:, :4], dtype=np.float32),
        item[:, 4].astype(np.float32),
        np.rint(item[:, 5]).astype(np.int64),
    )


def decode(
    output: np.ndarray,
    head_format: HeadFormat,
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    *,
    max_candidates: int = MAX_NMS_CANDIDATES,
) -> list[Detections]:
    """Raw head output (batch first) -> one Detections per image, boxes in network-input (letterboxed) pixels.

    yolov5: keep anchors with obj > conf, score = obj * class probability, multi-label (every class with
    score > conf is a candidate, as YOLOv5 val.py), at most max_candidates by score, class-aware NMS, then the
    max_detections best. yolov8: the same without objectness. end2end: scores > conf, best max_detections, no NMS.
    Half-precision outputs are decoded in float32.
    """
    _check_decode_args(conf_threshold, iou_threshold, max_detections, max_candidates)
    _check_output_shape(output, head_format)
    output = output.astype(np.float32, copy=False)
    results: list[Detections] = []
    for item in output:
        if head_format == "yolov5":
            results.append(_decode_yolov5(item, conf_threshold, iou_threshold, max_detections, max_candidates))
        elif head_format == "yolov8":
            results.append(_decode_yolov8(item, conf_threshold, iou_threshold, max_detections, max_candidates))
        else:
            results.append(_decode_end2end(item, conf_threshold, max_detections))
    return results
