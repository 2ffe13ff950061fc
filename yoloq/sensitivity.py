"""Sensitivity analysis: how much quantizing one Conv alone hurts the model's output.

For every quantizable Conv (see `yoloq.quantize.quantizable_convs`), a copy of the FP32 model gets INT8
fake quantization on that Conv only (a Q/DQ pair on its activation input with the calibrated range, and its
weights rounded to symmetric per-output-channel INT8), exactly what the Q/DQ model does to it. The copy runs on
a few calibration images through ONNX Runtime; the error is measured on the head's raw prediction maps (the
outputs of the head convs, before box decoding) after a sigmoid, as a relative squared error against FP32:

    error = sum((s(quantized) - s(fp32))^2) / sum(s(fp32)^2), s = sigmoid, averaged over the head's outputs
    SQNR = -10 log10(error)

The sigmoid puts the error where detections are: on raw logits, the many large negative background logits
dominate, and the stem and head convs (known to matter, and measured to: keeping them in float is worth about
one mAP point on yolov5n) would rank among the least sensitive.

Calibration images, never validation images: ranking layers needs no labels. The ranking feeds the precision
search (yoloq.search), which keeps the most sensitive convs in float.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from yoloq.artifacts import atomic_path, atomic_write_json, content_key, read_json
from yoloq.errors import InputError
from yoloq.preprocess import load_preprocessed

if TYPE_CHECKING:  # ONNX Runtime is imported where it runs: the TensorRT machine reads rankings without it
    import onnxruntime as ort

    from yoloq.calibrate import CalibrationStats
    from yoloq.quantize import HeadAnalysis

Progress = Callable[[str], None]
INT8_MAX = 127.0
METRIC_VERSION = "sigmoid-rel-sq-v1"


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    position: int  # index among the quantizable convs, in graph order (0 = the stem)
    error: float  # relative squared error of the head outputs with only this conv quantized
    sqnr_db: float

    def as_json(self) -> dict[str, object]:
        return {"node": self.node, "position": self.position, "error": self.error, "sqnr_db": self.sqnr_db}


def fake_quantize_conv(model: onnx.ModelProto, conv_name: str, input_amax: float) -> onnx.ModelProto:
    """A copy of `model` where only `conv_name` reads INT8-rounded activations and weights."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    conv = next((node for node in graph.node if node.name == conv_name), None)
    if conv is None:
        raise InputError(f"no node named {conv_name!r} in the model")
    initializers = {init.name: init for init in graph.initializer}
    if conv.input[1] not in initializers:
        raise InputError(f"{conv_name}: its weights are not a constant initializer; cannot quantize them")
    weight_init = initializers[conv.input[1]]
    weights = numpy_helper.to_array(weight_init).astype(np.float32)
    channel_amax = np.abs(weights.reshape(weights.shape[0], -1)).max(axis=1)
    scale = np.where(channel_amax > 0, channel_amax / INT8_MAX, 1.0).reshape(-1, *([1] * (weights.ndim - 1)))
    rounded = np.clip(np.round(weights / scale), -INT8_MAX, INT8_MAX) * scale
    readers = sum(1 for node in graph.node for name in node.input if name == weight_init.name)
    if readers == 1:  # replace in place (an unused initializer left behind makes ONNX Runtime warn)
        weight_init.CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), weight_init.name))
    else:
        new_weights = f"{conv.input[1]}_fq"
        graph.initializer.append(numpy_helper.from_array(rounded.astype(np.float32), new_weights))
        conv.input[1] = new_weights

    activation = conv.input[0]
    scale_name, zero_name = f"{conv_name}_fq_scale", f"{conv_name}_fq_zero"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(max(input_amax, 1e-12) / INT8_MAX, np.float32), scale_name),
            numpy_helper.from_array(np.array(0, np.int8), zero_name),
        ]
    )
    quantized, dequantized = f"{conv_name}_fq_q", f"{conv_name}_fq_dq"
    q = onnx.helper.make_node("QuantizeLinear", [activation, scale_name, zero_name], [quantized], f"{conv_name}_fq_Q")
    dq = onnx.helper.make_node(
        "DequantizeLinear", [quantized, scale_name, zero_name], [dequantized], f"{conv_name}_fq_DQ"
    )
    conv.input[0] = dequantized
    position = list(graph.node).index(conv)
    graph.node.insert(position, dq)
    graph.node.insert(position, q)
    return copy


def head_output_names(model: onnx.ModelProto, head: HeadAnalysis) -> list[str]:
    """The raw prediction maps: the outputs of the head convs."""
    by_name = {node.name: node for node in model.graph.node}
    return [by_name[name].output[0] for name in head.head_convs]


def _session(model: onnx.ModelProto, outputs: Sequence[str]) -> ort.InferenceSession:
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    values = {value.name: value for value in augmented.graph.value_info}
    del augmented.graph.output[:]
    for name in outputs:
        if name not in values:
            raise InputError(f"tensor {name!r} has no inferred type: run shape inference first (prepare_model)")
        augmented.graph.output.append(values[name])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the Q/DQ pair as written
    return ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x.astype(np.float64), -60.0, 60.0)))


def relative_error(quantized: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Mean over outputs of sum((s(q) - s(r))^2) / sum(s(r)^2), s = sigmoid."""
    errors = []
    for q, r in zip(quantized, reference, strict=True):
        sq, sr = _sigmoid(q), _sigmoid(r)
        errors.append(float(np.sum((sq - sr) ** 2) / max(float(np.sum(sr**2)), 1e-30)))
    return sum(errors) / len(errors)


def layer_sensitivity(
    model: onnx.ModelProto,
    head: HeadAnalysis,
    amax: dict[str, float],
    images: np.ndarray,
    input_name: str,
    progress: Progress | None = None,
) -> list[LayerSensitivity]:
    """Quantize each quantizable conv alone and measure the head-output error on `images` (NCHW float32).

    Returns the convs ranked from most to least sensitive."""
    from yoloq.quantize import quantizable_convs

    if images.ndim != 4 or not len(images):
        raise InputError("sensitivity analysis needs a non-empty NCHW batch of preprocessed calibration images")
    outputs = head_output_names(model, head)
    reference = _session(model, outputs).run(outputs, {input_name: images})
    convs = quantizable_convs(model, head)
    by_name = {node.name: node for node in model.graph.node}
    results = []
    for position, name in enumerate(convs):
        activation = by_name[name].input[0]
        if activation not in amax:
            raise InputError(f"no calibration range for {activation!r} (input of {name}): recalibrate this model")
        quantized = _session(fake_quantize_conv(model, name, amax[activation]), outputs).run(
            outputs, {input_name: images}
        )
        error = relative_error(quantized, reference)
        results.append(LayerSensitivity(name, position, error, -10.0 * math.log10(max(error, 1e-30))))
        if progress and ((position + 1) % 10 == 0 or position + 1 == len(convs)):
            progress(f"  sensitivity: {position + 1}/{len(convs)} convs")
    return sorted(results, key=lambda r: (-r.error, r.position))


def save_sensitivity(results: list[LayerSensitivity], path: Path) -> Path:
    return atomic_write_json(path, {"layers": [r.as_json() for r in results]})


def load_sensitivity(path: Path) -> list[LayerSensitivity]:
    return [
        LayerSensitivity(str(r["node"]), int(r["position"]), float(r["error"]), float(r["sqnr_db"]))
        for r in read_json(path)["layers"]
    ]


def sensitivity_table(results: list[LayerSensitivity], float_nodes: Sequence[str] = (), limit: int = 25) -> str:
    """The most sensitive convs as a markdown table (rank, node, error, SQNR, whether the chosen model keeps it
    in float)."""
    kept = set(float_nodes)
    lines = [
        "| rank | conv | position | rel. error (head outputs) | SQNR dB | kept in float |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for rank, r in enumerate(results[:limit], start=1):
        mark = "yes" if r.node in kept else ""
        lines.append(f"| {rank} | {r.node} | {r.position} | {r.error:.2e} | {r.sqnr_db:.1f} | {mark} |")
    if len(results) > limit:
        lines.append(f"| … | {len(results) - limit} more convs, less sensitive | | | | |")
    return "\n".join(lines)


def sensitivity_plot(results: list[LayerSensitivity], path: Path, title: str, float_nodes: Sequence[str] = ()) -> Path:
    """SQNR per conv in graph order (low = sensitive), float-kept convs highlighted (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda r: r.position)
    kept = set(float_nodes)
    colours = ["tab:red" if r.node in kept else "tab:blue" for r in ordered]
    figure, axes = plt.subplots(figsize=(9, 4), dpi=120)
    axes.bar([r.position for r in ordered], [r.sqnr_db for r in ordered], color=colours)
    axes.set_xlabel("conv (graph order; 0 = stem)")
    axes.set_ylabel("SQNR of head outputs, dB (low = sensitive)")
    axes.set_title(title + ("  (red: kept in float)" if kept else ""))
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


@dataclass(frozen=True)
class SensitivityReport:
    layers: list[LayerSensitivity]  # most sensitive first
    path: Path  # the cached JSON
    algorithm: str
    num_images: int
    seconds: float
    reused: bool


def analyze_sensitivity(
    fp32_onnx: Path,
    statistics: CalibrationStats,
    algorithm: str,
    percentile: float,
    num_images: int,
    imgsz: int,
    out_dir: Path,
    progress: Progress | None = None,
) -> SensitivityReport:
    """Rank the quantizable convs of `fp32_onnx` with `algorithm`'s ranges on the first `num_images` calibration
    images of `statistics` (content-hashed JSON, reused when present)."""
    from yoloq.quantize import amax_for, analyze_head, image_input, prepare_model, quantizable_convs

    images = statistics.images.images[:num_images]
    key = content_key(
        METRIC_VERSION,
        statistics.key,
        algorithm,
        percentile if algorithm == "percentile" else None,
        statistics.images.image_hashes[:num_images],
    )
    path = out_dir / f"sensitivity-{key}.json"
    if path.is_file():
        return SensitivityReport(load_sensitivity(path), path, algorithm, len(images), 0.0, reused=True)
    model = prepare_model(fp32_onnx)
    head = analyze_head(model)
    batch = np.stack([frame[0] for p in images if (frame := load_preprocessed(p, imgsz)) is not None])
    if progress:
        convs = len(quantizable_convs(model, head))
        progress(f"sensitivity: quantizing each of {convs} convs alone, {len(batch)} calibration images")
    started = time.perf_counter()
    layers = layer_sensitivity(
        model, head, amax_for(statistics.stats, algorithm, percentile), batch, image_input(model), progress
    )
    save_sensitivity(layers, path)
    return SensitivityReport(layers, path, algorithm, len(batch), time.perf_counter() - started, reused=False)
