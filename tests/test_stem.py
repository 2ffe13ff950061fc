"""The stem rewrite (yoloq.stem): a stride-2 even-kernel conv on the image as SpaceToDepth + a stride-1 conv."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloq.stem import find_stride2_stem, space_to_depth_stem, space_to_depth_weights


def stem_model(kernel: int, stride: int, pad: int, out_channels: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(kernel * 10 + stride)
    weight = rng.standard_normal((out_channels, 3, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv",
            ["images", "w", "b"],
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
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


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
