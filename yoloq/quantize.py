"""Stage 3, quantize: an FP32 YOLO ONNX model -> an explicit INT8 Q/DQ ONNX model that TensorRT can consume.

What the output looks like (TensorRT's explicit-quantization rules):
- symmetric INT8 everywhere (zero point 0), activations per tensor, Conv weights per output channel, float bias;
- Q/DQ pairs only where TensorRT wants them: on the inputs of every Conv and of the residual Adds. Conv outputs
  are not quantized, so TensorRT fuses Conv+SiLU(+Add) and runs the fused layer in INT8;
- the detection head's box-decoding tail (see `head_tail_nodes`) stays in float: it mixes pixel coordinates and
  probabilities in one tensor, which no single INT8 scale can hold (quantizing it drops mAP to 0).

Calibration streams: an augmented copy of the model returns the activations to calibrate for a few images at a
time, and only running statistics are kept (a max |x| per tensor, plus a 2048-bin |x| histogram per tensor for
entropy and percentile). Memory stays bounded by one sub-batch of activations whatever the image count.
ONNX Runtime's own calibrators are not used: in onnxruntime 1.32 MinMax with `CalibMaxIntermediateOutputs`
drops every full chunk without computing its range (hence "No data is collected" when the chunk size divides the
sample count), and the histogram calibrators keep every activation of every image in memory.
ONNX Runtime's `QDQQuantizer` inserts the Q/DQ nodes from the ranges collected here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QDQQuantizer, QuantType, TensorsData

from yoloq.artifacts import atomic_path
from yoloq.calibration_data import CalibrationDataLoader
from yoloq.errors import InputError

ALGORITHMS = ("minmax", "entropy", "percentile")
QUANTIZED_OP_TYPES = ("Conv", "Add")  # TensorRT placement: inputs of weighted ops and of residual adds
CONV_OP_TYPES = frozenset({"Conv", "ConvTranspose"})
RELAYOUT_OP_TYPES = frozenset({"Reshape", "Flatten"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16})
HISTOGRAM_BINS = 2048
ENTROPY_QUANT_BINS = 128  # INT8 magnitudes: 128 levels on each side of zero
CALIBRATION_SUB_BATCH = 2  # images per calibration inference: bounds the activations held at once
MIN_OPSET = 13  # per-channel DequantizeLinear (axis attribute)


@dataclass(frozen=True)
class QuantizeResult:
    qdq_path: Path
    excluded_nodes: list[str]  # stayed in float: the head's decoding tail, then `extra_excluded`
    head_tail_nodes: list[str]  # the part of excluded_nodes found by `head_tail_nodes`
    quantized_nodes: int  # nodes that read at least one dequantized (INT8) tensor
    algorithm: str
    calibration_images: int
    seconds: float


# ---------------------------------------------------------------------------------------------------------------
# Graph analysis: the head's decoding tail
# ---------------------------------------------------------------------------------------------------------------


def head_tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes after the head's last feature convolutions (the box-decoding tail), in graph order.

    The rule, with no node names involved:
    1. A *decoding conv* is a Conv from which no other Conv is reachable and whose input was re-laid out: walking
       back from its input over float tensors meets a Reshape/Flatten before any Conv. This is the fixed 16->1
       DFL convolution of YOLOv8/11 heads (Reshape -> Transpose -> Softmax -> Conv); YOLOv5 has none.
    2. Every other Conv is a *feature conv*. The *head convs* are the feature convs from which no other feature
       conv is reachable: the 1x1 prediction convs, one per output level (and per branch in v8/11 heads).
    3. The tail is everything reachable downstream of the head convs (not the head convs themselves): YOLOv5's
       Reshape/Transpose/Sigmoid/Split/Mul/Add/Pow/Concat decode, YOLOv8/11's per-level Concat, Reshape, Split,
       DFL (Softmax + decoding conv), anchor/stride arithmetic, class Sigmoid and the final Concat.
    Only nodes with a float output are listed (integer shape arithmetic is never quantized).
    """
    graph = model.graph
    names = [node.name for node in graph.node]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise InputError("head_tail_nodes needs unique, non-empty node names: call name_nodes(model) first")
    float_tensors = _float_tensor_names(model)
    consumers = _consumers(graph)
    producer = {output: index for index, node in enumerate(graph.node) for output in node.output}
    conv_indices = [index for index, node in enumerate(graph.node) if node.op_type in CONV_OP_TYPES]
    if not conv_indices:
        raise InputError("the model has no Conv node: quantize_qdq expects a YOLO detection model exported to ONNX")
    below = {index: _downstream(graph, index, consumers) for index in conv_indices}
    decoding = {
        index
        for index in conv_indices
        if not (below[index] & set(conv_indices)) and _relaid_out(graph, index, producer, float_tensors)
    }
    feature = [index for index in conv_indices if index not in decoding]
    head_convs = [index for index in feature if not (below[index] & set(feature))]
    tail: set[int] = set().union(*(below[index] for index in head_convs))
    return [
        graph.node[index].name
        for index in sorted(tail)
        if any(output in float_tensors for output in graph.node[index].output)
    ]


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed or duplicate-named node a unique name (in place): exclusion lists work by node name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)


def _float_tensor_names(model: onnx.ModelProto) -> set[str]:
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    return {value.name for value in values if value.type.tensor_type.elem_type in FLOAT_TYPES}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    return consumers


def _downstream(graph: onnx.GraphProto, start: int, consumers: dict[str, list[int]]) -> set[int]:
    """Indices of all nodes reachable from node `start`'s outputs (not including `start`)."""
    seen: set[int] = set()
    queue = deque(graph.node[start].output)
    while queue:
        for index in consumers.get(queue.popleft(), []):
            if index not in seen:
                seen.add(index)
                queue.extend(graph.node[index].output)
    return seen


def _relaid_out(graph: onnx.GraphProto, conv: int, producer: dict[str, int], float_tensors: set[str]) -> bool:
    """Whether walking back from the conv's data input over float tensors meets a Reshape/Flatten before a Conv."""
    seen: set[int] = set()
    queue = deque([graph.node[conv].input[0]])
    while queue:
        index = producer.get(queue.popleft())
        if index is None or index in seen:
            continue
        seen.add(index)
        node = graph.node[index]
        if node.op_type in RELAYOUT_OP_TYPES:
            return True
        if node.op_type not in CONV_OP_TYPES:
            queue.extend(name for name in node.input if name in float_tensors)
    return False


# ---------------------------------------------------------------------------------------------------------------
# Calibration: streaming statistics
# ---------------------------------------------------------------------------------------------------------------


def percentile_amax(hist: np.ndarray, amax: float, percentile: float) -> float:
    """Smallest |x| threshold (a bin's upper edge) below which `percentile` % of the histogram's values lie."""
    total = hist.sum()
    if total == 0 or amax == 0:
        return amax
    cdf = np.cumsum(hist) / total
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return min(amax, (min(index, len(hist) - 1) + 1) * amax / len(hist))


def entropy_amax(hist: np.ndarray, amax: float, quant_bins: int = ENTROPY_QUANT_BINS) -> float:
    """TensorRT-style entropy calibration on a |x| histogram: the threshold minimising KL(P || Q).

    For each candidate threshold i (in bins, from `quant_bins` up), P is the histogram clipped at i (outliers
    folded into its last bin) and Q is P squeezed into `quant_bins` levels and expanded back over P's non-empty
    bins. Ties go to the largest threshold, as in NVIDIA's pytorch-quantization.
    """
    counts = hist.astype(np.float64)
    if counts.sum() == 0 or amax == 0:
        return amax
    counts[0] = counts[1]  # a spike of exact zeros would otherwise dominate the divergence
    total = counts.sum()
    best_index, best_divergence = len(counts), np.inf
    for i in range(quant_bins, len(counts) + 1):
        reference = counts[:i].copy()
        reference[-1] += total - reference.sum()
        nonzero = counts[:i] != 0
        level = (np.arange(i) * quant_bins) // i
        level_sum = np.bincount(level[nonzero], weights=counts[:i][nonzero], minlength=quant_bins)
        level_count = np.bincount(level[nonzero], minlength=quant_bins)
        expanded = np.where(nonzero, level_sum[level] / np.maximum(level_count[level], 1), 0.0)
        divergence = _kl_divergence(reference, expanded)
        if divergence <= best_divergence:
            best_index, best_divergence = i, divergence
    return best_index * amax / len(counts)


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _calibration_session(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    """A CPU session on a copy of `model` that also returns `tensors` as outputs."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    values = {value.name: value for value in augmented.graph.value_info}
    outputs = {output.name for output in augmented.graph.output}
    for name in tensors:
        if name not in outputs and name in values:  # graph inputs are read from the feed instead
            augmented.graph.output.append(values[name])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact FP32 activations
    return ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _activations(
    session: ort.InferenceSession, loader: Iterable[dict[str, np.ndarray]], input_name: str, tensors: list[str]
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Per sub-batch of at most CALIBRATION_SUB_BATCH images: (image count, {tensor name: activation})."""
    for batch in loader:
        images = batch[input_name]
        for start in range(0, len(images), CALIBRATION_SUB_BATCH):
            sub_batch = images[start : start + CALIBRATION_SUB_BATCH]
            computed = [name for name in tensors if name != input_name]
            values = dict(zip(computed, session.run(computed, {input_name: sub_batch}), strict=True))
            if input_name in tensors:
                values[input_name] = sub_batch
            yield len(sub_batch), values


def collect_amax(
    session: ort.InferenceSession, loader: Iterable[dict[str, np.ndarray]], input_name: str, tensors: list[str]
) -> tuple[dict[str, float], int]:
    """Max |x| per tensor over all calibration images, and how many images were seen."""
    amax = dict.fromkeys(tensors, 0.0)
    images = 0
    for count, values in _activations(session, loader, input_name, tensors):
        images += count
        for name, value in values.items():
            if value.size:
                amax[name] = max(amax[name], float(value.max()), -float(value.min()))
    return amax, images


def collect_histograms(
    session: ort.InferenceSession,
    loader: Iterable[dict[str, np.ndarray]],
    input_name: str,
    amax: dict[str, float],
    bins: int = HISTOGRAM_BINS,
) -> dict[str, np.ndarray]:
    """Histograms of |x| per tensor with `bins` equal bins over [0, amax] (amax from a first pass)."""
    tensors = [name for name, value in amax.items() if value > 0]
    hists = {name: np.zeros(bins, dtype=np.int64) for name in tensors}
    for _, values in _activations(session, loader, input_name, tensors):
        for name, value in values.items():
            index = (np.abs(value.ravel()) * np.float32(bins / amax[name])).astype(np.int32)
            np.minimum(index, bins - 1, out=index)
            hists[name] += np.bincount(index, minlength=bins)
    return hists


def calibrate(
    model: onnx.ModelProto,
    tensors: list[str],
    loader: Iterable[dict[str, np.ndarray]],
    input_name: str,
    algorithm: str,
    percentile: float,
) -> tuple[dict[str, float], int]:
    """Symmetric range (amax) per tensor with the chosen algorithm, and the number of calibration images."""
    session = _calibration_session(model, tensors)
    amax, images = collect_amax(session, loader, input_name, tensors)
    if images == 0:
        raise InputError("the calibration data loader yielded no images: check calibration.images")
    if algorithm == "minmax":
        return amax, images
    hists = collect_histograms(session, loader, input_name, amax)
    if algorithm == "percentile":
        return {name: percentile_amax(hists[name], value, percentile) if name in hists else value
                for name, value in amax.items()}, images
    return {name: entropy_amax(hists[name], value) if name in hists else value for name, value in amax.items()}, images


# ---------------------------------------------------------------------------------------------------------------
# Q/DQ insertion
# ---------------------------------------------------------------------------------------------------------------


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
        raise InputError(f"{fp32_onnx} uses opset {opset}; per-channel INT8 Q/DQ needs >= {MIN_OPSET}: set export.opset")
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        raise InputError(f"{fp32_onnx} already holds Q/DQ nodes: quantize the FP32 export, not a quantized model")
    name_nodes(model)
    return onnx.shape_inference.infer_shapes(model)


def _image_input(model: onnx.ModelProto) -> str:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise InputError("quantize_qdq expects one NCHW image input; this model has "
                         f"{[value.name for value in inputs]}")
    return inputs[0].name


def _tensors_to_calibrate(model: onnx.ModelProto, excluded: set[str]) -> list[str]:
    """Float activations read or written by the nodes that will be quantized (sorted, for a stable order)."""
    initializers = {init.name for init in model.graph.initializer}
    float_tensors = _float_tensor_names(model)
    names = {
        name
        for node in model.graph.node
        if node.op_type in QUANTIZED_OP_TYPES and node.name not in excluded
        for name in (*node.input, *node.output)
        if name in float_tensors and name not in initializers
    }
    return sorted(names)


def insert_qdq(model: onnx.ModelProto, amax: dict[str, float], excluded: Sequence[str]) -> onnx.ModelProto:
    """ONNX Runtime's QDQ insertion with TensorRT's settings: symmetric INT8, per-channel weights, float bias."""
    ranges = {name: (np.array(-value, np.float32), np.array(value, np.float32)) for name, value in amax.items()}
    quantizer = QDQQuantizer(
        model,
        True,  # per_channel
        False,  # reduce_range
        QuantType.QInt8,  # weights
        QuantType.QInt8,  # activations
        TensorsData(CalibrationMethod.MinMax, ranges),
        None,  # nodes_to_quantize: all of QUANTIZED_OP_TYPES ...
        list(excluded),  # ... except these
        list(QUANTIZED_OP_TYPES),
        {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,  # TensorRT takes float bias; INT32 DequantizeLinear is not supported
            "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
        },
    )
    quantizer.quantize_model()
    return quantizer.model.model


def count_quantized_nodes(model: onnx.ModelProto) -> int:
    """Nodes (other than Q/DQ) that read at least one DequantizeLinear output."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(
        1
        for node in model.graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(n in dequantized for n in node.input)
    )


def quantize_qdq(
    fp32_onnx: Path,
    loader: CalibrationDataLoader,
    algorithm: str,
    percentile: float,
    out_path: Path,
    extra_excluded: Sequence[str] = (),
) -> QuantizeResult:
    """Calibrate `fp32_onnx` on `loader` and write the INT8 Q/DQ model to `out_path` (atomically)."""
    started = time.perf_counter()
    if algorithm not in ALGORITHMS:
        raise InputError(f"calibration.algorithm {algorithm!r} is unknown: use one of {', '.join(ALGORITHMS)}")
    if algorithm == "percentile" and not 90.0 < percentile <= 100.0:
        raise InputError(f"calibration.percentile {percentile} is outside (90, 100]: e.g. 99.99")
    model = prepare_model(fp32_onnx)
    input_name = _image_input(model)
    if loader.input_name != input_name:
        raise InputError(f"the calibration loader feeds {loader.input_name!r} but {fp32_onnx} reads {input_name!r}")
    tail = head_tail_nodes(model)
    node_names = {node.name for node in model.graph.node}
    unknown = [name for name in extra_excluded if name not in node_names]
    if unknown:
        raise InputError(f"extra excluded nodes not in {fp32_onnx}: {unknown[:5]}: use node names from the model")
    excluded = tail + [name for name in extra_excluded if name not in tail]
    tensors = _tensors_to_calibrate(model, set(excluded))
    if not tensors:
        raise InputError(f"{fp32_onnx}: nothing left to quantize after excluding {len(excluded)} nodes")
    amax, images = calibrate(model, tensors, loader, input_name, algorithm, percentile)
    quantized = insert_qdq(model, amax, excluded)
    with atomic_path(out_path) as tmp:
        onnx.save(quantized, str(tmp))
    return QuantizeResult(
        qdq_path=out_path,
        excluded_nodes=excluded,
        head_tail_nodes=tail,
        quantized_nodes=count_quantized_nodes(quantized),
        algorithm=algorithm,
        calibration_images=images,
        seconds=time.perf_counter() - started,
    )
