from __future__ import annotations

import shutil

import numpy as np
import onnx
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
    # TensorRT needs a fixed C, H, W: only the batch stays dynamic
    dims = onnx.load(str(result.onnx_path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims][1:] == [3, 320, 320] and dims[0].dim_param


def test_checkpoints_load_with_the_weights_only_unpickler_and_leave_sys_path_as_it_was(tmp_path, monkeypatch):
    import sys

    import torch

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    path_before = list(sys.path)
    result = export_model(ModelConfig(path=MODEL_PT, imgsz=320), ExportConfig(), tmp_path / "out")
    assert result.facts.family == "yolov5" and not result.reused
    assert sys.path == path_before
    assert not [name for name in sys.modules if name.partition(".")[0] in ("models", "utils")]
    yolov8n = MODEL_PT.parent / "yolov8n.pt"
    if yolov8n.is_file():  # an Ultralytics checkpoint, loaded by Ultralytics in its weights-only mode
        result = export_model(ModelConfig(path=yolov8n, imgsz=320), ExportConfig(), tmp_path / "out")
        assert (result.facts.family, result.facts.head_format, len(result.facts.names)) == ("yolov8", "yolov8", 80)
    assert loads and all(weights_only is True for weights_only in loads), loads


def test_yolov5_imports_are_confined_to_the_block(tmp_path):
    import sys
    import types

    from yoloq.export import yolov5_imports

    package = tmp_path / "yolov5pkg"
    (package / "models").mkdir(parents=True)
    (package / "models" / "__init__.py").write_text("")
    (package / "models" / "yolo.py").write_text("class Model:\n    pass\n")
    own_models = types.ModuleType("models")  # a `models` package of the serving process itself
    sys.modules["models"] = own_models
    path_before = list(sys.path)
    try:
        with yolov5_imports(package):
            import models.yolo

            assert models.yolo.__file__.startswith(str(package))
            sys.path.append("/appended/by/the/package")
        assert sys.path == path_before
        assert sys.modules["models"] is own_models and "models.yolo" not in sys.modules
    finally:
        sys.modules.pop("models", None)


def test_export_never_unpickles_a_malicious_checkpoint(tmp_path):
    from tests.test_checkpoint_sniff import malicious_checkpoint

    marker = tmp_path / "PWNED"
    model = malicious_checkpoint(tmp_path / "yolov5n.pt", marker)
    with pytest.raises(InputError, match="yoloq does not unpickle it"):
        export_model(ModelConfig(path=model), ExportConfig(), tmp_path / "out")
    assert not marker.exists()
