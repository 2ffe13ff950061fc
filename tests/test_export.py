from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import MODEL_PT
from yoloq.config import ExportConfig, ModelConfig
from yoloq.errors import InputError
from yoloq.export import export_model, facts_for_onnx, read_facts, source_kind


def test_classic_yolov5_checkpoint_exports_with_facts_in_metadata(exported):
    facts = read_facts(exported.onnx_path)
    assert (facts.family, facts.head_format, facts.stride, facts.imgsz) == ("yolov5", "yolov5", 32, 640)
    assert len(facts.names) == 80 and facts.names[0] == "person" and facts.names[-1] == "toothbrush"
    assert facts.source_sha256 == "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3"
    session = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    output = session.run(None, {exported.input_name: np.zeros((2, 3, 640, 640), np.float32)})[0]
    assert output.shape == (2, 25200, 85)  # dynamic batch axis


def test_export_is_reused_by_content_hash(exported):
    again = export_model(ModelConfig(path=MODEL_PT), ExportConfig(), exported.onnx_path.parent)
    assert again.reused and again.onnx_path == exported.onnx_path


def test_onnx_input_is_checked_and_passed_through(exported, tmp_path):
    source = tmp_path / "given.onnx"
    shutil.copyfile(exported.onnx_path, source)
    result = export_model(ModelConfig(path=source), ExportConfig(), tmp_path / "out")
    assert result.facts.head_format == "yolov5" and result.facts.names[0] == "person"


def test_facts_are_inferred_for_foreign_onnx(exported, tmp_path):
    import onnx

    model = onnx.load(str(exported.onnx_path))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    facts = facts_for_onnx(bare, 640)
    assert facts.head_format == "yolov5" and len(facts.names) == 80


def test_missing_and_corrupt_models_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        export_model(ModelConfig(path=tmp_path / "none.pt"), ExportConfig(), tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(MODEL_PT.read_bytes()[:100_000])
    with pytest.raises(InputError, match="corrupt or truncated checkpoint"):
        source_kind(truncated)
    corrupt_onnx = tmp_path / "corrupt.onnx"
    corrupt_onnx.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(InputError, match="ONNX"):
        export_model(ModelConfig(path=corrupt_onnx), ExportConfig(), tmp_path / "out")
    other = tmp_path / "model.tflite"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported file type"):
        export_model(ModelConfig(path=other), ExportConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.onnx"))


def test_ultralytics_model_yaml_exports_with_its_head_format(tmp_path):
    pytest.importorskip("ultralytics")
    import ultralytics

    yaml_path = tmp_path / "yolo11n.yaml"
    source = next(iter(__import__("pathlib").Path(ultralytics.__file__).parent.rglob("yolo11.yaml")))
    shutil.copyfile(source, yaml_path)
    result = export_model(ModelConfig(path=yaml_path, imgsz=320), ExportConfig(), tmp_path / "out")
    assert (result.facts.family, result.facts.head_format, len(result.facts.names)) == ("yolo11", "yolov8", 80)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    output = session.run(None, {result.input_name: np.zeros((2, 3, 320, 320), np.float32)})[0]
    assert output.shape == (2, 84, 2100)
