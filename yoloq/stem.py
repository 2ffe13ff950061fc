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

`space_to_depth_qdq_stem` is the form TensorRT engines of Q/DQ models get (`tensorrt.qdq_stem_space_to_depth`, on by
default): on a Q/DQ model whose stem conv reads the quantized image, SpaceToDepth becomes a 2x2 stride-2 INT8 conv
whose weights are a 0/1 permutation (each output channel copies one pixel of one input channel), its output
quantized with the image's own scale, so every integer the stem computes is unchanged. TensorRT runs that conv on
an INT8 kernel where it runs the SpaceToDepth shuffle in FP32: yolov5n all-INT8 9,443 images/s against 8,981 with
the SpaceToDepth layer (H200, TensorRT 8.6, level 2, one process, interleaved), FP16 9,206, implicit INT8 9,775;
rewritten by the backend from the 6x6 form, 9,417 against FP16 9,253 and implicit 9,738 (another call).
Better still where the build prefers float convs in FP16 (`tensorrt.fp16_fallback`): the permutation conv reads
the float image and its output is quantized instead (`permutation="float"`), an FP16 NHWC kernel with no Quantize
of the 3-channel image: 9,641 images/s against FP16 9,255, implicit 9,764 and the INT8 permutation 9,474 (one
process). The CPU models (the search's candidates, the integer-exact simulation) are not rewritten.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 2
Permutation = Literal["int8", "float"]


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_stride2_even(node: onnx.NodeProto) -> bool:
    """A Conv with stride 2, an even square kernel, even symmetric pads, no dilation and no groups."""
    attrs = _attributes(node)
    kernel = list(attrs.get("kernel_shape", []))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    return (
        node.op_type == "Conv"
        and len(kernel) == 2
        and kernel[0] == kernel[1]
        and kernel[0] % BLOCK == 0
        and list(attrs.get("strides", [1, 1])) == [BLOCK, BLOCK]
        and list(attrs.get("dilations", [1, 1])) == [1, 1]
        and attrs.get("group", 1) == 1
        and len(set(pads)) == 1
        and pads[0] % BLOCK == 0
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


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
        if node.input and node.input[0] in inputs and len(node.input) > 1 and node.input[1] in initializers:
            if _is_stride2_even(node):
                return index
    return None


def space_to_depth_weights(weights: np.ndarray) -> np.ndarray:
    """[O, C, k, k] -> [O, 4C, k/2, k/2], the stride-1 conv's weights:
    W'[o, (bh * 2 + bw) * C + c, i, j] = W[o, c, 2i + bh, 2j + bw]."""
    out_channels, channels, k, _ = weights.shape
    half = k // BLOCK
    blocks = weights.reshape(out_channels, channels, half, BLOCK, half, BLOCK)  # o, c, i, bh, j, bw
    return blocks.transpose(0, 3, 5, 1, 2, 4).reshape(out_channels, BLOCK * BLOCK * channels, half, half)


def _stride1_conv(conv: onnx.NodeProto, inputs: list[str]) -> onnx.NodeProto:
    """The stride-1 conv that replaces the stride-2 `conv` after a space-to-depth: kernel k/2, pads p/2, the same
    name and outputs, reading `inputs` (the space-to-depth tensor, the rearranged weights, `conv`'s bias)."""
    attrs = _attributes(conv)
    kernel = int(attrs["kernel_shape"][0]) // BLOCK
    pad = int(list(attrs.get("pads", [0, 0, 0, 0]))[0]) // BLOCK
    return helper.make_node(
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
    replacement = _stride1_conv(conv, [stem_input, new_weight.name, *conv.input[2:]])
    graph.node.remove(conv)
    graph.node.insert(index, replacement)
    graph.node.insert(index, depth)
    return rewritten, replacement.name


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


def _quantized_stem_index(model: onnx.ModelProto) -> int | None:
    """The stride-2 even-kernel Conv (see `find_stride2_stem`) that reads the image through QuantizeLinear ->
    DequantizeLinear and its weights through a per-output-channel DequantizeLinear of a constant; None otherwise
    (a float stem, a stem of another shape)."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input} - initializers
    producers = _producers(graph)
    for index, node in enumerate(graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or not _is_stride2_even(node):
            continue
        if list(_attributes(node)["kernel_shape"]) == [BLOCK, BLOCK]:
            continue  # already what the rewrite makes (its permutation conv): rewriting again adds a 1x1 conv
        activation, weight = producers.get(node.input[0]), producers.get(node.input[1])
        quantize = producers.get(activation.input[0]) if activation is not None else None
        if (
            activation is not None
            and activation.op_type == "DequantizeLinear"
            and quantize is not None
            and quantize.op_type == "QuantizeLinear"
            and quantize.input[0] in inputs
            and weight is not None
            and weight.op_type == "DequantizeLinear"
            and weight.input[0] in initializers
            and _attributes(weight).get("axis", 1) == 0
        ):
            return index
    return None


def find_quantized_stride2_stem(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The stem conv `space_to_depth_qdq_stem` rewrites: stride 2, an even kernel, the quantized image in, INT8
    weights per output channel; None when there is none (a float stem, YOLOv8's 3x3 stem)."""
    index = _quantized_stem_index(model)
    return None if index is None else model.graph.node[index]


def space_to_depth_qdq_stem(
    model: onnx.ModelProto, permutation: Permutation = "int8"
) -> tuple[onnx.ModelProto, str | None]:
    """A copy of the Q/DQ `model` with its quantized stride-2 even-kernel stem (image -> Q -> DQ -> Conv k x k,
    stride 2) as a space-to-depth permutation conv -> Q -> DQ (the image's scale and zero point) -> Conv k/2 x k/2
    stride 1 (the INT8 weights rearranged as in `space_to_depth_weights`, the same per-channel scales, the same
    bias). The permutation conv is 2x2 stride 2 with 0/1 weights (each output channel copies one pixel of one
    input channel):

    - `permutation="int8"`: it reads the quantized image (image -> Q -> DQ -> Conv, INT8 weights 1 at scale 1): the
      same integers, step by step;
    - `permutation="float"`: it reads the float image (float weights) and its output is quantized instead, which
      is the same, as quantizing is elementwise; the image is then quantized nowhere else. Where TensorRT runs that
      conv in FP16 an image value may round to the neighbouring INT8 step (FP16 has 11 significant bits).

    Returns the stem conv's name; `model` unchanged and None when it has no such stem."""
    index = _quantized_stem_index(model)
    if index is None:
        return model, None
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    producers = _producers(graph)
    inits = {i.name: i for i in graph.initializer}
    conv = graph.node[index]
    activation = producers[conv.input[0]]
    quantize = producers[activation.input[0]]
    weight_dq = producers[conv.input[1]]
    steps = numpy_helper.to_array(inits[weight_dq.input[0]])
    prefix = f"{conv.name}/SpaceToDepth"
    depth, depth_q, depth_dq = f"{prefix}_output", f"{prefix}_output_quantized", f"{prefix}_output_dequantized"
    new_weight = f"{conv.input[1]}.space_to_depth"
    stem_weights = numpy_helper.from_array(space_to_depth_weights(steps), f"{weight_dq.input[0]}.space_to_depth")
    if permutation == "int8":
        permutation_inits = _int8_weights(_permutation(steps.shape[1], steps.dtype), prefix)
        nodes = [
            helper.make_node(
                "DequantizeLinear",
                [i.name for i in permutation_inits],
                [f"{prefix}.weight_dequantized"],
                name=f"{prefix}.weight_DequantizeLinear",
                axis=0,
            )
        ]
        depth_inputs = [conv.input[0], f"{prefix}.weight_dequantized"]
    else:
        permutation_inits = [numpy_helper.from_array(_permutation(steps.shape[1], np.float32), f"{prefix}.weight")]
        nodes = []
        depth_inputs = [quantize.input[0], permutation_inits[0].name]
    nodes += [
        helper.make_node(
            "Conv",
            depth_inputs,
            [depth],
            name=prefix,
            kernel_shape=[BLOCK, BLOCK],
            strides=[BLOCK, BLOCK],
            pads=[0, 0, 0, 0],
        ),
        helper.make_node("QuantizeLinear", [depth, *quantize.input[1:]], [depth_q], name=f"{depth}_QuantizeLinear"),
        helper.make_node(
            "DequantizeLinear", [depth_q, *quantize.input[1:]], [depth_dq], name=f"{depth}_DequantizeLinear"
        ),
        helper.make_node(
            "DequantizeLinear",
            [stem_weights.name, *weight_dq.input[1:]],
            [new_weight],
            name=f"{new_weight}_DequantizeLinear",
            axis=0,
        ),
        _stride1_conv(conv, [depth_dq, new_weight, *conv.input[2:]]),
    ]
    graph.node.remove(conv)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    graph.initializer.extend([*permutation_inits, stem_weights])
    _drop_unused(graph)
    return rewritten, conv.name


def _permutation(channels: int, dtype: type) -> np.ndarray:
    """[4C, C, 2, 2] 0/1 weights of the 2x2 stride-2 conv that is SpaceToDepth(2) in ONNX's channel order."""
    weights = np.zeros((BLOCK * BLOCK * channels, channels, BLOCK, BLOCK), dtype)
    for bh in range(BLOCK):
        for bw in range(BLOCK):
            for c in range(channels):
                weights[(bh * BLOCK + bw) * channels + c, c, bh, bw] = 1
    return weights


def _int8_weights(steps: np.ndarray, prefix: str) -> list[onnx.TensorProto]:
    """INT8 `steps` at scale 1, zero point 0 per output channel: the DequantizeLinear inputs of exact weights."""
    channels = steps.shape[0]
    return [
        numpy_helper.from_array(steps, f"{prefix}.weight_quantized"),
        numpy_helper.from_array(np.ones(channels, np.float32), f"{prefix}.weight_scale"),
        numpy_helper.from_array(np.zeros(channels, steps.dtype), f"{prefix}.weight_zero_point"),
    ]


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove QuantizeLinear / DequantizeLinear nodes and initializers nothing reads any more (the stem's old
    weights; with the float permutation, the image's own Q -> DQ)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        unread = [
            n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not set(n.output) & read
        ]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | outputs
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
