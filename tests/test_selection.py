"""The selection set: disjoint from the report and calibration images, scored by agreement with FP32 or by mAP."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CALIB_IMAGES, VAL_IMAGES, VAL_LABELS
from yoloq.agreement import agreement, pseudo_truths
from yoloq.config import SelectionConfig
from yoloq.errors import InputError
from yoloq.heads import Detections
from yoloq.labels import COCO80_NAMES
from yoloq.preprocess import list_images
from yoloq.selection import SelectionScorer, load_selection_set

NAMES = list(COCO80_NAMES)


def _folder(tmp_path: Path, name: str, images: list[Path]) -> Path:
    folder = tmp_path / name / "images"
    folder.mkdir(parents=True)
    for image in images:
        shutil.copyfile(image, folder / image.name)
    return folder


def _detections(count: int, rng: np.random.Generator) -> Detections:
    corners = rng.uniform(0, 300, (count, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(20, 100, (count, 2))], axis=1).astype(np.float32)
    return Detections(boxes, rng.uniform(0.3, 1.0, count).astype(np.float32), rng.integers(0, 3, count))


def test_selection_images_must_not_be_report_or_calibration_images(tmp_path: Path) -> None:
    val = list_images(VAL_IMAGES)
    folder = _folder(tmp_path, "select", val[:4])
    config = SelectionConfig(images=folder)
    with pytest.raises(InputError, match="also validation"):
        load_selection_set(config, 80, val[:2], [])
    with pytest.raises(InputError, match="also calibration"):
        load_selection_set(config, 80, val[10:], val[3:4])
    selection = load_selection_set(config, 80, val[10:], list_images(CALIB_IMAGES))
    assert len(selection.truths) == 4 and all(len(t.classes) == 0 for t in selection.truths)  # no labels needed
    assert load_selection_set(config.model_copy(update={"num_images": 2}), 80, [], []).images == selection.images[:2]


def test_map_metric_needs_labels_and_reads_them(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "select", list_images(VAL_IMAGES)[:3])
    with pytest.raises(ValueError, match="selection.labels"):  # the config refuses it (yoloq/config.py)
        SelectionConfig(images=folder, labels=None, metric="map")
    selection = load_selection_set(SelectionConfig(images=folder, labels=VAL_LABELS, metric="map"), 80, [], [])
    assert sum(len(t.classes) for t in selection.truths) > 0
    with pytest.raises(InputError, match="not found"):
        load_selection_set(SelectionConfig(images=tmp_path / "nope"), 80, [], [])


def test_agreement_is_one_for_fp32_itself_and_drops_with_moved_boxes(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "select", list_images(VAL_IMAGES)[:4])
    selection = load_selection_set(SelectionConfig(images=folder), 80, [], [])
    rng = np.random.default_rng(0)
    reference = [_detections(10, rng) for _ in selection.truths]
    assert agreement(selection.truths, reference, reference, NAMES).map50_95 == pytest.approx(1.0)
    truths = pseudo_truths(selection.truths, reference, 0.5)
    assert all(len(t.classes) == int((d.scores >= 0.5).sum()) for t, d in zip(truths, reference, strict=True))
    moved = [Detections(d.boxes_xyxy + 8.0, d.scores, d.classes) for d in reference]
    scorer = SelectionScorer(selection, reference, NAMES)
    assert scorer.reference_score == pytest.approx(1.0)
    assert 0.0 < scorer.score(moved) < 0.9
    assert scorer.reference_score - scorer.score(moved) > 0.1
