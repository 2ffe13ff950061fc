"""COCO mAP through pycocotools: real val labels, empty predictions, and a hand-computed case."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yoloq.errors import InputError
from yoloq.heads import Detections
from yoloq.labels import COCO80_NAMES, ImageTruth, load_ground_truth
from yoloq.metrics import MapResult, coco_map, per_class_table
from yoloq.preprocess import list_images

DATA = Path(__file__).resolve().parents[1] / "data" / "coco"
CLASS_NAMES = list(COCO80_NAMES)


@pytest.fixture(scope="module")
def val_truths() -> list[ImageTruth]:
    truths, _ = load_ground_truth(list_images(DATA / "val" / "images"), DATA / "val" / "labels", 80)
    return truths


def _perfect(truths: list[ImageTruth]) -> list[Detections]:
    return [
        Detections(t.boxes_xyxy.astype(np.float32), np.full(len(t.classes), 0.9, np.float32), t.classes.copy())
        for t in truths
    ]


def test_perfect_predictions_on_real_val_score_one(val_truths: list[ImageTruth]) -> None:
    result = coco_map(val_truths, _perfect(val_truths), CLASS_NAMES)
    assert result.map50_95 == pytest.approx(1.0)
    assert result.map50 == pytest.approx(1.0)
    assert (result.num_images, result.num_boxes) == (64, 440)
    present = {CLASS_NAMES[c] for t in val_truths for c in t.classes.tolist()}
    assert set(result.per_class_ap) == present
    assert all(ap == pytest.approx(1.0) for ap in result.per_class_ap.values())


def test_empty_predictions_score_zero(val_truths: list[ImageTruth]) -> None:
    result = coco_map(val_truths, [Detections.empty() for _ in val_truths], CLASS_NAMES)
    assert (result.map50_95, result.map50) == (0.0, 0.0)
    assert (result.num_images, result.num_boxes) == (64, 440)
    assert result.per_class_ap and set(result.per_class_ap.values()) == {0.0}


def test_wrong_class_predictions_score_zero(val_truths: list[ImageTruth]) -> None:
    wrong = _perfect(val_truths)
    for found in wrong:
        found.classes = (found.classes + 1) % 80
    result = coco_map(val_truths, wrong, CLASS_NAMES)
    assert result.map50_95 < 0.05  # only where another box of the next class happens to sit in the same place


def _truth(image_id: int, width: int, height: int, boxes: list[list[float]], classes: list[int]) -> ImageTruth:
    return ImageTruth(
        image_id=image_id,
        path=Path(f"{image_id:012d}.jpg"),
        width=width,
        height=height,
        boxes_xyxy=np.array(boxes, dtype=np.float64).reshape(-1, 4),
        classes=np.array(classes, dtype=np.int64),
    )


def _detections(boxes: list[list[float]], scores: list[float], classes: list[int]) -> Detections:
    return Detections(
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(scores, dtype=np.float32),
        np.array(classes, dtype=np.int64),
    )


def _hand_case() -> tuple[list[ImageTruth], list[Detections]]:
    truths = [
        _truth(1, 200, 200, [[0, 0, 100, 100]], [0]),
        _truth(2, 300, 200, [[100, 50, 150, 150]], [1]),
        _truth(3, 100, 100, [], []),  # background image: still part of the evaluation
    ]
    detections = [
        # class 0: IoU 7200 / 10000 = 0.72 -> a hit at IoU thresholds 0.50 ... 0.70 (5 of 10), a miss above
        _detections([[0, 0, 100, 72]], [0.95], [0]),
        # class 1: a false positive ranked above an exact hit -> precision 0.5 at recall 1 at every threshold
        _detections([[200, 0, 250, 40], [100, 50, 150, 150]], [0.9, 0.8], [1, 1]),
        # a low-scored false positive of class 0 on the background image does not lower class 0's AP
        _detections([[10, 10, 20, 20]], [0.1], [0]),
    ]
    return truths, detections


def test_hand_computed_case() -> None:
    truths, detections = _hand_case()
    result = coco_map(truths, detections, ["a", "b", "c"])
    # class a: AP 1.0 at 5 thresholds, 0 at 5 -> 0.5; AP50 1.0. class b: 0.5 everywhere.
    assert result.per_class_ap == pytest.approx({"a": 0.5, "b": 0.5})
    assert result.map50_95 == pytest.approx(0.5)
    assert result.map50 == pytest.approx(0.75)
    assert (result.num_images, result.num_boxes) == (3, 2)


def test_hand_computed_case_matches_pycocotools_from_files(tmp_path: Path) -> None:
    truths, detections = _hand_case()
    gt = {
        "images": [{"id": t.image_id, "width": t.width, "height": t.height} for t in truths],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
    }
    results = []
    for truth, found in zip(truths, detections, strict=True):
        for (x1, y1, x2, y2), c in zip(truth.boxes_xyxy.tolist(), truth.classes.tolist(), strict=True):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": truth.image_id,
                    "category_id": c + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for (x1, y1, x2, y2), s, c in zip(
            found.boxes_xyxy.tolist(), found.scores.tolist(), found.classes.tolist(), strict=True
        ):
            results.append(
                {"image_id": truth.image_id, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            )
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(str(dt_path)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ours = coco_map(truths, detections, ["a", "b", "c"])
    assert ours.map50_95 == pytest.approx(evaluation.stats[0])
    assert ours.map50 == pytest.approx(evaluation.stats[1])


def test_coco_map_is_silent(val_truths: list[ImageTruth], capsys: pytest.CaptureFixture[str]) -> None:
    coco_map(val_truths[:4], _perfect(val_truths[:4]), CLASS_NAMES)
    assert capsys.readouterr().out == ""


def test_coco_map_rejects_bad_input(val_truths: list[ImageTruth]) -> None:
    with pytest.raises(InputError, match="64 ground-truth images but 63 detection lists"):
        coco_map(val_truths, _perfect(val_truths)[:63], CLASS_NAMES)
    with pytest.raises(InputError, match="outside 0..1"):
        coco_map(val_truths, _perfect(val_truths), ["a", "b"])
    empty = [_truth(1, 10, 10, [], [])]
    with pytest.raises(InputError, match="no boxes"):
        coco_map(empty, [Detections.empty()], CLASS_NAMES)


def test_per_class_table_sorted_by_ap() -> None:
    result = MapResult(0.5, 0.7, {"cat": 0.25, "dog": 0.75, "bird": 0.25}, 3, 9)
    table = per_class_table(result)
    assert table.splitlines() == [
        "| class | AP50-95 |",
        "|---|---:|",
        "| dog | 0.7500 |",
        "| bird | 0.2500 |",
        "| cat | 0.2500 |",
    ]
