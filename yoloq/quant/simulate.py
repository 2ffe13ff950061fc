"""Integer-exact simulation of a Q/DQ model on the CPU: the same numbers on every x86 machine.

A Q/DQ model run as written (DequantizeLinear, then a float Conv) sums float products, and the order of that sum
depends on the kernel ONNX Runtime picks for the CPU (AVX2, AVX-512 and NCHWc kernels differ in the last bits).
A last-bit difference moves a value across a rounding boundary of the next QuantizeLinear now and then, and such
flips add up: the same Q/DQ model scored 0.9017 and 0.8966 agreement on 128 selection images with ONNX Runtime's
graph optimizations on and off (yolov5n, minmax, measured 2026-12-01), and two x86 machines chose different
candidates from the same inputs.

What an INT8 engine computes is an integer sum, scaled once: conv(x_q, w_q) * (s_x * s_w[c]) + bias. This module
rewrites every quantized Conv into exactly that, in float32 ops that are exact: the INT8 activation cast to float,
the INT8 weights as float, a Conv with no bias (each product is an integer of at most 2^14 and every partial sum
stays below 2^24 when the weights allow it, checked per conv: such sums are exact in float32 in any order), then
one Mul by the combined scale and one Add of the bias (single roundings, the same on every CPU). A conv whose
worst-case sum could exceed 2^24 keeps the float path (counted in the result). A float conv whose output reaches
a quantizer (the stem, float convs inside the network) is computed from fixed-point pieces the same way
(`_fixed_point_conv`: within 2^-14 of its input's range, finer than the engine's FP16); float convs that feed no
quantizer (the head's prediction convs) and every other op run as before: elementwise ops round once, the same
everywhere. Measured on yolov5n (benchmarks/exact_simulation.py): outputs are bit-identical with ONNX Runtime's
graph optimizations (NCHWc kernels) on and off, and on an AMD EPYC and an Intel Xeon, where the model as written
differs by up to 70 pixels in a box between the two kernel families; tests/test_simulate.py checks it on fixtures.

The rewrite changes only how the CPU evaluates the model (yoloq.backends.onnxruntime); the Q/DQ model that is
written, logged and built into engines is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXACT_LIMIT = float(2**24)  # float32 represents every integer up to this magnitude exactly
_INT8_MAGNITUDE = 128.0  # |q| <= 128 for an INT8 activation


@dataclass(frozen=True)
class ExactRewrite:
    model: onnx.ModelProto
    exact: tuple[str, ...]  # convs now computed as exact integer sums
    inexact: tuple[str, ...]  # quantized convs left on the float path (worst-case sum above 2^24)
    fixed_point: tuple[str, ...]  # float convs computed as exact sums of fixed-point pieces (see _fixed_point_conv)


def _zero(inits: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> bool:
    """The DequantizeLinear/QuantizeLinear has a zero point of 0 (or none)."""
    if len(node.input) < 3 or not node.input[2]:
        return True
    return node.input[2] in inits and not numpy_helper.to_array(inits[node.input[2]]).any()


def _scalar(inits: dict[str, onnx.TensorProto], name: str) -> float | None:
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return float(value.reshape(())) if value.size == 1 else None


def integer_exact(model: onnx.ModelProto) -> ExactRewrite:
    """A copy of `model` whose INT8 Convs (per-tensor INT8 activation, per-channel or per-tensor INT8 weights, zero
    points 0) compute conv(x_q, w_q) exactly, then scale and add the bias once."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {init.name: init for init in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    new_inits: list[onnx.TensorProto] = []
    casts: dict[str, str] = {}  # INT8 activation -> its float copy
    replaced: dict[int, list[onnx.NodeProto]] = {}
    exact: list[str] = []
    inexact: list[str] = []
    fixed: list[str] = []
    feeds_quantizer = _feeding_quantizers(graph)
    opset = next((entry.version for entry in out.opset_import if entry.domain in ("", "ai.onnx")), 17)

    for index, node in enumerate(graph.node):
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if (x_dq is None or x_dq.op_type != "DequantizeLinear") and node.input[1] in inits:
            if node.output[0] not in feeds_quantizer:
                continue  # nothing quantizes what it computes: its last bits cannot flip a rounding
            float_nodes = _fixed_point_conv(node, inits, new_inits, opset)
            if float_nodes:
                replaced[index] = float_nodes
                fixed.append(node.name)
            continue
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        x_scale = _scalar(inits, x_dq.input[1])
        if x_scale is None or not _zero(inits, x_dq) or not _zero(inits, w_dq) or w_dq.input[0] not in inits:
            continue
        weights_q = numpy_helper.to_array(inits[w_dq.input[0]])
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        if weights_q.dtype != np.int8 or w_dq.input[1] not in inits:
            continue
        w_scale = numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float32).reshape(-1)
        channels = weights_q.shape[0]
        if w_scale.size not in (1, channels) or (w_scale.size > 1 and axis != 0):
            continue
        x_source = x_dq.input[0]
        if not _is_int8(x_source, producer, inits):
            continue
        worst = _INT8_MAGNITUDE * np.abs(weights_q.astype(np.int64)).reshape(channels, -1).sum(axis=1).max()
        if worst >= EXACT_LIMIT:
            inexact.append(node.name)
            continue
        scale = (np.float32(x_scale) * np.broadcast_to(w_scale, (channels,))).astype(np.float32)
        replaced[index] = _integer_conv(node, x_source, weights_q, scale, inits, new_inits, casts)
        exact.append(node.name)

    nodes_out: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        nodes_out.extend(replaced.get(index, [node]))
    del graph.node[:]
    graph.node.extend(_live(nodes_out, [o.name for o in graph.output]))
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *(init for init in new_inits if init.name in used)])
    return ExactRewrite(out, tuple(exact), tuple(inexact), tuple(fixed))


def _integer_conv(
    node: onnx.NodeProto,
    x_source: str,
    weights_q: np.ndarray,
    scale: np.ndarray,
    inits: dict[str, onnx.TensorProto],
    new_inits: list[onnx.TensorProto],
    casts: dict[str, str],
) -> list[onnx.NodeProto]:
    """`node` as Conv(float(x_q), float(w_q)) * scale[c] (+ bias), writing its output; `casts` shares one Cast of an
    INT8 activation between the convs that read it."""
    stem = node.name or node.output[0]
    nodes: list[onnx.NodeProto] = []
    if x_source not in casts:
        casts[x_source] = f"{x_source}_exact_float"
        nodes.append(helper.make_node("Cast", [x_source], [casts[x_source]], f"{x_source}_exact_cast", to=1))
    weight_name, scale_name = f"{stem}_exact_weights", f"{stem}_exact_scale"
    new_inits.append(numpy_helper.from_array(weights_q.astype(np.float32), weight_name))
    new_inits.append(numpy_helper.from_array(scale.reshape(1, -1, 1, 1), scale_name))
    nodes.append(_conv_like(node, [casts[x_source], weight_name], f"{stem}_exact_sum"))
    nodes.append(
        helper.make_node("Mul", [f"{stem}_exact_sum", scale_name], [f"{stem}_exact_scaled"], f"{stem}_exact_mul")
    )
    return nodes + _bias_add(node, f"{stem}_exact_scaled", f"{stem}_exact", inits, new_inits)


def _conv_like(node: onnx.NodeProto, inputs: list[str], output: str) -> onnx.NodeProto:
    """A Conv with `node`'s attributes (kernel, strides, pads, groups) on other inputs, named after its output."""
    conv = helper.make_node("Conv", inputs, [output], output)
    conv.attribute.extend(node.attribute)
    return conv


def _has_bias(node: onnx.NodeProto) -> bool:
    return len(node.input) > 2 and bool(node.input[2])


def _bias_add(
    node: onnx.NodeProto, value: str, stem: str, inits: dict[str, onnx.TensorProto], new_inits: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """The nodes that write `node`'s output: `value` plus its bias (one value per channel), or `value` itself."""
    if not _has_bias(node):
        return [helper.make_node("Identity", [value], [node.output[0]], f"{stem}_out")]
    bias_name, reshaped = node.input[2], f"{stem}_bias"
    nodes: list[onnx.NodeProto] = []
    if bias_name in inits:
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32)
        new_inits.append(numpy_helper.from_array(bias.reshape(1, -1, 1, 1), reshaped))
    else:  # a computed bias: add it as it is
        shape_name = f"{stem}_bias_shape"
        new_inits.append(numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), shape_name))
        nodes.append(helper.make_node("Reshape", [bias_name, shape_name], [reshaped], f"{stem}_bias"))
    return [*nodes, helper.make_node("Add", [value, reshaped], [node.output[0]], f"{stem}_out")]


def _is_int8(name: str, producer: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]) -> bool:
    """`name` is an INT8 tensor: a QuantizeLinear output with an INT8 zero point, or an INT8 initializer."""
    if name in inits:
        return inits[name].data_type == TensorProto.INT8
    node = producer.get(name)
    if node is None or node.op_type != "QuantizeLinear":
        return False
    if len(node.input) < 3 or node.input[2] not in inits:
        return False  # QuantizeLinear without a zero point writes UINT8
    return inits[node.input[2]].data_type == TensorProto.INT8


def _feeding_quantizers(graph: onnx.GraphProto) -> set[str]:
    """Tensors from which some QuantizeLinear can be reached (their last bits can change a rounded value)."""
    reaching: set[str] = set()
    for node in reversed(graph.node):  # graph order is topological: readers are decided before producers
        if node.op_type == "QuantizeLinear" or any(o in reaching for o in node.output):
            reaching.update(name for name in node.input if name)
    return reaching


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """`nodes` without those whose outputs nothing reads (the DequantizeLinears the rewrite left unread)."""
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    return keep[::-1]


PIECE_BITS_MAX = 12  # at most 12 bits per piece of a float conv's input
_WEIGHT_BITS = 8  # 8 bits per piece of a float conv's weights (two pieces: 16 bits relative to the channel's max)


def _split(values: np.ndarray, unit: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, low_unit): values ~= unit * a + low_unit * b, low_unit = unit / 2^bits, with integer a and b of at most
    `bits` bits (per output channel)."""
    first = np.round(values / unit)
    low_unit = unit / 2.0**bits
    second = np.round((values - first * unit) / low_unit)
    return first, second, low_unit


def _fixed_point_conv(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], new_inits: list[onnx.TensorProto], opset: int
) -> list[onnx.NodeProto]:
    """A float Conv with constant weights as exact integer convs: its input in two fixed-point pieces of a per-image
    unit (max |x| of the image), its weights in two 8-bit pieces per output channel; every piece conv sums
    integers below 2^24, and the pieces are combined by elementwise ops in a fixed order. Deterministic on any CPU,
    and within 2^-14 of the input's and 2^-16 of the weights' range: finer than the FP16 that the engine's float
    part runs in. [] when the weights' sums leave no input bits or the bias is computed (then the conv stays as it
    is)."""
    if _has_bias(node) and node.input[2] not in inits:
        return []
    weights = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    channels = weights.shape[0]
    flat = weights.reshape(channels, -1)
    channel_max = np.abs(flat).max(axis=1)
    unit = np.where(channel_max > 0, channel_max / 2.0**_WEIGHT_BITS, 1.0).reshape(-1, *([1] * (weights.ndim - 1)))
    high, low, low_unit = _split(weights, unit, _WEIGHT_BITS)
    l1 = max(np.abs(high).reshape(channels, -1).sum(axis=1).max(), np.abs(low).reshape(channels, -1).sum(axis=1).max())
    x_bits = min(PIECE_BITS_MAX, int(np.floor(np.log2((EXACT_LIMIT - 1) / max(l1, 1.0)))))
    if x_bits < 6:
        return []
    stem = f"{node.name or node.output[0]}_fixed"
    x = node.input[0]

    def const(suffix: str, value: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(value.astype(np.float32), f"{stem}_{suffix}"))
        return f"{stem}_{suffix}"

    def make(op: str, inputs: list[str], suffix: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{stem}_{suffix}"], f"{stem}_{suffix}", **attrs))
        return f"{stem}_{suffix}"

    nodes: list[onnx.NodeProto] = []
    absolute = make("Abs", [x], "abs")
    if opset >= 18:
        axes = f"{stem}_axes"
        new_inits.append(numpy_helper.from_array(np.array([1, 2, 3], np.int64), axes))
        peak = make("ReduceMax", [absolute, axes], "max", keepdims=1)
    else:
        peak = make("ReduceMax", [absolute], "max", axes=[1, 2, 3], keepdims=1)
    peak = make("Max", [peak, const("tiny", np.array(1e-30))], "peak")
    unit_1 = make("Mul", [peak, const("step_1", np.array(2.0**-x_bits))], "unit_1")  # exact: a power of two
    unit_2 = make("Mul", [unit_1, const("step_2", np.array(2.0**-x_bits))], "unit_2")
    piece_1 = make("Round", [make("Div", [x, unit_1], "ratio_1")], "piece_1")
    rest = make("Sub", [x, make("Mul", [piece_1, unit_1], "part_1")], "rest")
    piece_2 = make("Round", [make("Div", [rest, unit_2], "ratio_2")], "piece_2")
    w_high, w_low = const("w_high", high), const("w_low", low)
    s_high = const("s_high", unit.reshape(1, channels, 1, 1))
    s_low = const("s_low", low_unit.reshape(1, channels, 1, 1))
    sums = []
    for i, piece in ((1, piece_1), (2, piece_2)):
        parts = []
        for tag, w, scale in (("high", w_high, s_high), ("low", w_low, s_low)):
            nodes.append(_conv_like(node, [piece, w], f"{stem}_conv_{i}_{tag}"))
            parts.append(make("Mul", [f"{stem}_conv_{i}_{tag}", scale], f"scaled_{i}_{tag}"))
        sums.append(make("Add", parts, f"sum_{i}"))
    total = make("Add", [make("Mul", [sums[0], unit_1], "value_1"), make("Mul", [sums[1], unit_2], "value_2")], "total")
    return nodes + _bias_add(node, total, stem, inits, new_inits)
