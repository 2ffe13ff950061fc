"""Graph analysis of a YOLO ONNX model: where its convolutions end and its box decoding begins.

The detection head's box-decoding tail (see `analyze_head`) stays in float: it mixes pixel coordinates and
probabilities in one tensor, which no single INT8 scale can hold (quantizing it drops mAP to 0). Everything here
works by graph structure, never by node names, so YOLOv5, YOLOv8/11 and end-to-end heads are found alike.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx

from yoloq.errors import InputError

CONV_OP_TYPES = frozenset({"Conv", "ConvTranspose"})
RELAYOUT_OP_TYPES = frozenset({"Reshape", "Flatten"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16})
QDQ_OP_TYPES = frozenset({"QuantizeLinear", "DequantizeLinear"})
MIN_OPSET = 13  # per-channel DequantizeLinear (axis attribute)


@dataclass(frozen=True)
class HeadAnalysis:
    """Where a detector's convolutions end and its box decoding begins (node names, graph order)."""

    stem_convs: list[str]  # the first Conv(s) after the image input
    head_convs: list[str]  # the last feature convolutions: one 1x1 prediction conv per level/branch
    tail: list[str]  # everything downstream of the head convs that computes floats (the decoding tail)


def analyze_head(model: onnx.ModelProto) -> HeadAnalysis:
    """Find the stem convs, the head convs and the decoding tail by graph structure (no node names involved).

    1. A *decoding conv* is a Conv from which no other Conv is reachable and whose input was re-laid out: walking
       back from its input over float tensors meets a Reshape/Flatten before any Conv. This is the fixed 16->1
       DFL convolution of YOLOv8/11 heads (Reshape -> Transpose -> Softmax -> Conv); YOLOv5 has none.
    2. Every other Conv is a *feature conv*. The *head convs* are the feature convs from which no other feature
       conv is reachable: the 1x1 prediction convs, one per output level (and per branch in v8/11 heads).
    3. The *tail* is everything reachable downstream of the head convs (not the head convs themselves): YOLOv5's
       Reshape/Transpose/Sigmoid/Split/Mul/Add/Pow/Concat decode, YOLOv8/11's per-level Concat, Reshape, Split,
       DFL (Softmax + decoding conv), anchor/stride arithmetic, class Sigmoid and the final Concat. Only nodes
       with a float output are listed (integer shape arithmetic is never quantized).
    4. The *stem convs* are the feature convs with no Conv upstream (the 6x6/s2 stem, or the conv after Focus).
    Backbone reshapes (attention blocks) do not matter: convs follow them, so they are upstream of the head convs.
    """
    graph = model.graph
    names = [node.name for node in graph.node]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise InputError("head analysis needs unique, non-empty node names: call name_nodes(model) first")
    float_tensors = float_tensor_names(onnx.shape_inference.infer_shapes(model))
    readers = consumers(graph)
    producer = producers(graph)
    convs = {index for index, node in enumerate(graph.node) if node.op_type in CONV_OP_TYPES}
    if not convs:
        raise InputError("the model has no Conv node: yoloq expects a YOLO detection model exported to ONNX")
    below = {index: downstream(graph, index, readers) for index in convs}
    decoding = {
        index
        for index in convs
        if not below[index] & convs and upstream_meets(graph, index, producer, float_tensors, RELAYOUT_OP_TYPES)
    }
    feature = convs - decoding
    head = {index for index in feature if not below[index] & feature}
    tail: set[int] = set().union(*(below[index] for index in head))
    stem = {index for index in feature if not upstream_meets(graph, index, producer, float_tensors, CONV_OP_TYPES)}
    floats = {index for index in tail if any(output in float_tensors for output in graph.node[index].output)}
    return HeadAnalysis(
        stem_convs=[names[index] for index in sorted(stem - head)],
        head_convs=[names[index] for index in sorted(head)],
        tail=[names[index] for index in sorted(floats)],
    )


def head_tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes after the head's last feature convolutions (the box-decoding tail): see analyze_head."""
    return analyze_head(model).tail


def quantizable_convs(model: onnx.ModelProto, head: HeadAnalysis) -> list[str]:
    """Every Conv that may be quantized (all but the decoding tail's), in graph order: the precision search's pool."""
    tail = set(head.tail)
    return [node.name for node in model.graph.node if node.op_type in CONV_OP_TYPES and node.name not in tail]


def default_float_convs(head: HeadAnalysis) -> list[str]:
    """The convs kept in float without a sensitivity analysis: the stem and the head's prediction convs."""
    return [*head.stem_convs, *head.head_convs]


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed or duplicate-named node a unique name (in place): exclusion lists work by node name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)


def prepare_model(fp32_onnx: Path) -> onnx.ModelProto:
    """Load, check, name nodes and run shape inference (calibration and Q/DQ insertion need tensor types)."""
    if not fp32_onnx.is_file():
        raise InputError(f"FP32 model {fp32_onnx} not found: run the export stage first")
    try:
        model = onnx.load(str(fp32_onnx))
    except Exception as exc:  # onnx raises several types for unreadable files
        raise InputError(f"{fp32_onnx} is not a readable ONNX model ({exc}): re-run the export stage") from exc
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise InputError(
            f"{fp32_onnx} uses opset {opset}; per-channel INT8 Q/DQ needs >= {MIN_OPSET}: set export.opset"
        )
    if any(node.op_type in QDQ_OP_TYPES for node in model.graph.node):
        raise InputError(f"{fp32_onnx} already holds Q/DQ nodes: quantize the FP32 export, not a quantized model")
    name_nodes(model)
    return onnx.shape_inference.infer_shapes(model)


def image_input(model: onnx.ModelProto) -> str:
    """The name of the model's one NCHW image input."""
    initializers = initializer_names(model.graph)
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise InputError(f"yoloq expects one NCHW image input; this model has {[value.name for value in inputs]}")
    return inputs[0].name


def initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {init.name for init in graph.initializer}


def float_tensor_names(model: onnx.ModelProto) -> set[str]:
    """Tensors with a float type after shape inference (inputs, outputs and value_info)."""
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    return {value.name for value in values if value.type.tensor_type.elem_type in FLOAT_TYPES}


def consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it (a node reading it twice is listed twice)."""
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    return readers


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that writes it."""
    return {output: index for index, node in enumerate(graph.node) for output in node.output}


def downstream(graph: onnx.GraphProto, start: int, readers: dict[str, list[int]]) -> set[int]:
    """Indices of all nodes reachable from node `start`'s outputs (not including `start`)."""
    seen: set[int] = set()
    queue: deque[str] = deque(graph.node[start].output)
    while queue:
        for index in readers.get(queue.popleft(), []):
            if index not in seen:
                seen.add(index)
                queue.extend(graph.node[index].output)
    return seen


def upstream_meets(
    graph: onnx.GraphProto, start: int, producer: dict[str, int], float_tensors: set[str], targets: Iterable[str]
) -> bool:
    """Whether walking back from node `start`'s data input over float tensors meets a `targets` op before a Conv."""
    wanted = frozenset(targets)
    seen: set[int] = set()
    queue = deque([graph.node[start].input[0]])
    while queue:
        index = producer.get(queue.popleft())
        if index is None or index in seen:
            continue
        seen.add(index)
        node = graph.node[index]
        if node.op_type in wanted:
            return True
        if node.op_type not in CONV_OP_TYPES:
            queue.extend(name for name in node.input if name in float_tensors)
    return False
