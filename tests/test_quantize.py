"""Quantization: head-tail graph analysis on hand-built heads, calibration maths, and end-to-end Q/DQ output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloq.calibration_data import CalibrationDataLoader
from yoloq.errors import InputError
from yoloq.preprocess import list_images
from yoloq.quantize import (
    analyze_head,
    entropy_amax,
    head_tail_nodes,
    name_nodes,
    percentile_amax,
    quantize_qdq,
)

CALIB_IMAGES = Path(__file__).resolve().parents[1] / "data" / "coco" / "calib" / "images"
SIZE = 32


class _Graph:
    """A tiny builder: named nodes, random Conv weights, a float input 'images' (N, 3, SIZE, SIZE)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(0)

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, name: str, inputs: list[str], outputs: int = 1, **attrs: object) -> list[str]:
        names = [f"{name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, **attrs))
        return names

    def conv(self, name: str, x: str, cin: int, cout: int, k: int = 1, stride: int = 1, bias: bool = True) -> str:
        w = self.const(f"{name}.w", (self.rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32))
        inputs = [x, w] + ([self.const(f"{name}.b", np.zeros(cout, np.float32))] if bias else [])
        return self.node("Conv", name, inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)[0]

    def silu(self, name: str, x: str) -> str:
        sig = self.node("Sigmoid", f"{name}/sig", [x])[0]
        return self.node("Mul", f"{name}/mul", [x, sig])[0]

    def shape(self, name: str, dims: list[int]) -> str:
        return self.const(name, np.array(dims, np.int64))

    def model(self, output: str, output_shape: list[int | str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "fixture",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def yolov5_like() -> onnx.ModelProto:
    """Stem conv + SiLU + residual Add, then a YOLOv5 Detect level: 1x1 conv -> (N,3,7,H,W) decode -> (N,A,7)."""
    g = _Graph()
    x = g.silu("stem/act", g.conv("stem", "images", 3, 8, 3, 2))
    y = g.silu("block/act", g.conv("block", x, 8, 8, 3))
    x = g.node("Add", "block/add", [x, y])[0]
    h = SIZE // 2
    p = g.conv("head", x, 8, 3 * 7)
    p = g.node("Reshape", "decode/reshape", [p, g.shape("s5", [-1, 3, 7, h, h])])[0]
    p = g.node("Transpose", "decode/transpose", [p], perm=[0, 1, 3, 4, 2])[0]
    p = g.node("Sigmoid", "decode/sigmoid", [p])[0]
    xy, wh, conf = g.node("Split", "decode/split", [p, g.shape("split", [2, 2, 3])], outputs=3, axis=4)
    xy = g.node("Mul", "decode/xy_mul", [xy, g.const("two", np.array(2.0, np.float32))])[0]
    xy = g.node("Add", "decode/xy_add", [xy, g.const("grid", np.zeros((1, 3, h, h, 2), np.float32))])[0]
    wh = g.node("Pow", "decode/wh_pow", [g.node("Mul", "decode/wh_mul", [wh, "two"])[0], "two"])[0]
    p = g.node("Concat", "decode/concat", [xy, wh, conf], axis=4)[0]
    out = g.node("Reshape", "decode/flatten", [p, g.shape("s3", [-1, 3 * h * h, 7])])[0]
    return g.model(out, ["N", 3 * h * h, 7])


def yolov8_like() -> onnx.ModelProto:
    """Backbone with an attention-style Reshape round trip, then a YOLOv8 head: box/cls convs, DFL, decode."""
    g = _Graph()
    x = g.silu("stem/act", g.conv("stem", "images", 3, 8, 3, 2))
    h = SIZE // 2
    a = g.node("Reshape", "attn/flatten", [x, g.shape("sa", [-1, 8, h * h])])[0]
    a = g.node("Softmax", "attn/softmax", [a], axis=-1)[0]
    a = g.node("Reshape", "attn/unflatten", [a, g.shape("sb", [-1, 8, h, h])])[0]
    x = g.silu("proj/act", g.conv("proj", a, 8, 8))
    box = g.conv("head/box", g.silu("head/box0/act", g.conv("head/box0", x, 8, 8, 3)), 8, 16)  # 4 sides x 4 bins
    cls = g.conv("head/cls", g.silu("head/cls0/act", g.conv("head/cls0", x, 8, 8, 3)), 8, 2)
    p = g.node("Concat", "head/cat", [box, cls], axis=1)[0]
    p = g.node("Reshape", "head/flatten", [p, g.shape("sf", [-1, 18, h * h])])[0]
    box, cls = g.node("Split", "head/split", [p, g.shape("split", [16, 2])], outputs=2, axis=1)
    d = g.node("Reshape", "dfl/reshape", [box, g.shape("sd", [-1, 4, 4, h * h])])[0]
    d = g.node("Transpose", "dfl/transpose", [d], perm=[0, 2, 1, 3])[0]
    d = g.node("Softmax", "dfl/softmax", [d], axis=1)[0]
    w = g.const("dfl.w", np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1))
    d = g.node("Conv", "dfl/conv", [d, w], kernel_shape=[1, 1])[0]
    d = g.node("Reshape", "dfl/out", [d, g.shape("so", [-1, 4, h * h])])[0]
    d = g.node("Mul", "decode/stride", [d, g.const("stride", np.array(2.0, np.float32))])[0]
    c = g.node("Sigmoid", "decode/cls_sigmoid", [cls])[0]
    out = g.node("Concat", "decode/concat", [d, c], axis=1)[0]
    return g.model(out, ["N", 6, h * h])


def test_yolov5_tail_is_the_decode_after_the_head_conv() -> None:
    tail = head_tail_nodes(yolov5_like())
    assert tail == [
        "decode/reshape",
        "decode/transpose",
        "decode/sigmoid",
        "decode/split",
        "decode/xy_mul",
        "decode/xy_add",
        "decode/wh_mul",
        "decode/wh_pow",
        "decode/concat",
        "decode/flatten",
    ]


def test_yolov8_tail_includes_dfl_but_not_backbone_reshapes() -> None:
    tail = set(head_tail_nodes(yolov8_like()))
    assert {"head/cat", "head/flatten", "head/split", "dfl/softmax", "dfl/conv", "decode/cls_sigmoid"} <= tail
    assert {"decode/concat", "decode/stride", "dfl/out"} <= tail
    for kept in ("head/box", "head/cls", "head/box0", "proj", "attn/flatten", "attn/softmax", "stem"):
        assert kept not in tail


def test_stem_and_head_convs() -> None:
    v5 = analyze_head(yolov5_like())
    assert (v5.stem_convs, v5.head_convs) == (["stem"], ["head"])
    v8 = analyze_head(yolov8_like())
    assert (v8.stem_convs, v8.head_convs) == (["stem"], ["head/box", "head/cls"])  # not the DFL conv


def test_head_tail_needs_node_names() -> None:
    model = yolov5_like()
    for node in model.graph.node:
        node.name = ""
    with pytest.raises(InputError, match="name_nodes"):
        head_tail_nodes(model)
    name_nodes(model)
    assert len({node.name for node in model.graph.node}) == len(model.graph.node)
    assert len(head_tail_nodes(model)) == 10


def test_model_without_convs_is_rejected() -> None:
    g = _Graph()
    out = g.node("Relu", "relu", ["images"])[0]
    with pytest.raises(InputError, match="no Conv"):
        head_tail_nodes(g.model(out, ["N", 3, SIZE, SIZE]))


def test_percentile_amax() -> None:
    hist = np.zeros(100, np.int64)
    hist[:10] = 1000
    hist[99] = 1  # one outlier at the top
    assert percentile_amax(hist, 10.0, 100.0) == 10.0
    assert percentile_amax(hist, 10.0, 99.9) == pytest.approx(1.0)


def test_entropy_amax_clips_a_long_tail() -> None:
    values = np.abs(np.random.default_rng(0).standard_normal(200_000))
    values[:20] = 40.0  # rare outliers stretch the range
    hist, _ = np.histogram(values, bins=2048, range=(0.0, 40.0))
    amax = entropy_amax(hist, 40.0)
    assert 2.5 < amax < 10.0


def _calibration_loader(
    folder: Path, count: int, input_name: str = "images", size: int = SIZE
) -> CalibrationDataLoader:
    return CalibrationDataLoader(list_images(folder)[:count], input_name, size, batch_size=3)


def _check_qdq(model: onnx.ModelProto, excluded: list[str]) -> None:
    onnx.checker.check_model(model)  # also checks that nodes are in topological order
    inits = {init.name: init for init in model.graph.initializer}
    qdq = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "no Q/DQ nodes were inserted"
    for node in qdq:
        zero_point = numpy_helper.to_array(inits[node.input[2]])
        assert zero_point.dtype == np.int8 and not zero_point.any(), f"{node.name}: zero point must be INT8 0"
    dequantized = {node.output[0] for node in qdq if node.op_type == "DequantizeLinear"}
    for node in model.graph.node:
        if node.name in excluded:
            assert not set(node.input) & dequantized, f"excluded node {node.name} reads an INT8 tensor"
        if node.op_type == "Conv" and node.name not in excluded:
            assert node.input[0] in dequantized, f"{node.name}: activation input is not quantized"
            assert node.input[1] in dequantized, f"{node.name}: weights are not quantized"
            weight_dq = next(n for n in qdq if n.output[0] == node.input[1])
            assert numpy_helper.to_array(inits[weight_dq.input[1]]).ndim == 1, "weights must be per channel"
            if len(node.input) > 2:
                assert node.input[2] in inits, "bias must stay float"


def test_quantize_fixture_end_to_end(tmp_path: Path) -> None:
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    out = tmp_path / "v5.int8.onnx"
    result = quantize_qdq(fp32, _calibration_loader(CALIB_IMAGES, 5), "minmax", 99.99, out, ["block/add"])
    assert result.calibration_images == 5 and result.algorithm == "minmax"
    assert result.sensitive_nodes == ["stem", "head"]
    assert result.excluded_nodes == [*result.head_tail_nodes, "stem", "head", "block/add"]
    quantized = onnx.load(str(out))
    _check_qdq(quantized, result.excluded_nodes)
    # only the block conv: the excluded residual Add shares the block conv's input tensor, and ORT points every
    # reader at the one Q/DQ pair, so quantize_qdq must hand the Add the float tensor back (checked above)
    assert result.quantized_nodes == 1
    x = _calibration_loader(CALIB_IMAGES, 2).__iter__().__next__()["images"]
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_quantize_without_sensitive_float(tmp_path: Path) -> None:
    fp32 = tmp_path / "v8.onnx"
    onnx.save(yolov8_like(), fp32)
    out = tmp_path / "v8.int8.onnx"
    result = quantize_qdq(
        fp32, _calibration_loader(CALIB_IMAGES, 4), "percentile", 99.9, out, keep_sensitive_float=False
    )
    assert result.sensitive_nodes == [] and result.excluded_nodes == result.head_tail_nodes
    quantized = onnx.load(str(out))
    _check_qdq(quantized, result.excluded_nodes)
    assert result.quantized_nodes == 6  # the six feature convs; the DFL conv belongs to the tail


def test_quantize_rejects_bad_arguments_and_leaves_no_file(tmp_path: Path) -> None:
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    out = tmp_path / "v5.int8.onnx"
    loader = CalibrationDataLoader([tmp_path / "unused.jpg"], "images", SIZE, 1)
    with pytest.raises(InputError, match="algorithm"):
        quantize_qdq(fp32, loader, "kl", 99.99, out)
    with pytest.raises(InputError, match="not in"):
        quantize_qdq(fp32, loader, "minmax", 99.99, out, ["no-such-node"])
    with pytest.raises(InputError, match="reads 'images'"):
        quantize_qdq(fp32, CalibrationDataLoader([fp32], "input", SIZE, 1), "minmax", 99.99, out)
    with pytest.raises(InputError, match="not found"):
        quantize_qdq(tmp_path / "missing.onnx", loader, "minmax", 99.99, out)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_quantize_real_yolov5n(exported, tmp_path: Path) -> None:
    real_model = exported.onnx_path  # the shipped yolov5n.pt through the export stage
    out = tmp_path / "yolov5n.int8.onnx"
    loader = CalibrationDataLoader(list_images(CALIB_IMAGES)[:4], "images", 640, batch_size=2)
    result = quantize_qdq(real_model, loader, "minmax", 99.99, out)
    tail_ops = {node.name: node.op_type for node in onnx.load(str(real_model)).graph.node}
    assert {tail_ops[name] for name in result.head_tail_nodes} >= {"Reshape", "Transpose", "Sigmoid", "Pow", "Concat"}
    assert not any(tail_ops[name] == "Conv" for name in result.head_tail_nodes)
    assert [tail_ops[name] for name in result.sensitive_nodes] == ["Conv"] * 4  # the stem and 3 head convs
    quantized = onnx.load(str(out))
    _check_qdq(quantized, result.excluded_nodes)
    batch = next(iter(loader))["images"]
    ref = ort.InferenceSession(str(real_model), providers=["CPUExecutionProvider"]).run(None, {"images": batch})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": batch})[0]
    # objectness (column 4) of confident FP32 anchors must survive quantization
    confident = ref[..., 4] > 0.5
    assert confident.sum() > 10
    assert np.abs(got[..., 4][confident] - ref[..., 4][confident]).mean() < 0.1
