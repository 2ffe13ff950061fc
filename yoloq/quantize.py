"""Stage 3, quantize: an FP32 YOLO ONNX model -> an explicit INT8 Q/DQ ONNX model that TensorRT can consume.

What the output looks like (TensorRT's explicit-quantization rules):
- symmetric INT8 everywhere (zero point 0), activations per tensor, Conv weights per output channel, float bias;
- Q/DQ only where TensorRT's placement rules want them: on the activation input and the weights of every Conv
  (one Q/DQ pair per tensor, shared by all its readers). Conv outputs are not quantized, so TensorRT fuses
  Conv+SiLU and keeps the output precise for whatever reads it;
- the detection head's box-decoding tail (see `analyze_head`) stays in float: it mixes pixel coordinates and
  probabilities in one tensor, which no single INT8 scale can hold (quantizing it drops mAP to 0);
- by default the stem conv (reads the image) and the head's last convs (produce the raw predictions) stay in
  float too: 4 of yolov5n's 60 convs, found by graph analysis like the tail. Measured on yolov5n with minmax
  (mAP50-95 points vs FP32, ORT CPU): -0.7 / -1.5 on val 64 / val-extra 461 without them, +0.2 / -0.6 with.

Algorithms (symmetric, so each picks one amax per tensor): minmax (the default: max |x|), percentile (the
given percentile of |x|), entropy (TensorRT's KL-divergence threshold), mse (the threshold with the least
quantization mean squared error over the histogram, as NVIDIA's pytorch-quantization "mse" calibrator). Entropy
clips YOLO's long-tailed SiLU activations too hard: -5 points on yolov5n, like TensorRT's entropy calibrator.
All four come from one set of statistics (`TensorStats`), so comparing them costs one calibration pass.

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

ALGORITHMS = ("minmax", "entropy", "percentile", "mse")
QUANTIZED_OP_TYPES = ("Conv",)  # TensorRT placement: inputs of weighted ops (quantizing Adds too cost accuracy)
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
    excluded_nodes: list[str]  # stayed in float: head_tail_nodes + sensitive_nodes + the caller's extra_excluded
    head_tail_nodes: list[str]  # the box-decoding tail (analyze_head): never quantized
    sensitive_nodes: list[str]  # stem and head convs kept in float (empty with keep_sensitive_float=False)
    quantized_nodes: int  # nodes that read at least one dequantized (INT8) tensor
    algorithm: str
    calibration_images: int
    seconds: float


# ---------------------------------------------------------------------------------------------------------------
# Graph analysis: the head's decoding tail
# ---------------------------------------------------------------------------------------------------------------


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
    float_tensors = _float_tensor_names(onnx.shape_inference.infer_shapes(model))
    consumers = _consumers(graph)
    producer = {output: index for index, node in enumerate(graph.node) for output in node.output}
    convs = {index for index, node in enumerate(graph.node) if node.op_type in CONV_OP_TYPES}
    if not convs:
        raise InputError("the model has no Conv node: quantize_qdq expects a YOLO detection model exported to ONNX")
    below = {index: _downstream(graph, index, consumers) for index in convs}
    decoding = {
        index
        for index in convs
        if not below[index] & convs and _upstream_meets(graph, index, producer, float_tensors, RELAYOUT_OP_TYPES)
    }
    feature = convs - decoding
    head = {index for index in feature if not below[index] & feature}
    tail: set[int] = set().union(*(below[index] for index in head))
    stem = {index for index in feature if not _upstream_meets(graph, index, producer, float_tensors, CONV_OP_TYPES)}
    floats = {index for index in tail if any(output in float_tensors for output in graph.node[index].output)}
    return HeadAnalysis(
        stem_convs=[names[index] for index in sorted(stem - head)],
        head_convs=[names[index] for index in sorted(head)],
        tail=[names[index] for index in sorted(floats)],
    )


def head_tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes after the head's last feature convolutions (the box-decoding tail): see analyze_head."""
    return analyze_head(model).tail


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


def _upstream_meets(
    graph: onnx.GraphProto, start: int, producer: dict[str, int], float_tensors: set[str], targets: frozenset[str]
) -> bool:
    """Whether walking back from node `start`'s data input over float tensors meets a `targets` op before a Conv."""
    seen: set[int] = set()
    queue = deque([graph.node[start].input[0]])
    while queue:
        index = producer.get(queue.popleft())
        if index is None or index in seen:
            continue
        seen.add(index)
        node = graph.node[index]
        if node.op_type in targets:
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
    skip = {value.name for value in (*augmented.graph.output, *augmented.graph.input)}  # inputs: read from the feed
    for name in tensors:
        if name not in skip:
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
            np.minimum(index, bins - 1, out=index)  # values beyond the first pass's amax cannot occur; be safe
            hists[name] += np.bincount(index, minlength=bins)
    return hists


def mse_amax(hist: np.ndarray, amax: float, start_bin: int = ENTROPY_QUANT_BINS) -> float:
    """The threshold (a bin's upper edge, from `start_bin` up) with the least INT8 fake-quantization squared error,
    each bin's values taken at its centre (NVIDIA pytorch-quantization's `mse` method on a |x| histogram)."""
    counts = hist.astype(np.float64)
    if counts.sum() == 0 or amax == 0:
        return amax
    bins = len(counts)
    width = amax / bins
    centres = (np.arange(bins) + 0.5) * width
    best_amax, best_error = amax, np.inf
    for chunk in np.array_split(np.arange(min(start_bin, bins), bins + 1), 8):
        if not chunk.size:
            continue
        thresholds = chunk[:, None] * width  # candidates x 1
        scale = thresholds / 127.0
        quantized = np.minimum(np.round(centres[None, :] / scale), 127.0) * scale
        errors = ((quantized - centres[None, :]) ** 2 * counts[None, :]).sum(axis=1)
        index = int(np.argmin(errors))
        if errors[index] < best_error:
            best_amax, best_error = float(thresholds[index, 0]), float(errors[index])
    return best_amax


@dataclass(frozen=True)
class TensorStats:
    """Calibration statistics of the activations to quantize: max |x| and a |x| histogram per tensor."""

    amax: dict[str, float]
    hists: dict[str, np.ndarray]  # HISTOGRAM_BINS equal bins over [0, amax]; absent for all-zero tensors
    images: int

    def save(self, path: Path) -> Path:
        """Write to an .npz (atomically)."""
        arrays = {"__images__": np.array(self.images)}
        for index, (name, value) in enumerate(sorted(self.amax.items())):
            arrays[f"name_{index}"] = np.array(name)
            arrays[f"amax_{index}"] = np.array(value)
            if name in self.hists:
                arrays[f"hist_{index}"] = self.hists[name]
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> TensorStats:
        with np.load(path) as data:
            count = sum(1 for key in data.files if key.startswith("name_"))
            amax, hists = {}, {}
            for index in range(count):
                name = str(data[f"name_{index}"])
                amax[name] = float(data[f"amax_{index}"])
                if f"hist_{index}" in data.files:
                    hists[name] = data[f"hist_{index}"]
            return cls(amax, hists, int(data["__images__"]))


def collect_stats(
    model: onnx.ModelProto, tensors: list[str], loader: Iterable[dict[str, np.ndarray]], input_name: str
) -> TensorStats:
    """Two streaming passes over the calibration images: max |x| per tensor, then |x| histograms."""
    session = _calibration_session(model, tensors)
    amax, images = collect_amax(session, loader, input_name, tensors)
    if images == 0:
        raise InputError("the calibration data loader yielded no images: check calibration.images")
    hists = collect_histograms(session, loader, input_name, amax)
    if hists and sum(int(hist.sum()) for hist in hists.values()) == 0:
        raise InputError("the calibration data loader yielded nothing on its second pass: pass a re-iterable loader")
    return TensorStats(amax, hists, images)


def amax_for(stats: TensorStats, algorithm: str, percentile: float = 99.999) -> dict[str, float]:
    """The symmetric range per tensor that `algorithm` picks from the statistics."""
    check_algorithm(algorithm, percentile)
    if algorithm == "minmax":
        return dict(stats.amax)
    pick = {
        "percentile": lambda hist, value: percentile_amax(hist, value, percentile),
        "entropy": entropy_amax,
        "mse": mse_amax,
    }[algorithm]
    return {
        name: pick(stats.hists[name], value) if name in stats.hists else value for name, value in stats.amax.items()
    }


def check_algorithm(algorithm: str, percentile: float) -> None:
    if algorithm not in ALGORITHMS:
        raise InputError(f"calibration algorithm {algorithm!r} is unknown: use one of {', '.join(ALGORITHMS)}")
    if algorithm == "percentile" and not 90.0 < percentile <= 100.0:
        raise InputError(f"calibration.percentile {percentile} is outside (90, 100]: e.g. 99.99")


def calibrate(
    model: onnx.ModelProto,
    tensors: list[str],
    loader: Iterable[dict[str, np.ndarray]],
    input_name: str,
    algorithm: str,
    percentile: float,
) -> tuple[dict[str, float], int]:
    """Symmetric range (amax) per tensor with the chosen algorithm, and the number of calibration images."""
    check_algorithm(algorithm, percentile)
    if algorithm == "minmax":  # one pass is enough
        amax, images = collect_amax(_calibration_session(model, tensors), loader, input_name, tensors)
        if images == 0:
            raise InputError("the calibration data loader yielded no images: check calibration.images")
        return amax, images
    stats = collect_stats(model, tensors, loader, input_name)
    return amax_for(stats, algorithm, percentile), stats.images


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
        raise InputError(
            f"{fp32_onnx} uses opset {opset}; per-channel INT8 Q/DQ needs >= {MIN_OPSET}: set export.opset"
        )
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        raise InputError(f"{fp32_onnx} already holds Q/DQ nodes: quantize the FP32 export, not a quantized model")
    name_nodes(model)
    return onnx.shape_inference.infer_shapes(model)


def image_input(model: onnx.ModelProto) -> str:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise InputError(
            f"quantize_qdq expects one NCHW image input; this model has {[value.name for value in inputs]}"
        )
    return inputs[0].name


def _tensors_to_calibrate(model: onnx.ModelProto, excluded: set[str]) -> list[str]:
    """Float activations read by the nodes that will be quantized (their outputs stay float), sorted."""
    initializers = {init.name for init in model.graph.initializer}
    float_tensors = _float_tensor_names(model)
    names = {
        name
        for node in model.graph.node
        if node.op_type in QUANTIZED_OP_TYPES and node.name not in excluded
        for name in node.input
        if name in float_tensors and name not in initializers
    }
    return sorted(names)


def insert_qdq(model: onnx.ModelProto, amax: dict[str, float], excluded: Sequence[str]) -> onnx.ModelProto:
    """ONNX Runtime's QDQ insertion with TensorRT's settings: symmetric INT8, per-channel weights, float bias."""
    ranges = {name: (np.array(-value, np.float32), np.array(value, np.float32)) for name, value in amax.items()}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer edits the graph it is given: keep `model` reusable for other candidates
    quantizer = QDQQuantizer(
        copy,
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
    quantizer.model.topological_sort()  # Q/DQ nodes are appended at the end; ONNX and TensorRT need graph order
    quantized = quantizer.model.model
    _restore_float_inputs(quantized, set(excluded))
    return quantized


def _restore_float_inputs(model: onnx.ModelProto, excluded: set[str]) -> None:
    """Rewire excluded nodes to the float tensor where ORT made them read a shared Q/DQ pair (in place).

    ORT gives a quantized tensor one Q/DQ pair and points every reader at it, so an excluded node that shares its
    input with a quantized Conv (the head convs share theirs with the next neck conv) would read INT8 values.
    """
    quantizers = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    float_source = {
        node.output[0]: quantizers[node.input[0]]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in quantizers
    }
    for node in model.graph.node:
        if node.name in excluded:
            for position, name in enumerate(node.input):
                if name in float_source:
                    node.input[position] = float_source[name]


def count_quantized_nodes(model: onnx.ModelProto) -> int:
    """Nodes (other than Q/DQ) that read at least one DequantizeLinear output."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(
        1
        for node in model.graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(n in dequantized for n in node.input)
    )


def quantizable_convs(model: onnx.ModelProto, head: HeadAnalysis) -> list[str]:
    """Every Conv that may be quantized (all but the decoding tail's), in graph order: the precision search's pool."""
    tail = set(head.tail)
    return [node.name for node in model.graph.node if node.op_type in CONV_OP_TYPES and node.name not in tail]


def calibration_tensors(model: onnx.ModelProto, head: HeadAnalysis) -> list[str]:
    """The activations read by every quantizable Conv: statistics over these serve any choice of float layers."""
    return _tensors_to_calibrate(model, set(head.tail))


def write_qdq(
    model: onnx.ModelProto, head: HeadAnalysis, amax: dict[str, float], float_nodes: Sequence[str], out_path: Path
) -> tuple[list[str], int]:
    """Insert Q/DQ for every Conv except the decoding tail and `float_nodes`; write `out_path` atomically.

    Returns (the nodes kept in float, the number of nodes reading INT8 tensors)."""
    excluded = list(dict.fromkeys([*head.tail, *float_nodes]))
    tensors = set(_tensors_to_calibrate(model, set(excluded)))
    if not tensors:
        raise InputError(f"nothing left to quantize after keeping {len(excluded)} nodes in float")
    missing = sorted(tensors - amax.keys())
    if missing:
        raise InputError(f"no calibration range for {missing[:3]}: the statistics are from another model")
    quantized = insert_qdq(model, {name: amax[name] for name in tensors}, excluded)
    with atomic_path(out_path) as tmp:
        onnx.save(quantized, str(tmp))
    return excluded, count_quantized_nodes(quantized)


def quantize_qdq(
    fp32_onnx: Path,
    loader: CalibrationDataLoader,
    algorithm: str,
    percentile: float,
    out_path: Path,
    extra_excluded: Sequence[str] = (),
    keep_sensitive_float: bool = True,
) -> QuantizeResult:
    """Calibrate `fp32_onnx` on `loader` and write the INT8 Q/DQ model to `out_path` (atomically).

    The head's decoding tail always stays in float; with `keep_sensitive_float` the stem and head convs do too.
    `extra_excluded` names further nodes to keep in float.
    """
    started = time.perf_counter()
    check_algorithm(algorithm, percentile)
    model = prepare_model(fp32_onnx)
    input_name = image_input(model)
    if loader.input_name != input_name:
        raise InputError(f"the calibration loader feeds {loader.input_name!r} but {fp32_onnx} reads {input_name!r}")
    node_names = {node.name for node in model.graph.node}
    unknown = [name for name in extra_excluded if name not in node_names]
    if unknown:
        raise InputError(f"extra excluded nodes not in {fp32_onnx}: {unknown[:5]}: use node names from the model")
    head = analyze_head(model)
    sensitive = default_float_convs(head) if keep_sensitive_float else []
    float_nodes = list(dict.fromkeys([*sensitive, *extra_excluded]))
    tensors = _tensors_to_calibrate(model, {*head.tail, *float_nodes})
    if not tensors:
        raise InputError(
            f"{fp32_onnx}: nothing left to quantize after excluding {len(head.tail) + len(float_nodes)} nodes"
        )
    amax, images = calibrate(model, tensors, loader, input_name, algorithm, percentile)
    excluded, quantized_nodes = write_qdq(model, head, amax, float_nodes, out_path)
    return QuantizeResult(
        qdq_path=out_path,
        excluded_nodes=excluded,
        head_tail_nodes=head.tail,
        sensitive_nodes=sensitive,
        quantized_nodes=quantized_nodes,
        algorithm=algorithm,
        calibration_images=images,
        seconds=time.perf_counter() - started,
    )


def default_float_convs(head: HeadAnalysis) -> list[str]:
    """The convs kept in float without a sensitivity analysis: the stem and the head's prediction convs."""
    return [*head.stem_convs, *head.head_convs]
