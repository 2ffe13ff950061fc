"""Q/DQ placement: which tensors get a Q/DQ pair, which nodes read the dequantized copy, which share one scale.

Each rule is a named function over the graph, after TensorRT's "Q/DQ layer-placement recommendations" (developer
guide, explicit quantization) and what NVIDIA ModelOpt's ONNX PTQ does for CNNs (quantize weighted ops, residual
Add inputs and Concat inputs with one scale; let pooling and resizing pass INT8 through):

1. `conv_inputs`: the activation input and the weights of every quantized Conv. A Conv's own output is not
   quantized: TensorRT fuses Conv + activation (+ residual Add) and quantizes the result only where the next
   quantized reader wants it.
2. `residual_add_inputs`: a residual Add whose branch ends in a quantized conv gets a Q/DQ on its shortcut, and
   on the branch too when an activation (SiLU, ReLU, ...) lies between conv and Add, as in YOLO's bottlenecks:
   TensorRT then runs conv + activation with an INT8 output and the Add on INT8 tensors, instead of an FP32 conv
   and a float Add (measured by the per-layer profile, see the function).
3. `concat_inputs`: a Concat whose every reader reads it quantized gets a Q/DQ on every input, all with the
   output's scale (one scale group), so TensorRT concatenates INT8 in place and the producers write INT8.
4. `pass_through_inputs`: MaxPool, nearest Resize, Split and Slice only move values; when every reader of their
   outputs reads them quantized, their input is quantized with the same scale, so they run in INT8.
Rules 3 and 4 feed each other (SPPF's MaxPool chain ends in a Concat; C2f's Split feeds one), so they run to a
fixed point. Never quantized: the head's decoding tail (yoloq.quant.graph) and the convs kept in float.

One tensor gets at most one Q/DQ pair; a scale group (tensors joined by rules 3 and 4) gets one scale: the largest
range of its members, which is also the range of the Concat output that joins them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import onnx

from yoloq.errors import InputError
from yoloq.quant.graph import CONV_OP_TYPES, HeadAnalysis, float_tensor_names, initializer_names, quantizable_convs

RULES = ("conv input", "residual add", "concat input", "pass-through")
ACTIVATION_OP_TYPES = frozenset({"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Elu", "Clip", "Tanh"})
PASS_THROUGH_OP_TYPES = frozenset({"MaxPool", "Resize", "Split", "Slice"})
_MAX_ACTIVATION_DEPTH = 3  # Conv -> Sigmoid -> Mul (SiLU) at most


@dataclass(frozen=True)
class QuantizedTensor:
    tensor: str  # the float tensor that gets one Q/DQ pair
    readers: tuple[str, ...]  # nodes that read its dequantized copy (any other reader keeps the float tensor)
    rules: tuple[str, ...]  # for each reader, the rule (one of RULES) that made it read the quantized copy
    group: str  # scale group: every tensor of a group gets the same scale


@dataclass(frozen=True)
class Placement:
    activations: tuple[QuantizedTensor, ...]  # in graph order of their first reader
    weighted: tuple[str, ...]  # convs whose weights are quantized (per output channel)
    excluded: tuple[str, ...]  # nodes kept in float: the decoding tail, then the float convs

    def group_amax(self, amax: dict[str, float]) -> dict[str, float]:
        """The range of each quantized tensor: the largest range of its scale group."""
        missing = sorted(q.tensor for q in self.activations if q.tensor not in amax)
        if missing:
            raise InputError(f"no calibration range for {missing[:3]}: the statistics are from another model")
        largest: dict[str, float] = {}
        for q in self.activations:
            largest[q.group] = max(largest.get(q.group, 0.0), amax[q.tensor])
        return {q.tensor: largest[q.group] for q in self.activations}

    def rule_counts(self) -> dict[str, int]:
        """How many (tensor, reader) edges each rule quantized (for reports)."""
        return {rule: sum(q.rules.count(rule) for q in self.activations) for rule in RULES}


class _Graph:
    """Read-only indices over a model's graph for the placement rules."""

    def __init__(self, model: onnx.ModelProto, excluded: set[str]) -> None:
        self.nodes = list(model.graph.node)
        self.index = {node.name: position for position, node in enumerate(self.nodes)}
        self.excluded = excluded
        constants = initializer_names(model.graph)
        floats = float_tensor_names(model)
        self.activation = {name for name in floats if name not in constants}  # float tensors computed at run time
        self.producer = {output: node for node in self.nodes for output in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in dict.fromkeys(node.input):
                self.readers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in model.graph.output}

    def order(self, tensor: str) -> int:
        """Graph position of the tensor's producer (-1: a graph input)."""
        producer = self.producer.get(tensor)
        return self.index[producer.name] if producer is not None else -1


class _Edges:
    """Quantized (tensor, reader) edges with the rule that placed them, and scale groups (union-find)."""

    def __init__(self) -> None:
        self.readers: dict[str, dict[str, str]] = {}  # tensor -> {reader node: rule}
        self.parent: dict[str, str] = {}

    def add(self, tensor: str, reader: str, rule: str) -> bool:
        readers = self.readers.setdefault(tensor, {})
        if reader in readers:
            return False
        readers[reader] = rule
        return True

    def quantized_for(self, tensor: str, reader: str) -> bool:
        return reader in self.readers.get(tensor, {})

    def find(self, tensor: str) -> str:
        root = tensor
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        self.parent[tensor] = root
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller name leads: deterministic groups


def conv_inputs(graph: _Graph, edges: _Edges, quantized_convs: Sequence[str]) -> None:
    """Rule 1: the activation input of every quantized Conv (its weights are quantized by the Q/DQ writer)."""
    for name in quantized_convs:
        node = graph.nodes[graph.index[name]]
        if node.input[0] not in graph.activation:
            raise InputError(f"{name}: its input {node.input[0]!r} is not a float activation; cannot quantize it")
        edges.add(node.input[0], name, "conv input")


def _quantized_conv_depth(graph: _Graph, tensor: str, quantized: set[str], depth: int = 0) -> int | None:
    """How many pointwise activations lie between a quantized conv and `tensor` (0: the conv's own output), or
    None when `tensor` does not come from a quantized conv that way (SiLU: x * sigmoid(x) counts as one)."""
    node = graph.producer.get(tensor)
    if node is None or depth > _MAX_ACTIVATION_DEPTH:
        return None
    if node.op_type in CONV_OP_TYPES:
        return depth if node.name in quantized else None
    if node.op_type in ACTIVATION_OP_TYPES:
        return _quantized_conv_depth(graph, node.input[0], quantized, depth + 1)
    if node.op_type == "Mul" and len(node.input) == 2:  # SiLU / Swish: x * Sigmoid(x)
        for x, gate in (node.input, node.input[::-1]):
            gate_node = graph.producer.get(gate)
            if gate_node is not None and gate_node.op_type in ("Sigmoid", "HardSigmoid") and gate_node.input[0] == x:
                return _quantized_conv_depth(graph, x, quantized, depth + 1)
    return None


def residual_add_inputs(graph: _Graph, edges: _Edges, quantized_convs: Sequence[str]) -> None:
    """Rule 2: in `Add(shortcut, branch)` where the branch (the input computed later) ends in a quantized conv,
    quantize the shortcut. When an activation lies between that conv and the Add (YOLO's conv -> SiLU -> Add),
    quantize the branch too: TensorRT then fuses conv + activation with an INT8 output and adds two INT8 tensors.
    (Measured, yolov8s on TensorRT 8.6 at level 2: with a float branch the bottleneck's second conv ran an FP32
    kernel and SiLU + Add a separate float layer; ModelOpt's graph, both inputs quantized, ran it INT8 + fused.)
    For conv -> Add (ResNet's order) the branch stays float, so TensorRT fuses conv + Add. Adds of the decoding
    tail and Adds with a constant input are left alone."""
    quantized = set(quantized_convs)
    for node in graph.nodes:
        if node.op_type != "Add" or node.name in graph.excluded or len(node.input) != 2:
            continue
        if not all(name in graph.activation for name in node.input) or node.input[0] == node.input[1]:
            continue
        shortcut, branch = sorted(node.input, key=graph.order)
        depth = _quantized_conv_depth(graph, branch, quantized)
        if depth is None:
            continue
        edges.add(shortcut, node.name, "residual add")
        if depth > 0:
            edges.add(branch, node.name, "residual add")


def _all_readers_quantized(graph: _Graph, edges: _Edges, tensor: str) -> bool:
    readers = graph.readers.get(tensor, [])
    if not readers or tensor in graph.outputs:
        return False
    return all(edges.quantized_for(tensor, reader.name) for reader in readers)


def concat_inputs(graph: _Graph, edges: _Edges) -> bool:
    """Rule 3: a Concat read only by quantized readers gets every input quantized with its output's scale.
    Returns whether anything changed."""
    changed = False
    for node in graph.nodes:
        if node.op_type != "Concat" or node.name in graph.excluded:
            continue
        output = node.output[0]
        if not all(name in graph.activation for name in node.input) or not _all_readers_quantized(graph, edges, output):
            continue
        for name in node.input:
            changed |= edges.add(name, node.name, "concat input")
            edges.union(name, output)
    return changed


def pass_through_inputs(graph: _Graph, edges: _Edges) -> bool:
    """Rule 4: MaxPool / nearest Resize / Split / Slice whose every output is read only quantized get their data
    input quantized with the same scale. Returns whether anything changed."""
    changed = False
    for node in graph.nodes:
        if node.op_type not in PASS_THROUGH_OP_TYPES or node.name in graph.excluded:
            continue
        if node.op_type == "Resize" and _attribute(node, "mode", b"nearest") != b"nearest":
            continue  # interpolation mixes values: not a pass-through
        data = node.input[0]
        if data not in graph.activation or not all(_all_readers_quantized(graph, edges, out) for out in node.output):
            continue
        changed |= edges.add(data, node.name, "pass-through")
        for output in node.output:
            edges.union(data, output)
    return changed


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def place_qdq(
    model: onnx.ModelProto, head: HeadAnalysis, float_nodes: Sequence[str], rules: Collection[str] = RULES
) -> Placement:
    """Apply `rules` (default: all of RULES) to `model` (shape-inferred, named nodes), `float_nodes` (convs) kept in
    float. Rule 1 always applies; leaving out the others serves ablations (what each rule costs or gains)."""
    unknown_rules = sorted(set(rules) - set(RULES))
    if unknown_rules:
        raise InputError(f"unknown placement rules {unknown_rules}: valid are {', '.join(RULES)}")
    convs = quantizable_convs(model, head)
    unknown = sorted(set(float_nodes) - set(convs))
    if unknown:
        raise InputError(f"float layers {unknown[:5]} are not quantizable convs of the model")
    excluded = list(dict.fromkeys([*head.tail, *float_nodes]))
    quantized_convs = [name for name in convs if name not in set(float_nodes)]
    if not quantized_convs:
        raise InputError(f"nothing left to quantize after keeping {len(float_nodes)} convs in float")
    graph = _Graph(model, set(excluded))
    edges = _Edges()
    conv_inputs(graph, edges, quantized_convs)
    if "residual add" in rules:
        residual_add_inputs(graph, edges, quantized_convs)
    grouping = [
        rule for name, rule in (("concat input", concat_inputs), ("pass-through", pass_through_inputs)) if name in rules
    ]
    while any([rule(graph, edges) for rule in grouping]):  # a list: every rule runs in each round
        pass
    first_reader = {tensor: min(graph.index[reader] for reader in readers) for tensor, readers in edges.readers.items()}
    activations = []
    for tensor, readers in sorted(edges.readers.items(), key=lambda item: (first_reader[item[0]], item[0])):
        ordered = sorted(readers, key=graph.index.__getitem__)
        activations.append(
            QuantizedTensor(tensor, tuple(ordered), tuple(readers[r] for r in ordered), edges.find(tensor))
        )
    return Placement(tuple(activations), tuple(quantized_convs), tuple(excluded))


def calibration_tensors(model: onnx.ModelProto, head: HeadAnalysis) -> list[str]:
    """Every activation some placement may quantize (for any choice of float convs), sorted: statistics over these
    serve every candidate of the search."""
    graph = _Graph(model, set(head.tail))
    names: set[str] = set()
    for node in graph.nodes:
        if node.name in graph.excluded:
            continue
        if node.op_type in CONV_OP_TYPES or node.op_type in PASS_THROUGH_OP_TYPES:
            names.add(node.input[0])
            if node.op_type in PASS_THROUGH_OP_TYPES:
                names.update(node.output)
        elif node.op_type in ("Add", "Concat"):
            names.update(node.input)
            if node.op_type == "Concat":
                names.add(node.output[0])
    return sorted(name for name in names if name in graph.activation)
