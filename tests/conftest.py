"""Shared fixtures: the real model and data shipped in data/, exported once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # no INFO line from the temporary server at exit

PROJECT = Path(__file__).resolve().parents[1]
DATA = PROJECT / "data"
MODEL_PT = DATA / "models" / "yolov5n.pt"
CALIB_IMAGES = DATA / "coco" / "calib" / "images"
VAL_IMAGES = DATA / "coco" / "val" / "images"
VAL_LABELS = DATA / "coco" / "val" / "labels"


def shipped() -> dict:
    """The shipped params.yaml as a dict, for tests that change a key."""
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


def write_params(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """The real yolov5n checkpoint exported to ONNX by the export stage (once per session)."""
    from yoloq.config import ExportConfig, ModelConfig
    from yoloq.export import export_model

    return export_model(ModelConfig(path=MODEL_PT), ExportConfig(), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def simplified(exported, tmp_path_factory: pytest.TempPathFactory):
    from yoloq.config import SimplifyConfig
    from yoloq.preprocess import list_images
    from yoloq.simplify import simplify_model

    images = list_images(CALIB_IMAGES)
    return simplify_model(
        exported.onnx_path, images, exported.input_name, 640, SimplifyConfig(), tmp_path_factory.mktemp("simplify")
    )
