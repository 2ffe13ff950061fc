"""The stem rewrite: a stride-2 conv with an even kernel on the image, as SpaceToDepth + a stride-1 conv.

YOLOv5's stem is a 6x6 stride-2 conv on the 3-channel image (it replaced the Focus layer, which was exactly this
space-to-depth followed by a 3x3 conv). The two forms compute the same numbers:

    Conv(k x k, stride 2, pad p)(x) == Conv(k/2 x k/2, stride 1, pad p/2)(SpaceToDepth(2)(x))

with the weights rearranged, W'[o, (bh * 2 + bw) * C + c, i, j] = W[o, c, 2i + bh, 2j + bw] (ONNX SpaceToDepth's
channel order), for even k and even p. The rewrite changes no value the model computes (up to float summation
order); the simplify stage applies it when `simplify.stem_space_to_depth` is on, and its numerical check covers it.

Measured on an H200 with TensorRT 8.6, level 2, batch 32 (benchmarks/gpu_int8.py, yolov5n): in a Q/DQ network
the 6x6 form has no fast INT8 kernel (stem 1.41 ms: 0.91 ms INT8 conv + 0.50 ms reformatting the quantized
3-channel image; left in float it runs an FP32 kernel, 1.17 ms). Rewritten, the stem is an ordinary INT8 conv on
12 channels: 0.80-0.89 ms, most of it the SpaceToDepth shuffle, which TensorRT runs in FP32 (0.34 ms) even with
the image quantized before it. The all-INT8 Q/DQ engine goes from 7,612 to 8,871 images/s (+17 %), still below
FP16 (9,414) and implicit INT8 (10,186); the FP16 engine of the rewritten model is 7 % slower (8,775), hence off by
default.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 2


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def find_stride2_stem(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Conv that reads the graph's image input with stride 2, an even square kernel, even symmetric pads,
    no dilation and no groups, and constant weights; None when the model has no such stem (YOLOv8's 3x3 stem)."""
    index = _stem_index(model)
    return None if index is None else model.graph.node[index]


def _stem_index(model: onnx.ModelProto) -> int | None:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input} - initializers
    for index, node in enumerate(graph.node):
        if node.op_type != "Conv" or node.input[0] not in inputs or node.input[1] not in initializers:
            continue
        attrs = _attributes(node)
        kernel = list(attrs.get("kernel_shape", []))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if (
            len(kernel) == 2
            and kernel[0] == kernel[1]
            and kernel[0] % BLOCK == 0
            and list(attrs.get("strides", [1, 1])) == [BLOCK, BLOCK]
            and list(attrs.get("dilations", [1, 1])) == [1, 1]
            and attrs.get("group", 1) == 1
            and len(set(pads)) == 1
            and pads[0] % BLOCK == 0
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        ):
            return index
    return None


def space_to_depth_weights(weights: np.ndarray) -> np.ndarray:
    """[O, C, k, k] -> [O, 4C, k/2, k/2], the stride-1 conv's weights:
    W'[o, (bh * 2 + bw) * C + c, i, j] = W[o, c, 2i + bh, 2j + bw]."""
    out_channels, channels, k, _ = weights.shape
    half = k // BLOCK
    blocks = weights.reshape(out_channels, channels, half, BLOCK, half, BLOCK)  # o, c, i, bh, j, bw
    return blocks.transpose(0, 3, 5, 1, 2, 4).reshape(out_channels, BLOCK * BLOCK * channels, half, half)


def space_to_depth_stem(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """A copy of `model` with its stride-2 even-kernel stem (see `find_stride2_stem`) as SpaceToDepth + a stride-1
    conv, and the stem conv's name; `model` unchanged and None when it has no such stem. The conv keeps its node
    name, so float-conv lists and sensitivity rankings still name it."""
    index = _stem_index(model)
    if index is None:
        return model, None
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    conv = graph.node[index]
    attrs = _attributes(conv)
    kernel = int(attrs["kernel_shape"][0]) // BLOCK
    pad = int(list(attrs.get("pads", [0, 0, 0, 0]))[0]) // BLOCK
    weight = next(i for i in graph.initializer if i.name == conv.input[1])
    new_weight = numpy_helper.from_array(space_to_depth_weights(numpy_helper.to_array(weight)), weight.name)
    if sum(1 for node in graph.node for name in node.input if name == weight.name) > 1:
        new_weight.name = f"{weight.name}.space_to_depth"
        graph.initializer.append(new_weight)
    else:
        weight.CopyFrom(new_weight)
    stem_input = f"{conv.name}.space_to_depth"
    depth = helper.make_node(
        "SpaceToDepth", [conv.input[0]], [stem_input], name=f"{conv.name}/SpaceToDepth", blocksize=BLOCK
    )
    inputs = [stem_input, new_weight.name, *conv.input[2:]]
    replacement = helper.make_node(
        "Conv",
        inputs,
        list(conv.output),
        name=conv.name,
        kernel_shape=[kernel, kernel],
        strides=[1, 1],
        pads=[pad] * 4,
        dilations=[1, 1],
        group=1,
    )
    graph.node.remove(conv)
    graph.node.insert(index, replacement)
    graph.node.insert(index, depth)
    return rewritten, replacement.name
