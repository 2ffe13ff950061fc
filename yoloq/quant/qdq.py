"""The Q/DQ ONNX model: a placement (yoloq.quant.placement) and ranges written as QuantizeLinear/DequantizeLinear.

What the output looks like (TensorRT's explicit-quantization rules): symmetric (zero point 0); activations per
tensor, one Q/DQ pair per quantized tensor, read only by the nodes the placement names (other readers keep the
float tensor); Conv weights stored quantized, per output channel, behind a DequantizeLinear; float bias. Names
derive from tensor names and nodes keep graph order, so the same inputs write the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from yoloq.artifacts import atomic_path
from yoloq.errors import InputError
from yoloq.quant.formats import INT8, QuantFormat
from yoloq.quant.graph import QDQ_OP_TYPES, HeadAnalysis
from yoloq.quant.placement import Placement, place_qdq


@dataclass(frozen=True)
class WrittenQdq:
    path: Path
    placement: Placement
    quantized_nodes: int  # nodes (other than Q/DQ) that read at least one dequantized tensor


def _weight_axis(node: onnx.NodeProto) -> int:
    return 1 if node.op_type == "ConvTranspose" else 0  # the output-channel axis of the weight tensor


def insert_qdq(
    model: onnx.ModelProto, placement: Placement, amax: dict[str, float], fmt: QuantFormat = INT8
) -> onnx.ModelProto:
    """A copy of `model` with the Q/DQ pairs of `placement` (ranges from `amax`) and quantized conv weights."""
    ranges = placement.group_amax(amax)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    position = {node.name: index for index, node in enumerate(graph.node)}
    inits = {init.name: init for init in graph.initializer}
    weight_readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            weight_readers[name] = weight_readers.get(name, 0) + 1
    before: dict[int, list[onnx.NodeProto]] = {}  # node index -> Q/DQ nodes to emit right before it
    rewire: dict[tuple[str, str], str] = {}  # (reader node, float tensor) -> dequantized tensor
    new_inits: list[onnx.TensorProto] = []

    for q in placement.activations:
        scale, zero = f"{q.tensor}_scale", f"{q.tensor}_zero_point"
        quantized, dequantized = f"{q.tensor}_quantized", f"{q.tensor}_dequantized"
        new_inits.append(numpy_helper.from_array(np.array(fmt.scale(ranges[q.tensor]), np.float32), scale))
        new_inits.append(numpy_helper.from_array(np.zeros((), fmt.numpy_type), zero))
        first = min(position[reader] for reader in q.readers)
        before.setdefault(first, []).extend(
            [
                helper.make_node("QuantizeLinear", [q.tensor, scale, zero], [quantized], f"{q.tensor}_QuantizeLinear"),
                helper.make_node(
                    "DequantizeLinear", [quantized, scale, zero], [dequantized], f"{q.tensor}_DequantizeLinear"
                ),
            ]
        )
        for reader in q.readers:
            rewire[(reader, q.tensor)] = dequantized

    for conv in placement.weighted:
        node = graph.node[position[conv]]
        weight_name = node.input[1]
        if weight_name not in inits:
            raise InputError(f"{conv}: its weights are not a constant initializer; cannot quantize them")
        weights = numpy_helper.to_array(inits[weight_name]).astype(np.float32)
        axis = _weight_axis(node)
        moved = np.moveaxis(weights, axis, 0)
        channel_amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
        scales = np.where(channel_amax > 0, channel_amax / fmt.qmax, 1.0).astype(np.float32)
        shape = [1] * weights.ndim
        shape[axis] = -1
        steps = fmt.to_grid(weights / scales.reshape(shape)).astype(fmt.numpy_type)
        stem = weight_name if weight_readers.get(weight_name, 0) == 1 else f"{weight_name}_{conv}"
        names = (f"{stem}_quantized", f"{stem}_scale", f"{stem}_zero_point", f"{stem}_dequantized")
        new_inits.append(numpy_helper.from_array(steps, names[0]))
        new_inits.append(numpy_helper.from_array(scales, names[1]))
        new_inits.append(numpy_helper.from_array(np.zeros(len(scales), fmt.numpy_type), names[2]))
        before.setdefault(position[conv], []).append(
            helper.make_node("DequantizeLinear", list(names[:3]), [names[3]], f"{stem}_DequantizeLinear", axis=axis)
        )
        rewire[(conv, weight_name)] = names[3]

    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        nodes.extend(before.get(index, []))
        for slot, name in enumerate(node.input):
            if (node.name, name) in rewire:
                node.input[slot] = rewire[(node.name, name)]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]  # float weights replaced by quantized ones
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits])
    return out


def count_quantized_nodes(model: onnx.ModelProto) -> int:
    """Nodes (other than Q/DQ) that read at least one DequantizeLinear output."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(
        1 for node in model.graph.node if node.op_type not in QDQ_OP_TYPES and any(n in dequantized for n in node.input)
    )


def write_qdq(
    model: onnx.ModelProto,
    head: HeadAnalysis,
    amax: dict[str, float],
    float_nodes: Sequence[str],
    out_path: Path,
    fmt: QuantFormat = INT8,
) -> WrittenQdq:
    """Place Q/DQ with `float_nodes` kept in float and write the model to `out_path` atomically."""
    placement = place_qdq(model, head, float_nodes)
    quantized = insert_qdq(model, placement, amax, fmt)
    with atomic_path(out_path) as tmp:
        onnx.save(quantized, str(tmp))
    return WrittenQdq(out_path, placement, count_quantized_nodes(quantized))
