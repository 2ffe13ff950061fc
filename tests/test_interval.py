"""The bootstrap interval of a mAP delta: pycocotools' matching re-accumulated with image weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from yoloq.config import IntervalConfig
from yoloq.heads import Detections
from yoloq.interval import delta_interval, map50_95
from yoloq.labels import ImageTruth
from yoloq.metrics import coco_map
from yoloq.report import VariantResult, interval_note, results_table, variant_metrics, with_intervals

NAMES = ["a", "b", "c"]


def matched(truths: list[ImageTruth], found: list[Detections]):
    """COCO mAP with the matching kept (what validation keeps for the delta's interval)."""
    return coco_map(truths, found, NAMES, keep_matches=True)


def scene(seed: int, images: int = 40) -> tuple[list[ImageTruth], list[Detections], list[Detections]]:
    """Random boxes, and two 'models' that find them with noise: one slightly worse than the other."""
    rng = np.random.default_rng(seed)
    truths, good, bad = [], [], []
    for i in range(images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(20, 200, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        classes = rng.integers(0, len(NAMES), n)
        truths.append(ImageTruth(i + 1, Path(f"{i}.jpg"), 640, 640, boxes, classes))
        for found, noise in ((good, 4.0), (bad, 12.0)):
            jitter = boxes + rng.normal(0, noise, boxes.shape)
            extra = rng.uniform(0, 500, (2, 4))
            extra[:, 2:] = extra[:, :2] + 50
            all_boxes = np.concatenate([jitter, extra]).astype(np.float32)
            scores = rng.uniform(0.05, 1.0, len(all_boxes)).astype(np.float32)
            labels = np.concatenate([classes, rng.integers(0, len(NAMES), 2)]).astype(np.int64)
            found.append(Detections(all_boxes, scores, labels))
    return truths, good, bad


def test_unit_weights_give_pycocotools_map_and_weights_equal_repeated_images():
    truths, good, _ = scene(0)
    result = matched(truths, good)
    assert coco_map(truths, good, NAMES).matches is None  # kept only when asked for
    assert map50_95(result.matches) == pytest.approx(result.map50_95, abs=1e-12)
    # image 3 counted twice == the data set with image 3 appearing twice (a new id, the same boxes)
    twice = [*truths, ImageTruth(999, Path("copy.jpg"), 640, 640, truths[3].boxes_xyxy, truths[3].classes)]
    weights = np.ones(len(truths))
    weights[3] = 2
    repeated = coco_map(twice, [*good, good[3]], NAMES).map50_95
    assert map50_95(result.matches, weights) == pytest.approx(repeated, abs=2e-3)  # ties ordered differently
    # an image weighted 0 is as if it were not there
    weights = np.ones(len(truths))
    weights[5:] = 0
    assert map50_95(result.matches, weights) == pytest.approx(coco_map(truths[:5], good[:5], NAMES).map50_95)


def test_a_model_that_found_nothing_scores_zero_under_every_weighting():
    truths, _, _ = scene(1)
    empty = matched(truths, [Detections.empty() for _ in truths])
    assert empty.map50_95 == 0.0 and map50_95(empty.matches, np.arange(len(truths)) % 3) == 0.0


def test_the_interval_holds_the_delta_is_reproducible_and_narrows_with_more_images():
    truths, good, bad = scene(2, images=60)
    a, b = matched(truths, good), matched(truths, bad)
    interval = delta_interval(a.matches, b.matches, draws=100, level=0.9)
    assert interval.low < b.map50_95 - a.map50_95 < interval.high and interval.images == 60
    assert delta_interval(a.matches, b.matches, draws=100, level=0.9) == interval  # fixed seed
    assert delta_interval(a.matches, a.matches, draws=20, level=0.9).high == 0.0  # a model against itself
    more_truths, more_good, more_bad = scene(2, images=240)
    wide = interval.high - interval.low
    more = delta_interval(matched(more_truths, more_good).matches, matched(more_truths, more_bad).matches, 100, 0.9)
    assert more.high - more.low < wide
    with pytest.raises(ValueError, match="same images"):
        delta_interval(a.matches, matched(more_truths, more_good).matches, 10, 0.9)


def test_results_carry_the_interval_into_the_table_json_and_metrics():
    truths, good, bad = scene(3)
    a, b = matched(truths, good), matched(truths, bad)

    def row(name: str, result) -> VariantResult:
        return VariantResult(name, name, "onnxruntime", result.map50_95, result.map50, 1.0, 1.0, 8, 1.0, Path("m"),
                             matches=result.matches)  # fmt: skip

    fp32, int8 = row("fp32", a), row("int8", b)
    int8 = VariantResult(**{**int8.__dict__, "delta_map50_95": b.map50_95 - a.map50_95})
    results = with_intervals([fp32, int8], "fp32", IntervalConfig(draws=50, level=0.8))
    assert results[0].delta_interval is None and results[1].delta_interval is not None
    assert with_intervals([fp32, int8], "fp32", IntervalConfig(draws=0))[1].delta_interval is None
    low, high = results[1].delta_interval.low, results[1].delta_interval.high
    assert f"{low * 100:+.2f} .. {high * 100:+.2f}" in results_table(results)
    assert interval_note(results).startswith("Δ interval: 80% paired bootstrap over the 40 report images (50 ")
    back = VariantResult.from_json(results[1].as_json())
    assert back.delta_interval.low == pytest.approx(low, abs=1e-5) and back.delta_interval.images == 40
    assert variant_metrics(results[1])["delta_map50_95_low"] == low
    assert interval_note([fp32]) is None


def test_the_noise_benchmark_restricts_a_matching_to_a_subset_of_images():
    from benchmarks.report_noise import subset

    truths, good, _ = scene(4)
    matches = matched(truths, good).matches
    index = np.array([2, 5, 7, 11, 30])
    part = subset(matches, index)
    alone = coco_map([truths[i] for i in index], [good[i] for i in index], NAMES).map50_95
    assert part.num_images == 5 and map50_95(part) == pytest.approx(alone, abs=1e-12)
