"""A real Ultralytics checkpoint: yoloq's FP32 detections agree with Ultralytics' own `val` on the same images.

Both detection sets are scored by one metric (pycocotools, yoloq.metrics) against the same labels, so what is
compared is the detections, not the two tools' mAP formulas (Ultralytics' own metric reads 0.2-0.4 points lower
than pycocotools on these images: README, "Ultralytics checkpoints").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import DATA, VAL_IMAGES, VAL_LABELS
from yoloq.backends.onnxruntime import OnnxRuntimeRunner
from yoloq.config import ExportConfig, ModelConfig, ValidationConfig
from yoloq.export import export_model
from yoloq.heads import Detections
from yoloq.labels import load_ground_truth
from yoloq.metrics import coco_map
from yoloq.preprocess import list_images
from yoloq.validate import detect

pytestmark = pytest.mark.slow  # an export and an Ultralytics val run: about a minute
YOLOV8N = DATA / "models" / "yolov8n.pt"
IMAGES = 16


def _ultralytics_detections(tmp_path: Path, images: list[Path], names: list[str]) -> list[Detections]:
    """Ultralytics' `val` predictions (its COCO json) on `images`: square 640 letterbox (rect=False), conf 0.001,
    NMS IoU 0.6, 300 per image: the settings yoloq validates with."""
    from ultralytics import YOLO

    dataset = tmp_path / "dataset"
    (dataset / "images").mkdir(parents=True)
    (dataset / "labels").mkdir()
    for image in images:
        shutil.copyfile(image, dataset / "images" / image.name)
        label = VAL_LABELS / f"{image.stem}.txt"
        if label.is_file():
            shutil.copyfile(label, dataset / "labels" / label.name)
    spec = dataset / "data.yaml"
    spec.write_text(yaml.safe_dump({"path": str(dataset), "train": "images", "val": "images", "names": names}))
    model = YOLO(str(YOLOV8N))
    model.val(
        data=str(spec),
        imgsz=640,
        batch=1,
        conf=0.001,
        iou=0.6,
        max_det=300,
        rect=False,
        half=False,
        device="cpu",
        save_json=True,
        plots=False,
        verbose=False,
        project=str(tmp_path / "val"),
        name="run",
    )
    rows = json.loads(next((tmp_path / "val").rglob("predictions.json")).read_text())
    by_image: dict[int, list[dict]] = {}
    for row in rows:
        by_image.setdefault(int(row["image_id"]), []).append(row)
    found = []
    for image in images:
        mine = by_image.get(int(image.stem), [])
        xywh = np.array([r["bbox"] for r in mine], np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        scores = np.array([r["score"] for r in mine], np.float32)
        classes = np.array([r["category_id"] - 1 for r in mine], np.int64)  # not COCO: category = class + 1
        found.append(Detections(boxes, scores, classes))
    return found


def test_fp32_detections_agree_with_ultralytics_val(tmp_path: Path) -> None:
    images = list_images(VAL_IMAGES)[:IMAGES]
    exported = export_model(ModelConfig(path=YOLOV8N), ExportConfig(), tmp_path / "export")
    facts = exported.facts
    assert facts.family == "yolov8" and facts.head_format == "yolov8" and len(facts.names) == 80
    truths, _ = load_ground_truth(images, VAL_LABELS, len(facts.names))
    config = ValidationConfig(images=VAL_IMAGES, labels=VAL_LABELS)
    ours = detect(OnnxRuntimeRunner(exported.onnx_path), images, facts.head_format, facts.imgsz, config)
    theirs = _ultralytics_detections(tmp_path, images, facts.names)
    ours_map, theirs_map = coco_map(truths, ours, facts.names).map50_95, coco_map(truths, theirs, facts.names).map50_95
    print(f"pycocotools mAP50-95 on {IMAGES} images: yoloq FP32 {ours_map:.4f}, Ultralytics val {theirs_map:.4f}")
    assert ours_map > 0.3
    assert abs(ours_map - theirs_map) < 0.001  # within 0.1 points
