"""Head-format detection, decoding and class-aware NMS, on small hand-made outputs."""

from __future__ import annotations

import time

import numpy as np
import pytest

from yoloq.errors import InputError
from yoloq.heads import Detections, decode, detect_head_format, nms


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)


def reference_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_det: int) -> list[int]:
    """Plain greedy class-aware NMS (torchvision semantics: suppress when IoU > threshold)."""
    keep: list[int] = []
    for index in np.argsort(-scores, kind="stable"):
        same = [k for k in keep if classes[k] == classes[index]]
        if same and (_iou(boxes[index].astype(np.float64), boxes[same].astype(np.float64)) > iou).any():
            continue
        keep.append(int(index))
        if len(keep) == max_det:
            break
    return keep


def _yolov5_row(cx: float, cy: float, w: float, h: float, obj: float, probs: dict[int, float], nc: int) -> list[float]:
    row = [cx, cy, w, h, obj] + [0.0] * nc
    for class_index, prob in probs.items():
        row[5 + class_index] = prob
    return row


@pytest.mark.parametrize(
    ("shape", "num_classes", "expected"),
    [
        ((1, 25200, 85), 80, "yolov5"),
        ((8, 6300, 85), 80, "yolov5"),
        ((1, 84, 8400), 80, "yolov8"),
        ((16, 84, 2100), 80, "yolov8"),
        ((1, 300, 6), 80, "end2end"),
        ((4, 100, 6), 80, "end2end"),
        ((1, 25200, 6), 1, "yolov5"),
        ((1, 300, 6), 1, "end2end"),
        ((1, 5, 8400), 1, "yolov8"),
        ((1, 25200, 8), 3, "yolov5"),
    ],
)
def test_detect_head_format(shape: tuple[int, ...], num_classes: int, expected: str) -> None:
    assert detect_head_format(shape, num_classes) == expected


@pytest.mark.parametrize(("shape", "num_classes"), [((1, 25200, 85), 20), ((25200, 85), 80), ((1, 2, 3, 4), 80)])
def test_unknown_head_shape_lists_supported_shapes(shape: tuple[int, ...], num_classes: int) -> None:
    with pytest.raises(InputError) as caught:
        detect_head_format(shape, num_classes)
    message = str(caught.value)
    assert str(tuple(shape)) in message
    for supported in ("(1, 25200, 85)", "(1, 84, 8400)", "(1, 300, 6)"):
        assert supported in message


def test_nms_matches_numpy_reference_on_random_boxes() -> None:
    rng = np.random.default_rng(7)
    for trial in range(20):
        n = 200
        xy = rng.uniform(-20, 200, (n, 2))
        wh = rng.uniform(5, 80, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        scores = rng.choice(np.linspace(0.05, 0.95, 30), n).astype(np.float32)  # many ties
        classes = rng.integers(0, 4, n).astype(np.int64)
        for iou, max_det in ((0.45, 300), (0.6, 300), (0.6, 15)):
            kept = nms(boxes, scores, classes, iou, max_det)
            assert kept.dtype == np.int64
            assert kept.tolist() == reference_nms(boxes, scores, classes, iou, max_det), (trial, iou, max_det)


def test_nms_is_class_aware_and_keeps_zero_scores() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 9], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.0], dtype=np.float32)
    classes = np.array([0, 0, 1, 0], dtype=np.int64)
    assert nms(boxes, scores, classes, 0.5, 10).tolist() == [0, 2, 3]
    assert nms(boxes, scores, classes, 0.95, 10).tolist() == [0, 1, 2, 3]  # IoU 0.9 is not > 0.95
    assert nms(boxes, scores, classes, 0.5, 2).tolist() == [0, 2]
    assert nms(boxes[:0], scores[:0], classes[:0], 0.5, 10).shape == (0,)


def test_decode_yolov5_multilabel_objectness_and_nms() -> None:
    nc = 3
    rows = [
        _yolov5_row(100, 100, 20, 40, 0.9, {0: 0.8, 2: 0.5}, nc),  # two labels: 0.72 (class 0) and 0.45 (class 2)
        _yolov5_row(101, 100, 20, 40, 0.9, {0: 0.7}, nc),  # 0.63, same place as row 0, class 0 -> suppressed
        _yolov5_row(300, 300, 10, 10, 0.0005, {1: 1.0}, nc),  # objectness below conf -> dropped
        _yolov5_row(400, 300, 10, 10, 0.5, {1: 0.001}, nc),  # obj * cls = 0.0005 below conf -> dropped
        _yolov5_row(500, 500, 30, 30, 0.4, {1: 0.5}, nc),  # 0.2
    ]
    output = np.array([rows, rows[::-1]], dtype=np.float32)
    results = decode(output, "yolov5", conf_threshold=0.001, iou_threshold=0.6, max_detections=300)
    assert len(results) == 2
    for found in results:
        assert found.boxes_xyxy.dtype == np.float32 and found.scores.dtype == np.float32
        assert found.classes.dtype == np.int64
        np.testing.assert_allclose(found.scores, [0.72, 0.45, 0.2], rtol=1e-6)
        assert found.classes.tolist() == [0, 2, 1]
        np.testing.assert_allclose(found.boxes_xyxy[0], [90, 80, 110, 120])
        np.testing.assert_allclose(found.boxes_xyxy[1], [90, 80, 110, 120])
        np.testing.assert_allclose(found.boxes_xyxy[2], [485, 485, 515, 515])
    top1 = decode(output, "yolov5", 0.001, 0.6, max_detections=1)[0]
    assert top1.classes.tolist() == [0] and len(top1) == 1
    high = decode(output, "yolov5", 0.5, 0.6, 300)[0]
    assert high.scores.tolist() == pytest.approx([0.72])  # 0.63 is suppressed, 0.45 and 0.2 are below conf
    no_nms = decode(output, "yolov5", 0.001, 1.0, 300)[0]
    assert no_nms.scores.tolist() == pytest.approx([0.72, 0.63, 0.45, 0.2])


def test_decode_yolov5_keeps_only_max_candidates_before_nms() -> None:
    nc = 2
    rows = [
        _yolov5_row(100, 100, 20, 20, 1.0, {0: 0.9}, nc),
        _yolov5_row(100, 100, 20, 20, 1.0, {1: 0.8}, nc),
        _yolov5_row(300, 300, 20, 20, 1.0, {0: 0.7}, nc),
    ]
    output = np.array([rows], dtype=np.float32)
    assert len(decode(output, "yolov5", 0.001, 0.6, 300)[0]) == 3
    capped = decode(output, "yolov5", 0.001, 0.6, 300, max_candidates=2)[0]
    assert capped.scores.tolist() == pytest.approx([0.9, 0.8])


def test_decode_yolov8_matches_yolov5_without_objectness() -> None:
    nc = 3
    # columns are anchors: cx cy w h then class scores
    anchors = np.array(
        [
            [100, 100, 20, 40, 0.72, 0.0, 0.45],
            [101, 100, 20, 40, 0.63, 0.0, 0.0],
            [300, 300, 10, 10, 0.0005, 0.0009, 0.0],
            [500, 500, 30, 30, 0.0, 0.2, 0.0],
        ],
        dtype=np.float32,
    )
    output = np.stack([anchors.T, anchors.T])
    assert detect_head_format(output.shape, nc) == "yolov8"
    results = decode(output, "yolov8", 0.001, 0.6, 300)
    for found in results:
        np.testing.assert_allclose(found.scores, [0.72, 0.45, 0.2], rtol=1e-6)
        assert found.classes.tolist() == [0, 2, 1]
        np.testing.assert_allclose(found.boxes_xyxy[2], [485, 485, 515, 515])


def test_decode_end2end_thresholds_and_takes_top_without_nms() -> None:
    rows = np.zeros((1, 300, 6), dtype=np.float32)
    rows[0, 0] = [10, 10, 50, 50, 0.3, 4]
    rows[0, 1] = [10, 10, 50, 50, 0.9, 4]  # same box, same class: both stay, no NMS
    rows[0, 2] = [60, 60, 90, 95, 0.6, 7]
    rows[0, 3] = [1, 1, 2, 2, 0.0001, 1]  # below conf
    found = decode(rows, "end2end", 0.001, 0.6, 300)[0]
    np.testing.assert_allclose(found.scores, [0.9, 0.6, 0.3])
    assert found.classes.tolist() == [4, 7, 4]
    np.testing.assert_allclose(found.boxes_xyxy[1], [60, 60, 90, 95])
    assert found.boxes_xyxy.dtype == np.float32 and found.classes.dtype == np.int64
    assert len(decode(rows, "end2end", 0.001, 0.6, 2)[0]) == 2


def test_decode_nothing_above_threshold_gives_empty_detections() -> None:
    for head, shape in (("yolov5", (2, 50, 85)), ("yolov8", (2, 84, 50)), ("end2end", (2, 300, 6))):
        results = decode(np.zeros(shape, dtype=np.float32), head, 0.001, 0.6, 300)
        assert len(results) == 2
        for found in results:
            assert found.boxes_xyxy.shape == (0, 4) and found.scores.shape == (0,) and found.classes.shape == (0,)
            assert found.boxes_xyxy.dtype == np.float32 and found.classes.dtype == np.int64
    assert len(Detections.empty()) == 0


def test_decode_half_precision_and_non_finite_boxes() -> None:
    nc = 2
    rows = [
        _yolov5_row(float("nan"), 100, 20, 20, 1.0, {0: 0.95}, nc),  # a broken row must not suppress the rest
        _yolov5_row(100, 100, 20, 20, 0.5, {0: 0.5}, nc),
        _yolov5_row(104, 100, 20, 20, 0.5, {0: 0.4}, nc),
    ]
    output = np.array([rows], dtype=np.float16)
    found = decode(output, "yolov5", 0.001, 0.6, 300)[0]
    assert found.scores.dtype == np.float32
    np.testing.assert_allclose(found.scores, [0.25], rtol=1e-3)
    np.testing.assert_allclose(found.boxes_xyxy[0], [90, 90, 110, 110])


def test_decode_rejects_mismatched_shape_and_bad_thresholds() -> None:
    with pytest.raises(InputError, match="not a end2end head output"):
        decode(np.zeros((1, 300, 7), dtype=np.float32), "end2end", 0.001, 0.6, 300)
    with pytest.raises(ValueError, match="conf_threshold"):
        decode(np.zeros((1, 300, 6), dtype=np.float32), "end2end", 1.5, 0.6, 300)
    with pytest.raises(ValueError, match="max_detections"):
        decode(np.zeros((1, 300, 6), dtype=np.float32), "end2end", 0.001, 0.6, 0)


def test_decode_full_yolov5_worst_case_stays_bounded() -> None:
    """Not a benchmark (the machine may be busy): a guard against a decode that goes quadratic (seconds)."""
    rng = np.random.default_rng(0)
    batch, anchors, nc = 8, 25200, 80
    output = np.empty((batch, anchors, 5 + nc), dtype=np.float32)
    output[..., 0:2] = rng.uniform(0, 640, (batch, anchors, 2))
    output[..., 2:4] = rng.uniform(4, 200, (batch, anchors, 2))
    # worst case for conf 0.001: obj and every class probability uniform, so ~2 M candidates per image
    output[..., 4:] = rng.uniform(0, 1, (batch, anchors, 1 + nc))
    decode(output[:1], "yolov5", 0.001, 0.6, 300)  # warm up
    start = time.perf_counter()
    results = decode(output, "yolov5", 0.001, 0.6, 300)
    per_image = (time.perf_counter() - start) / batch
    assert [len(r) for r in results] == [300] * batch
    assert per_image < 1.0, f"decode took {per_image * 1000:.0f} ms per image"
