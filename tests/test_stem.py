"""The stem rewrite (yoloq.stem): a stride-2 even-kernel conv on the image as SpaceToDepth + a stride-1 conv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloq.backends.onnxruntime import qdq_session, session_options
from yoloq.backends.tensorrt.build import TensorRTBackend
from yoloq.backends.tensorrt.versions import BuildPlan
from yoloq.calibration_data import CalibrationDataLoader
from yoloq.config import TensorRTConfig, VariantConfig
from yoloq.preprocess import list_images
from yoloq.quant.graph import analyze_head, prepare_model
from yoloq.quant.placement import calibration_tensors
from yoloq.quant.qdq import write_qdq
from yoloq.quant.ranges import amax_for
from yoloq.quant.statistics import collect_stats
from yoloq.stem import (
    find_quantized_stride2_stem,
    find_stride2_stem,
    space_to_depth_qdq_stem,
    space_to_depth_stem,
    space_to_depth_weights,
)

CALIB_IMAGES = Path(__file__).resolve().parents[1] / "data" / "coco" / "calib" / "images"


def silu_stem(
    before: list[onnx.NodeProto],
    conv_inputs: list[str],
    kernel: int,
    stride: int,
    pad: int,
    out_channels: int,
    inits: list[onnx.TensorProto],
) -> onnx.ModelProto:
    """`before`, then the stem conv (named as YOLOv5 names it) on `conv_inputs` and its SiLU, on a 64x64 image."""
    nodes = [
        *before,
        helper.make_node(
            "Conv",
            conv_inputs,
            ["c"],
            name="/model.0/conv/Conv",
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
        ),
        helper.make_node("Sigmoid", ["c"], ["s"], name="/model.0/act/Sigmoid"),
        helper.make_node("Mul", ["c", "s"], ["out"], name="/model.0/act/Mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "stem",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", out_channels, "h", "w"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def stem_model(kernel: int, stride: int, pad: int, out_channels: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(kernel * 10 + stride)
    weight = rng.standard_normal((out_channels, 3, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    return silu_stem([], ["images", "w", "b"], kernel, stride, pad, out_channels, inits)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


@pytest.mark.parametrize(("kernel", "pad"), [(6, 2), (2, 0), (4, 2)])
def test_the_rewritten_stem_computes_the_same_outputs(kernel: int, pad: int) -> None:
    model = stem_model(kernel, 2, pad)
    rewritten, name = space_to_depth_stem(model)
    assert name == "/model.0/conv/Conv"
    onnx.checker.check_model(rewritten)
    ops = [node.op_type for node in rewritten.graph.node]
    assert ops == ["SpaceToDepth", "Conv", "Sigmoid", "Mul"]
    conv = rewritten.graph.node[1]
    assert conv.name == name  # float-conv lists and sensitivity rankings still name it
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["kernel_shape"] == [kernel // 2] * 2 and attrs["strides"] == [1, 1] and attrs["pads"] == [pad // 2] * 4
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    expected, actual = run(model, x), run(rewritten, x)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)
    assert [node.op_type for node in model.graph.node] == ["Conv", "Sigmoid", "Mul"]  # the input is not changed


@pytest.mark.parametrize(("kernel", "stride", "pad"), [(3, 2, 1), (6, 1, 2), (6, 2, 1)])
def test_stems_that_do_not_fit_are_left_alone(kernel: int, stride: int, pad: int) -> None:
    model = stem_model(kernel, stride, pad)
    assert find_stride2_stem(model) is None
    rewritten, name = space_to_depth_stem(model)
    assert name is None and rewritten is model


def test_weights_follow_onnx_space_to_depth_channel_order() -> None:
    weights = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6)
    moved = space_to_depth_weights(weights)
    assert moved.shape == (2, 12, 3, 3)
    for o in range(2):
        for c in range(3):
            for bh in range(2):
                for bw in range(2):
                    for i in range(3):
                        for j in range(3):
                            assert moved[o, (bh * 2 + bw) * 3 + c, i, j] == weights[o, c, 2 * i + bh, 2 * j + bw]


# -- the Q/DQ form TensorRT engines get (tensorrt.qdq_stem_space_to_depth) ---------------------------------------


def qdq_stem_model(kernel: int = 6, pad: int = 2, out_channels: int = 8) -> onnx.ModelProto:
    """image -> Q -> DQ -> Conv(k x k, stride 2) with INT8 per-channel weights -> SiLU, as yoloq writes Q/DQ."""
    rng = np.random.default_rng(kernel)
    steps = rng.integers(-127, 128, (out_channels, 3, kernel, kernel)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(1 / 127, np.float32), "images_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "images_zero_point"),
        numpy_helper.from_array(steps, "w_quantized"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, out_channels).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(out_channels, np.int8), "w_zero_point"),
        numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "b"),
    ]
    zero = ["images_scale", "images_zero_point"]
    quantize = [
        helper.make_node("QuantizeLinear", ["images", *zero], ["images_quantized"], name="images_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["images_quantized", *zero], ["images_dequantized"], name="images_DQ"),
        helper.make_node(
            "DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["w_dequantized"], name="w_DQ", axis=0
        ),
    ]
    return silu_stem(quantize, ["images_dequantized", "w_dequantized", "b"], kernel, 2, pad, out_channels, inits)


def run_exact(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime as yoloq validates Q/DQ models (the integer-exact simulation)."""
    return qdq_session(model, session_options()).run(None, {"images": x})[0]


@pytest.mark.parametrize("permutation", ["int8", "float"])
@pytest.mark.parametrize(("kernel", "pad"), [(6, 2), (4, 2)])
def test_the_qdq_stem_becomes_a_space_to_depth_conv_with_the_same_integers(
    kernel: int, pad: int, permutation: str
) -> None:
    model = qdq_stem_model(kernel, pad)
    assert find_quantized_stride2_stem(model).name == "/model.0/conv/Conv"
    rewritten, name = space_to_depth_qdq_stem(model, permutation)
    assert name == "/model.0/conv/Conv"
    onnx.checker.check_model(rewritten)
    convs = [n for n in rewritten.graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs] == ["/model.0/conv/Conv/SpaceToDepth", name]  # the stem keeps its name
    inits = {i.name: numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    producers = {o: n for n in rewritten.graph.node for o in n.output}
    depth, stem = convs
    if permutation == "int8":  # the quantized image in, INT8 0/1 weights at scale 1
        assert producers[depth.input[0]].op_type == "DequantizeLinear"
        weights_dq = producers[depth.input[1]]
        weights = inits[weights_dq.input[0]]
        assert weights.dtype == np.int8 and (inits[weights_dq.input[1]] == 1).all()
    else:  # the float image in, float 0/1 weights; the image is quantized nowhere else
        assert depth.input[0] == "images" and depth.input[1] in inits
        weights = inits[depth.input[1]]
        assert weights.dtype == np.float32
        assert [n for n in rewritten.graph.node if "images" in n.input] == [depth]
    assert weights.shape == (12, 3, 2, 2)
    assert sorted(np.unique(weights)) == [0, 1] and (weights.reshape(12, -1).sum(axis=1) == 1).all()
    requantize = producers[producers[stem.input[0]].input[0]]  # the conv's output is quantized like the image
    assert requantize.op_type == "QuantizeLinear" and requantize.input[0] == depth.output[0]
    assert list(requantize.input[1:]) == ["images_scale", "images_zero_point"]
    steps = inits[producers[stem.input[1]].input[0]]
    assert steps.dtype == np.int8 and steps.shape == (8, 12, kernel // 2, kernel // 2)
    assert producers[stem.input[1]].input[1] == "w_scale"  # the same per-channel scales
    assert "w_quantized" not in inits  # the k x k weights are gone
    x = np.random.default_rng(2).random((2, 3, 64, 64), dtype=np.float32)
    np.testing.assert_array_equal(run_exact(rewritten, x), run_exact(model, x))
    assert [n.op_type for n in model.graph.node].count("Conv") == 1  # the input is not changed
    assert space_to_depth_qdq_stem(rewritten, permutation) == (rewritten, None)  # nothing left to rewrite


def test_a_2x2_stem_is_already_the_rewrites_form() -> None:
    model = qdq_stem_model(2, 0)
    assert find_quantized_stride2_stem(model) is None
    assert space_to_depth_qdq_stem(model) == (model, None)


def test_a_float_stem_is_not_a_quantized_stem() -> None:
    model = stem_model(6, 2, 2)
    assert find_stride2_stem(model) is not None and find_quantized_stride2_stem(model) is None
    assert space_to_depth_qdq_stem(model) == (model, None)


def test_on_yolov5n_the_rewritten_qdq_model_gives_exactly_the_same_detections(exported, tmp_path) -> None:
    model = prepare_model(exported.onnx_path)
    head = analyze_head(model)
    loader = CalibrationDataLoader(list_images(CALIB_IMAGES)[:2], "images", 640, batch_size=2)
    amax = amax_for(collect_stats(model, calibration_tensors(model, head), loader, "images"), "mse", 99.9)
    all_int8 = onnx.load(str(write_qdq(model, head, amax, [], tmp_path / "all.onnx").path))
    batch = next(iter(loader))["images"]
    expected = run_exact(all_int8, batch)
    for permutation in ("int8", "float"):
        rewritten, name = space_to_depth_qdq_stem(all_int8, permutation)
        assert name == head.stem_convs[0]
        np.testing.assert_array_equal(run_exact(rewritten, batch), expected)
    float_stem = onnx.load(str(write_qdq(model, head, amax, list(head.stem_convs), tmp_path / "stem.onnx").path))
    assert find_quantized_stride2_stem(float_stem) is None  # the search's float-stem candidates stay as they are


def test_tensorrt_builds_of_qdq_models_get_the_rewrite_and_others_do_not(tmp_path) -> None:
    qdq = tmp_path / "qdq.onnx"
    onnx.save(qdq_stem_model(), str(qdq))
    variant = VariantConfig(name="int8", precision="int8", quantization="qdq", backend="tensorrt")
    backend = TensorRTBackend(TensorRTConfig(), progress=(messages := []).append)
    # TensorRT 8.6 with fp16_fallback (convs outside Q/DQ preferred in FP16): the float permutation
    plan = BuildPlan(
        onnx="qdq", fp16_flag=True, int8_flag=True, calibrator=None, strongly_typed=False, fp16_float_convs=True
    )
    source = backend._source_onnx(variant, plan, qdq, qdq, tmp_path)
    assert source.name.endswith(".s2d.onnx") and source != qdq
    assert backend._source_onnx(variant, plan, qdq, qdq, tmp_path) == source  # reused by content
    assert "images" in next(n for n in onnx.load(str(source)).graph.node if n.op_type == "Conv").input
    assert any("stem /model.0/conv/Conv as an FP16 2x2 stride-2 space-to-depth conv" in m for m in messages)
    # no FP16 preference (fp16_fallback off, strongly typed TensorRT): the INT8 permutation
    typed = BuildPlan(onnx="qdq", fp16_flag=False, int8_flag=False, calibrator=None, strongly_typed=True)
    int8_source = backend._source_onnx(variant, typed, qdq, qdq, tmp_path)
    assert int8_source.name.endswith(".s2d.onnx") and int8_source != source
    assert "images" not in next(n for n in onnx.load(str(int8_source)).graph.node if n.op_type == "Conv").input
    assert any("stem /model.0/conv/Conv as an INT8 2x2 stride-2 space-to-depth conv" in m for m in messages)
    off = TensorRTBackend(TensorRTConfig(qdq_stem_space_to_depth=False))
    assert off._source_onnx(variant, plan, qdq, qdq, tmp_path) == qdq
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(stem_model(6, 2, 2), str(fp32))
    fp16 = BuildPlan(onnx="fp32", fp16_flag=True, int8_flag=False, calibrator=None, strongly_typed=False)
    plain = VariantConfig(name="fp16", precision="fp16", backend="tensorrt")
    assert backend._source_onnx(plain, fp16, fp32, None, tmp_path) == fp32


def test_the_float_permutation_reads_the_engines_uint8_frames(tmp_path) -> None:
    qdq = tmp_path / "qdq.onnx"
    onnx.save(qdq_stem_model(), str(qdq))
    plan = BuildPlan(
        onnx="qdq", fp16_flag=True, int8_flag=True, calibrator=None, strongly_typed=False, fp16_float_convs=True
    )
    variant = VariantConfig(name="int8", precision="int8", quantization="qdq", backend="tensorrt")
    source = TensorRTBackend(TensorRTConfig(input="uint8"))._source_onnx(variant, plan, qdq, qdq, tmp_path)
    frames = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    (name,) = [i.name for i in onnx.load(str(source)).graph.input]
    actual = qdq_session(onnx.load(str(source)), session_options()).run(None, {name: frames})[0]
    expected = run_exact(onnx.load(str(qdq)), (frames.transpose(0, 3, 1, 2) / np.float32(255)).astype(np.float32))
    np.testing.assert_array_equal(actual, expected)
