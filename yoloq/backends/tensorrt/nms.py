"""NMS inside the engine (`tensorrt.nms: efficient_nms`): TensorRT's EfficientNMS_TRT plugin appended to the ONNX.

`add_efficient_nms` is ONNX graph surgery with plain `onnx.helper` (no TensorRT, no onnx-graphsurgeon): the head's
raw output becomes boxes (N, anchors, 4) as cx cy w h (`box_coding` 1) and per-class scores (N, anchors, classes)
(YOLOv5: objectness x class probability; YOLOv8/11: the class scores), which feed one EfficientNMS_TRT node (domain
`TRT`; TensorRT's ONNX parser imports unknown ops as plugins by op type). Its four outputs are the graph's outputs:
`num_dets` (N, 1) int32, `det_boxes` (N, K, 4) x1 y1 x2 y2 in network-input pixels, `det_scores` (N, K),
`det_classes` (N, K) int32, with K = max detections. `pack_nms_outputs` turns them into the end2end layout
(N, K, 6) = x1 y1 x2 y2 score class, rows past num_dets scored -1, so decoding is yoloq.heads' end2end decoder.

The plugin runs class-wise NMS on every (anchor, class) score above its threshold, as yoloq's own decoder does
(multi-label); its candidate limits differ, so an NMS engine must be validated (the flow does, like every variant).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from yoloq.artifacts import atomic_path, file_sha256
from yoloq.cache import get_or_create
from yoloq.errors import InputError
from yoloq.heads import DecodeSettings, HeadFormat

PLUGIN_OP = "EfficientNMS_TRT"
PLUGIN_DOMAIN = "TRT"
NUM_DETS, DET_BOXES, DET_SCORES, DET_CLASSES = "num_dets", "det_boxes", "det_scores", "det_classes"
NMS_OUTPUTS = (NUM_DETS, DET_BOXES, DET_SCORES, DET_CLASSES)
BOXES, SCORES = "yoloq_nms_boxes", "yoloq_nms_scores"  # the plugin's inputs
_PREFIX = "/yoloq_nms/"
_INT64_MAX = np.iinfo(np.int64).max


def add_efficient_nms(model: onnx.ModelProto, head_format: HeadFormat, decoding: DecodeSettings) -> onnx.ModelProto:
    """A copy of `model` whose outputs are EfficientNMS_TRT's four, fed by its single head output."""
    return _with_nms_head(model, head_format, decoding, plugin=True)


def nms_inputs_model(model: onnx.ModelProto, head_format: HeadFormat) -> onnx.ModelProto:
    """A copy of `model` whose outputs are what the plugin would get (boxes cx cy w h, scores): runs in ONNX
    Runtime, so the surgery's arithmetic can be checked on a CPU."""
    return _with_nms_head(model, head_format, DecodeSettings(), plugin=False)


def _with_nms_head(
    model: onnx.ModelProto, head_format: HeadFormat, decoding: DecodeSettings, plugin: bool
) -> onnx.ModelProto:
    if head_format == "end2end":
        raise InputError("tensorrt.nms efficient_nms: this model's head is end-to-end and has no NMS to add")
    if len(model.graph.output) != 1:
        names = [o.name for o in model.graph.output]
        raise InputError(f"tensorrt.nms efficient_nms needs one head output; the model has {names}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    head = graph.output[0].name
    batch = _batch_dim(graph)
    nodes, inits = [], []

    def const(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), _PREFIX + name))
        return _PREFIX + name

    def slice_last(name: str, start: int, end: int, source: str) -> str:
        output = _PREFIX + name
        ends = const(f"{name}_end", [end])
        axes = const(f"{name}_axes", [2])
        nodes.append(helper.make_node("Slice", [source, const(f"{name}_start", [start]), ends, axes], [output]))
        return output

    rows = head
    if head_format == "yolov8":  # (N, 4 + nc, anchors) -> (N, anchors, 4 + nc)
        rows = _PREFIX + "rows"
        nodes.append(helper.make_node("Transpose", [head], [rows], perm=[0, 2, 1], name=_PREFIX + "Transpose"))
    nodes.append(helper.make_node("Identity", [slice_last("boxes", 0, 4, rows)], [BOXES], name=_PREFIX + "Boxes"))
    if head_format == "yolov5":  # cx cy w h obj cls...: score = objectness x class probability (as decode does)
        objectness = slice_last("objectness", 4, 5, rows)
        classes = slice_last("classes", 5, _INT64_MAX, rows)
        nodes.append(helper.make_node("Mul", [classes, objectness], [SCORES], name=_PREFIX + "Scores"))
    else:
        classes = slice_last("classes", 4, _INT64_MAX, rows)
        nodes.append(helper.make_node("Identity", [classes], [SCORES], name=_PREFIX + "Scores"))
    for i, node in enumerate(nodes):
        node.name = node.name or f"{_PREFIX}node{i}"
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    if plugin:
        graph.node.append(efficient_nms_node(decoding))
        k = decoding.max_detections
        graph.output.extend(
            [
                helper.make_tensor_value_info(NUM_DETS, TensorProto.INT32, [batch, 1]),
                helper.make_tensor_value_info(DET_BOXES, TensorProto.FLOAT, [batch, k, 4]),
                helper.make_tensor_value_info(DET_SCORES, TensorProto.FLOAT, [batch, k]),
                helper.make_tensor_value_info(DET_CLASSES, TensorProto.INT32, [batch, k]),
            ]
        )
        if not any(o.domain == PLUGIN_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    else:
        graph.output.extend(
            [
                helper.make_tensor_value_info(BOXES, TensorProto.FLOAT, [batch, None, 4]),
                helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, [batch, None, None]),
            ]
        )
    return out


def efficient_nms_node(decoding: DecodeSettings) -> onnx.NodeProto:
    """The plugin node: class-wise NMS (background_class -1: every class is a class), boxes as cx cy w h."""
    return helper.make_node(
        PLUGIN_OP,
        [BOXES, SCORES],
        list(NMS_OUTPUTS),
        name=_PREFIX + PLUGIN_OP,
        domain=PLUGIN_DOMAIN,
        plugin_version="1",
        background_class=-1,
        box_coding=1,
        iou_threshold=float(decoding.iou_threshold),
        max_output_boxes=int(decoding.max_detections),
        score_activation=0,
        score_threshold=float(decoding.conf_threshold),
    )


def _batch_dim(graph: onnx.GraphProto) -> str | int:
    dim = graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "batch")


def efficient_nms_onnx(source: Path, head_format: HeadFormat, decoding: DecodeSettings, out_dir: Path) -> Path:
    """`source` with EfficientNMS_TRT appended (`add_efficient_nms`), named by content hash and reused."""

    def produce(final: Path) -> None:
        with atomic_path(final) as tmp:
            onnx.save(add_efficient_nms(onnx.load(str(source)), head_format, decoding), str(tmp))

    key = ["efficient-nms-v1", file_sha256(source), head_format, decoding.conf_threshold, decoding.iou_threshold]
    key.append(decoding.max_detections)
    return get_or_create(out_dir, "model", key, ".nms.onnx", produce, lambda path: path).value


def has_nms_outputs(names: list[str]) -> bool:
    return set(NMS_OUTPUTS) <= set(names)


def pack_nms_outputs(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """EfficientNMS_TRT's outputs as one end2end array (N, K, 6): x1 y1 x2 y2 score class; rows past num_dets get
    score -1 (dropped by any score threshold)."""
    boxes = outputs[DET_BOXES].astype(np.float32)
    scores = outputs[DET_SCORES].astype(np.float32).copy()
    classes = outputs[DET_CLASSES].astype(np.float32)
    counts = outputs[NUM_DETS].reshape(-1).astype(np.int64)
    scores[np.arange(scores.shape[1])[None, :] >= counts[:, None]] = -1.0
    return np.concatenate([boxes, scores[..., None], classes[..., None]], axis=2)
