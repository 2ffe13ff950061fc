"""How sure is a mAP delta? A paired bootstrap interval over the report images.

A mAP50-95 difference measured on a few hundred COCO images moves by several tenths of a point from one image
sample to the next (measured, README "Which images do what": on 320 images the printed INT8-vs-FP32 delta lies
within 0.3 points of the same model's delta on 589 other images only 58 % of the time). So every delta the run
prints comes with an interval: the images are resampled with replacement, the same resample for both models, and
mAP50-95 is re-accumulated for each.

The matching of detections to ground truth (the expensive part) is pycocotools' own (`COCOeval.evaluate`), done
once; `Matches` keeps, per detection, its image, category, score and true/false positive flag at each IoU
threshold, and `map50_95` re-runs `COCOeval.accumulate`'s arithmetic (area all, maxDets 100, 101 recall points)
with a weight per image. With every weight 1 it equals pycocotools' mAP50-95 (`tests/test_interval.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from yoloq.labels import ImageTruth

RECALL_POINTS = np.linspace(0.0, 1.0, 101)
THRESHOLDS = 10  # IoU 0.50, 0.55, ..., 0.95


@dataclass(frozen=True, eq=False)
class Matches:
    """Per-detection COCO matching of one model on a list of images (pycocotools' `evalImgs`, area all)."""

    image: np.ndarray  # (D,) index of the detection's image in the evaluated list
    category: np.ndarray  # (D,) category index (column of `ground_truth`)
    score: np.ndarray  # (D,)
    true_positive: np.ndarray  # (D, T) bool, per IoU threshold
    false_positive: np.ndarray  # (D, T) bool (a detection matched to an ignored box is neither)
    ground_truth: np.ndarray  # (images, categories) int: boxes that count, per image and category

    @property
    def num_images(self) -> int:
        return int(self.ground_truth.shape[0])


def matches_from_evaluation(evaluation: Any, image_ids: list[int]) -> Matches:
    """The matching a finished `COCOeval.evaluate()` computed, for area range "all" and the largest maxDets, with
    detections in the order `accumulate` sorts them from (image by image, each image's by score)."""
    params = evaluation.params
    area_all = list(params.areaRng[0])
    categories = {category: index for index, category in enumerate(params.catIds)}
    position = {image_id: index for index, image_id in enumerate(image_ids)}
    max_det = params.maxDets[-1]
    ground_truth = np.zeros((len(image_ids), len(categories)), dtype=np.int64)
    image, category, score, tp, fp = [], [], [], [], []
    for entry in evaluation.evalImgs:
        if entry is None or list(entry["aRng"]) != area_all:
            continue
        row, column = position[entry["image_id"]], categories[entry["category_id"]]
        ground_truth[row, column] = int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
        found = len(entry["dtScores"][:max_det])
        if not found:
            continue
        matched = np.asarray(entry["dtMatches"])[:, :found] > 0
        ignored = np.asarray(entry["dtIgnore"])[:, :found].astype(bool)
        image.append(np.full(found, row))
        category.append(np.full(found, column))
        score.append(np.asarray(entry["dtScores"][:found], dtype=np.float64))
        tp.append((matched & ~ignored).T)
        fp.append((~matched & ~ignored).T)
    if not image:
        return _without_detections(ground_truth, len(params.iouThrs))
    return Matches(
        np.concatenate(image),
        np.concatenate(category),
        np.concatenate(score),
        np.concatenate(tp),
        np.concatenate(fp),
        ground_truth,
    )


def no_detections(truths: list[ImageTruth], num_classes: int) -> Matches:
    """The matching of a model that found nothing: only the ground-truth counts."""
    ground_truth = np.zeros((len(truths), num_classes), dtype=np.int64)
    for row, truth in enumerate(truths):
        np.add.at(ground_truth[row], truth.classes, 1)
    return _without_detections(ground_truth, THRESHOLDS)


def _without_detections(ground_truth: np.ndarray, thresholds: int) -> Matches:
    empty = np.zeros(0, dtype=np.int64)
    flags = np.zeros((0, thresholds), dtype=bool)
    return Matches(empty, empty, np.zeros(0), flags, flags, ground_truth)


def map50_95(matches: Matches, weights: np.ndarray | None = None) -> float:
    """mAP50-95 as `COCOeval.accumulate` computes it, with each image counted `weights[i]` times (all 1: the
    plain mAP). Categories with no box in the weighted images do not count, as in pycocotools."""
    w = np.ones(matches.num_images) if weights is None else np.asarray(weights, dtype=np.float64)
    boxes = w @ matches.ground_truth
    det_weight = w[matches.image]
    keep = det_weight > 0
    # pycocotools sorts each category's detections by score, stably, from the image-by-image order
    order = np.lexsort((np.nonzero(keep)[0], -matches.score[keep], matches.category[keep]))
    category = matches.category[keep][order]
    weight = det_weight[keep][order][:, None]
    tp = matches.true_positive[keep][order] * weight
    fp = matches.false_positive[keep][order] * weight
    starts = np.searchsorted(category, np.arange(len(boxes)), side="left")
    ends = np.searchsorted(category, np.arange(len(boxes)), side="right")
    per_category = []
    for c in np.nonzero(boxes > 0)[0]:
        start, end = starts[c], ends[c]
        if start == end:
            per_category.append(0.0)
            continue
        tps, fps = np.cumsum(tp[start:end], axis=0), np.cumsum(fp[start:end], axis=0)
        recall = tps / boxes[c]
        precision = np.maximum.accumulate((tps / (tps + fps + np.spacing(1)))[::-1], axis=0)[::-1]
        total = 0.0
        for t in range(recall.shape[1]):
            index = np.searchsorted(recall[:, t], RECALL_POINTS, side="left")
            total += precision[index[index < len(recall)], t].sum()
        per_category.append(total / (len(RECALL_POINTS) * recall.shape[1]))
    return float(np.mean(per_category)) if per_category else 0.0


@dataclass(frozen=True)
class DeltaInterval:
    """A central `level` bootstrap interval of mAP50-95(variant) - mAP50-95(reference), in mAP units."""

    low: float
    high: float
    level: float
    draws: int
    images: int  # how many report images were resampled

    def describe(self) -> str:
        return f"{self.low * 100:+.2f} .. {self.high * 100:+.2f}"


def delta_interval(reference: Matches, variant: Matches, draws: int, level: float, seed: int = 0) -> DeltaInterval:
    """Paired bootstrap: `draws` resamples of the images (with replacement, the same for both models; a fixed
    seed, so a re-run prints the same interval), the delta of their re-accumulated mAP50-95 each time."""
    if reference.num_images != variant.num_images:
        raise ValueError(f"paired bootstrap needs the same images: {reference.num_images} vs {variant.num_images}")
    rng = np.random.default_rng(seed)
    n = reference.num_images
    deltas = np.empty(draws)
    for d in range(draws):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        deltas[d] = map50_95(variant, weights) - map50_95(reference, weights)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(deltas, [tail, 1.0 - tail])
    return DeltaInterval(float(low), float(high), level, draws, n)
