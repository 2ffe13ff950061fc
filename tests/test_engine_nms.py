"""NMS inside the engine (tensorrt.nms: efficient_nms): the EfficientNMS_TRT graph surgery, checked on the CPU.

The plugin itself runs only in TensorRT; here the node, its attributes and the graph outputs are checked, and the
model that feeds it (boxes, scores) runs in ONNX Runtime and must carry exactly the detections of the raw head."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.conftest import VAL_IMAGES
from yoloq.backends.tensorrt.build import TensorRTBackend, engine_facts_record
from yoloq.backends.tensorrt.nms import (
    BOXES,
    NMS_OUTPUTS,
    PLUGIN_DOMAIN,
    PLUGIN_OP,
    SCORES,
    add_efficient_nms,
    efficient_nms_onnx,
    nms_inputs_model,
    pack_nms_outputs,
)
from yoloq.backends.tensorrt.versions import BuildPlan
from yoloq.config import TensorRTConfig, VariantConfig
from yoloq.errors import InputError
from yoloq.heads import DecodeSettings, decode
from yoloq.preprocess import list_images, load_preprocessed


def identity_model(shape: list[int | str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["output0"])],
        "head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([BOXES, SCORES], {"images": x})


def test_the_plugin_node_its_attributes_and_the_four_outputs():
    model = add_efficient_nms(identity_model(["batch", 7, 10]), "yolov5", DecodeSettings(0.001, 0.6, 300))
    onnx.checker.check_model(model)
    (node,) = [n for n in model.graph.node if n.op_type == PLUGIN_OP]
    assert node.domain == PLUGIN_DOMAIN and list(node.input) == [BOXES, SCORES] and list(node.output) == [*NMS_OUTPUTS]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["score_threshold"] == pytest.approx(0.001) and attributes["iou_threshold"] == pytest.approx(0.6)
    assert attributes["max_output_boxes"] == 300 and attributes["box_coding"] == 1
    assert attributes["background_class"] == -1 and attributes["plugin_version"] == b"1"
    outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(outputs) == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    assert outputs["num_dets"].elem_type == TensorProto.INT32 and outputs["det_classes"].elem_type == TensorProto.INT32
    assert [d.dim_param or d.dim_value for d in outputs["det_boxes"].shape.dim] == ["batch", 300, 4]
    assert any(o.domain == PLUGIN_DOMAIN for o in model.opset_import)


def test_the_plugins_inputs_are_the_heads_boxes_and_scores_for_both_layouts():
    rng = np.random.default_rng(0)
    yolov5 = rng.random((2, 10, 7), dtype=np.float32)  # cx cy w h obj + 2 classes
    boxes, scores = run(nms_inputs_model(identity_model(["batch", 10, 7]), "yolov5"), yolov5)
    np.testing.assert_array_equal(boxes, yolov5[:, :, :4])
    np.testing.assert_allclose(scores, yolov5[:, :, 5:] * yolov5[:, :, 4:5], rtol=1e-6)
    yolov8 = rng.random((2, 6, 10), dtype=np.float32)  # (N, 4 + 2 classes, anchors)
    boxes, scores = run(nms_inputs_model(identity_model(["batch", 6, 10]), "yolov8"), yolov8)
    np.testing.assert_array_equal(boxes, yolov8.transpose(0, 2, 1)[:, :, :4])
    np.testing.assert_array_equal(scores, yolov8.transpose(0, 2, 1)[:, :, 4:])


def test_on_yolov5n_the_plugins_inputs_carry_exactly_the_detections_of_the_raw_head(simplified):
    model = onnx.load(str(simplified.onnx_path))
    batch = np.stack([load_preprocessed(p, 640)[0] for p in list_images(VAL_IMAGES)[:2]])
    raw = ort.InferenceSession(str(simplified.onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"images": batch}
    )
    boxes, scores = run(nms_inputs_model(model, "yolov5"), batch)
    as_yolov8 = np.concatenate([boxes, scores], axis=2).transpose(0, 2, 1)  # the same candidates, no objectness
    expected_all = decode(raw[0], "yolov5", 0.001, 0.6, 300)
    for ours, expected in zip(decode(as_yolov8, "yolov8", 0.001, 0.6, 300), expected_all, strict=True):
        np.testing.assert_allclose(ours.boxes_xyxy, expected.boxes_xyxy, atol=1e-4)
        np.testing.assert_allclose(ours.scores, expected.scores, rtol=1e-5)
        np.testing.assert_array_equal(ours.classes, expected.classes)


def test_end_to_end_heads_have_nothing_to_add():
    with pytest.raises(InputError, match="end-to-end"):
        add_efficient_nms(identity_model(["batch", 300, 6]), "end2end", DecodeSettings())


def test_packed_outputs_drop_rows_past_num_dets():
    outputs = {
        "num_dets": np.array([[1], [0]], np.int32),
        "det_boxes": np.ones((2, 3, 4), np.float32),
        "det_scores": np.full((2, 3), 0.5, np.float32),
        "det_classes": np.full((2, 3), 2, np.int32),
    }
    packed = pack_nms_outputs(outputs)
    assert packed.shape == (2, 3, 6)
    assert packed[0, :, 4].tolist() == [0.5, -1, -1] and packed[1, :, 4].tolist() == [-1, -1, -1]
    found = decode(packed, "end2end", 0.25, 0.6, 300)
    assert [len(f) for f in found] == [1, 0] and found[0].classes.tolist() == [2]


def test_the_build_appends_nms_to_its_source_when_asked_and_records_end2end_facts(simplified, tmp_path):
    backend = TensorRTBackend(TensorRTConfig(nms="efficient_nms"), decoding=DecodeSettings(0.001, 0.6, 100))
    plan = BuildPlan(onnx="fp32", fp16_flag=True, int8_flag=False, calibrator=None, strongly_typed=False)
    variant = VariantConfig(name="fp16", precision="fp16", backend="tensorrt")
    source = backend._source_onnx(variant, plan, simplified.onnx_path, None, tmp_path)
    assert source.name.endswith(".nms.onnx") and source.parent == tmp_path
    assert [o.name for o in onnx.load(str(source), load_external_data=False).graph.output] == [*NMS_OUTPUTS]
    assert efficient_nms_onnx(simplified.onnx_path, "yolov5", DecodeSettings(0.001, 0.6, 100), tmp_path) == source
    facts = engine_facts_record(simplified.onnx_path, backend.settings)
    assert facts is not None and facts["head_format"] == "end2end" and len(facts["names"]) == 80
    plain = TensorRTBackend(TensorRTConfig())._source_onnx(variant, plan, simplified.onnx_path, None, tmp_path)
    assert plain == simplified.onnx_path
