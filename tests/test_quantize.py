"""Quantization: head-tail graph analysis on hand-built heads, calibration maths, the Q/DQ placement rules, and
end-to-end Q/DQ output (hand-built graphs and the real yolov5n)."""

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
from yoloq.quant.formats import INT8, quant_format
from yoloq.quant.graph import analyze_head, default_float_convs, head_tail_nodes, image_input, name_nodes, prepare_model
from yoloq.quant.placement import calibration_tensors, place_qdq
from yoloq.quant.qdq import WrittenQdq, write_qdq
from yoloq.quant.ranges import amax_for, entropy_amax, percentile_amax
from yoloq.quant.statistics import RANGE_GRID_STEPS, collect_stats, snap_amax

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


def quantize(
    fp32: Path, loader: CalibrationDataLoader, algorithm: str, out: Path, float_nodes: list[str] | None = None
) -> WrittenQdq:
    """Calibrate `fp32` on `loader` and write its Q/DQ model (float_nodes None: the stem and head convs)."""
    model = prepare_model(fp32)
    head = analyze_head(model)
    stats = collect_stats(model, calibration_tensors(model, head), loader, image_input(model))
    floats = default_float_convs(head) if float_nodes is None else float_nodes
    return write_qdq(model, head, amax_for(stats, algorithm, 99.9), floats, out)


def _check_qdq(model: onnx.ModelProto, excluded: tuple[str, ...]) -> None:
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
            assert numpy_helper.to_array(inits[weight_dq.input[0]]).dtype == np.int8, "weights must be stored INT8"
            assert numpy_helper.to_array(inits[weight_dq.input[1]]).ndim == 1, "weights must be per channel"
            if len(node.input) > 2:
                assert node.input[2] in inits, "bias must stay float"


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def test_quantize_fixture_end_to_end(tmp_path: Path) -> None:
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    written = quantize(fp32, _calibration_loader(CALIB_IMAGES, 5), "minmax", tmp_path / "v5.int8.onnx")
    assert written.placement.excluded == (*head_tail_nodes(yolov5_like()), "stem", "head")
    quantized = onnx.load(str(written.path))
    _check_qdq(quantized, written.placement.excluded)
    # the block conv and the residual Add: conv -> SiLU -> Add, so both Add inputs are quantized; the float head
    # conv reads the float Add output
    assert written.quantized_nodes == 2
    assert written.placement.rule_counts() == {"conv input": 1, "residual add": 2, "concat input": 0, "pass-through": 0}
    head_conv = next(n for n in quantized.graph.node if n.name == "head")
    assert head_conv.input[0] == "block/add_out0"  # the float head conv reads the float Add output
    x = next(iter(_calibration_loader(CALIB_IMAGES, 2)))["images"]
    ref, got = _run(fp32, x), _run(written.path, x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_quantize_without_float_convs(tmp_path: Path) -> None:
    fp32 = tmp_path / "v8.onnx"
    onnx.save(yolov8_like(), fp32)
    written = quantize(fp32, _calibration_loader(CALIB_IMAGES, 4), "percentile", tmp_path / "v8.int8.onnx", [])
    assert written.placement.excluded == tuple(head_tail_nodes(yolov8_like()))
    _check_qdq(onnx.load(str(written.path)), written.placement.excluded)
    assert written.quantized_nodes == 6  # the six feature convs; the DFL conv belongs to the tail


def test_quantize_rejects_bad_arguments_and_leaves_no_file(tmp_path: Path) -> None:
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    out = tmp_path / "v5.int8.onnx"
    model = prepare_model(fp32)
    head = analyze_head(model)
    with pytest.raises(InputError, match="not quantizable"):
        write_qdq(model, head, {}, ["no-such-node"], out)
    with pytest.raises(InputError, match="nothing left"):
        write_qdq(model, head, {}, ["stem", "block", "head"], out)
    with pytest.raises(InputError, match="no calibration range"):
        write_qdq(model, head, {}, [], out)
    with pytest.raises(InputError, match="not found"):
        prepare_model(tmp_path / "missing.onnx")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def neck_like() -> onnx.ModelProto:
    """The blocks the placement rules are for: a C3 (bottleneck with a residual Add, Concat), an SPPF (MaxPool chain
    into a Concat), a C2f (Split, bottleneck, Concat) and an FPN step (nearest Resize into a Concat); head conv."""
    g = _Graph()
    x = g.silu("stem/act", g.conv("stem", "images", 3, 8, 3, 2))
    a = g.silu("c3/cv1/act", g.conv("c3/cv1", x, 8, 4))
    b = g.silu("c3/m/cv2/act", g.conv("c3/m/cv2", g.silu("c3/m/cv1/act", g.conv("c3/m/cv1", a, 4, 4)), 4, 4, 3))
    r = g.node("Add", "c3/m/add", [a, b])[0]
    c = g.silu("c3/cv2/act", g.conv("c3/cv2", x, 8, 4))
    y = g.silu("c3/cv3/act", g.conv("c3/cv3", g.node("Concat", "c3/cat", [r, c], axis=1)[0], 8, 8))
    s = g.silu("sppf/cv1/act", g.conv("sppf/cv1", y, 8, 4))
    pools = [s]
    for i in range(3):
        pools.append(g.node("MaxPool", f"sppf/pool{i}", [pools[-1]], kernel_shape=[5, 5], pads=[2] * 4)[0])
    z = g.silu("sppf/cv2/act", g.conv("sppf/cv2", g.node("Concat", "sppf/cat", pools, axis=1)[0], 16, 8))
    t = g.silu("c2f/cv1/act", g.conv("c2f/cv1", z, 8, 8))
    t0, t1 = g.node("Split", "c2f/split", [t, g.shape("c2f/sizes", [4, 4])], outputs=2, axis=1)
    u = g.node("Add", "c2f/m/add", [t1, g.silu("c2f/m/cv1/act", g.conv("c2f/m/cv1", t1, 4, 4, 3))])[0]
    v = g.silu("c2f/cv2/act", g.conv("c2f/cv2", g.node("Concat", "c2f/cat", [t0, t1, u], axis=1)[0], 12, 8))
    small = g.silu("fpn/down/act", g.conv("fpn/down", v, 8, 8, 3, 2))
    scales = g.const("fpn/scales", np.array([1, 1, 2, 2], np.float32))
    up = g.node("Resize", "fpn/up", [small, "", scales], mode="nearest")[0]
    f = g.silu("fpn/cv/act", g.conv("fpn/cv", g.node("Concat", "fpn/cat", [up, v], axis=1)[0], 16, 8))
    out = g.conv("head", f, 8, 7)
    return g.model(out, ["N", 7, SIZE // 2, SIZE // 2])


def _readers_of_dq(model: onnx.ModelProto) -> dict[str, str]:
    """Dequantized tensor -> the float tensor it stands for."""
    return {n.output[0]: n.input[0][: -len("_quantized")] for n in model.graph.node if n.op_type == "DequantizeLinear"}


def _scale_of(model: onnx.ModelProto, tensor: str) -> float:
    inits = {init.name: init for init in model.graph.initializer}
    return float(numpy_helper.to_array(inits[f"{tensor}_scale"]))


@pytest.fixture(scope="module")
def neck(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WrittenQdq]:
    folder = tmp_path_factory.mktemp("neck")
    fp32 = folder / "neck.onnx"
    onnx.save(neck_like(), fp32)
    return fp32, quantize(fp32, _calibration_loader(CALIB_IMAGES, 4), "minmax", folder / "neck.int8.onnx", [])


def test_placement_rules_on_c3_sppf_c2f_and_fpn_blocks(neck: tuple[Path, WrittenQdq]) -> None:
    fp32, written = neck
    model = onnx.load(str(written.path))
    _check_qdq(model, written.placement.excluded)
    dq = _readers_of_dq(model)
    inputs = {
        node.name: [dq.get(name, name) if name in dq else None for name in node.input] for node in model.graph.node
    }
    reads_dq = {node.name: [name in dq for name in node.input] for node in model.graph.node}
    # rule 2: conv -> SiLU -> Add: the residual Add reads its shortcut and its branch quantized
    assert reads_dq["c3/m/add"] == [True, True] and inputs["c3/m/add"][0] == "c3/cv1/act/mul_out0"
    assert reads_dq["c2f/m/add"] == [True, True]
    # rule 3: every Concat input quantized, all with the Concat output's scale
    for concat, count in (("c3/cat", 2), ("sppf/cat", 4), ("c2f/cat", 3), ("fpn/cat", 2)):
        assert reads_dq[concat] == [True] * count, concat
        scales = {_scale_of(model, name) for name in inputs[concat]}
        assert scales == {_scale_of(model, f"{concat}_out0")}, concat
    # rule 4: MaxPool, Split and nearest Resize read INT8 and share the scale of what they feed
    for node in ("sppf/pool0", "sppf/pool1", "sppf/pool2", "c2f/split", "fpn/up"):
        assert reads_dq[node][0], node
    assert _scale_of(model, "sppf/cv1/act/mul_out0") == _scale_of(model, "sppf/cat_out0")
    assert _scale_of(model, "c2f/cv1/act/mul_out0") == _scale_of(model, "c2f/cat_out0")
    assert written.placement.rule_counts()["pass-through"] >= 2
    x = next(iter(_calibration_loader(CALIB_IMAGES, 2)))["images"]
    ref, got = _run(fp32, x), _run(written.path, x)
    assert np.abs(got - ref).max() < 0.15 * np.abs(ref).max()


def test_a_resnet_order_residual_keeps_its_conv_branch_float() -> None:
    """conv -> Add -> activation (ResNet): TensorRT fuses conv + Add when only the shortcut is quantized."""
    g = _Graph()
    x = g.silu("stem/act", g.conv("stem", "images", 3, 8, 3, 2))
    y = g.node("Add", "block/add", [x, g.conv("block", x, 8, 8, 3)])[0]
    out = g.conv("head", g.node("Relu", "block/relu", [y])[0], 8, 7)
    model = onnx.shape_inference.infer_shapes(g.model(out, ["N", 7, SIZE // 2, SIZE // 2]))
    placement = place_qdq(model, analyze_head(model), ["stem", "head"])
    assert [(q.tensor, q.rules) for q in placement.activations if "block/add" in q.readers] == [
        ("stem/act/mul_out0", ("conv input", "residual add"))
    ]


def test_a_float_reader_keeps_concat_and_pass_through_in_float() -> None:
    model = onnx.shape_inference.infer_shapes(neck_like())
    head = analyze_head(model)
    placement = place_qdq(model, head, ["sppf/cv2", "c3/cv3"])
    by_reader = {reader for q in placement.activations for reader in q.readers}
    assert not by_reader & {"sppf/cat", "sppf/pool0", "sppf/pool1", "sppf/pool2", "c3/cat"}
    assert "c3/m/add" in by_reader  # the residual rule does not depend on the Concat
    assert {"c2f/cat", "c2f/split", "fpn/cat", "fpn/up"} <= by_reader


def test_same_inputs_write_the_same_bytes(neck: tuple[Path, WrittenQdq], tmp_path: Path) -> None:
    fp32, written = neck
    again = quantize(fp32, _calibration_loader(CALIB_IMAGES, 4), "minmax", tmp_path / "again.onnx", [])
    assert again.path.read_bytes() == written.path.read_bytes()


def test_ranges_snap_to_a_grid_that_absorbs_cpu_rounding() -> None:
    assert snap_amax(0.0) == 0.0 and snap_amax(1.0) == 1.0 and snap_amax(0.75) == 0.75
    rng = np.random.default_rng(1)
    values = rng.uniform(0.01, 100.0, 2000)
    snapped = np.array([snap_amax(v) for v in values])
    assert np.all(snapped >= values) and np.all(snapped <= values * (1 + 1.0 / RANGE_GRID_STEPS))
    assert all(snap_amax(v) == v for v in snapped)  # idempotent
    # last-bit differences between CPUs (about 1e-6 relative) change a snapped range only next to a grid point
    flipped = sum(snap_amax(v) != snap_amax(v * (1 + 1e-6)) for v in values)
    assert flipped <= 2


def test_quant_format_is_a_value() -> None:
    assert quant_format("int8") is INT8 and INT8.qmax == 127.0 and INT8.onnx_type == TensorProto.INT8
    assert INT8.scale(12.7) == pytest.approx(0.1)
    assert np.allclose(INT8.fake_quantize(np.array([0.04, 0.06, 100.0]), 0.1), [0.0, 0.1, 12.7])
    with pytest.raises(Exception, match="fp4"):
        quant_format("fp4")


def test_quantize_real_yolov5n(exported, tmp_path: Path) -> None:
    real_model = exported.onnx_path  # the shipped yolov5n.pt through the export stage
    loader = CalibrationDataLoader(list_images(CALIB_IMAGES)[:4], "images", 640, batch_size=2)
    written = quantize(real_model, loader, "minmax", tmp_path / "yolov5n.int8.onnx")
    ops = {node.name: node.op_type for node in onnx.load(str(real_model)).graph.node}
    head = analyze_head(prepare_model(real_model))
    assert {ops[name] for name in head.tail} >= {"Reshape", "Transpose", "Sigmoid", "Pow", "Concat"}
    assert not any(ops[name] == "Conv" for name in head.tail)
    assert [ops[name] for name in default_float_convs(head)] == ["Conv"] * 4  # the stem and 3 head convs
    counts = written.placement.rule_counts()
    assert counts["concat input"] > 10 and counts["conv input"] > 40  # C3 and neck Concats, SPPF
    quantized = onnx.load(str(written.path))
    _check_qdq(quantized, written.placement.excluded)
    adds = [n for n in quantized.graph.node if n.op_type == "Add" and n.name not in head.tail]
    assert len(adds) == 7 and all(n.input[0].endswith("_dequantized") for n in adds)  # every C3 shortcut
    batch = next(iter(loader))["images"]
    ref, got = _run(real_model, batch), _run(written.path, batch)
    # objectness (column 4) of confident FP32 anchors must survive quantization
    confident = ref[..., 4] > 0.5
    assert confident.sum() > 10
    assert np.abs(got[..., 4][confident] - ref[..., 4][confident]).mean() < 0.1
