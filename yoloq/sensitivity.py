"""Sensitivity analysis: how much keeping one Conv in float helps when every other Conv is INT8.

Leave-one-out in the all-INT8 model: the Q/DQ model with every quantizable Conv quantized (the same placement
rules and ranges as the models the search writes: `yoloq.quant.placement`, `yoloq.quant.qdq`); then, one Conv at a
time, the Q/DQ model with that Conv kept in float. The models run on a few calibration images through ONNX
Runtime, and the error against FP32 is measured on what detection quality depends on (`detection_error`):

    YOLOv5 / v8 heads: over the predictions FP32 is confident about (score > 0.1), the box centre error relative
    to the box size, plus the relative width/height error, plus the absolute score error (mean per prediction);
    end-to-end heads (their rows are not aligned between models): the relative squared error of the head convs'
    sigmoid outputs.

    gain(conv) = (error(all INT8) - error(all INT8 but conv)) / error(all INT8)

Convs are ranked by gain. Measured on yolov5n (8 calibration images, MSE ranges): the last head conv ranks
first. Quantizing one conv *alone* ranks early backbone convs first instead, and keeping those in float did not
help mAP on the 525 validation images (the interactions matter): hence leave-one-out.

Each leave-one-out model computes what the all-INT8 model does up to the conv it leaves float, so it runs only
from there (`changed_region`): the all-INT8 model runs once, and each leave-one-out model's changed part runs on
the all-INT8 model's tensors where that part starts. The errors are identical to running every model whole
(yolov5n, 32 images: 97 s instead of 161 s; yolov8n about 2x faster).

Calibration images, never validation images: ranking layers needs no labels. The ranking feeds the precision
search (yoloq.search), which keeps the convs with the largest gain in float.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from yoloq.artifacts import atomic_write_json, read_json, save_figure
from yoloq.cache import get_or_create
from yoloq.errors import InputError
from yoloq.preprocess import load_preprocessed

if TYPE_CHECKING:  # ONNX Runtime is imported where it runs: the TensorRT machine reads rankings without it
    import onnxruntime as ort

    from yoloq.calibrate import CalibrationStats
    from yoloq.quant.graph import HeadAnalysis

Progress = Callable[[str], None]
# v2: placement rules; v3: the integer-exact simulation; v4: its sessions with graph optimizations (same ranking);
# (v4 since 2026-12-03 also: each leave-one-out model runs from the conv left float on: identical errors)
METRIC_VERSION = "leave-one-out-detection-v4"


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    position: int  # index among the quantizable convs, in graph order (0 = the stem)
    error: float  # detection error vs FP32 with every other conv INT8 and this one float
    gain: float  # share of the all-INT8 error that keeping this conv float removes (can be < 0: noise)

    def as_json(self) -> dict[str, object]:
        return {"node": self.node, "position": self.position, "error": self.error, "gain": self.gain}


def head_output_names(model: onnx.ModelProto, head: HeadAnalysis) -> list[str]:
    """The raw prediction maps: the outputs of the head convs."""
    by_name = {node.name: node for node in model.graph.node}
    return [by_name[name].output[0] for name in head.head_convs]


def _session(model: onnx.ModelProto, outputs: Sequence[str]) -> ort.InferenceSession:
    from yoloq.backends.onnxruntime import qdq_session, session_options

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    values = {value.name: value for value in (*augmented.graph.value_info, *augmented.graph.output)}
    del augmented.graph.output[:]
    for name in outputs:
        if name not in values:
            raise InputError(f"tensor {name!r} has no inferred type: run shape inference first (prepare_model)")
        augmented.graph.output.append(values[name])
    # The integer-exact simulation with validation's own options (graph optimizations on, minus those that would
    # change the numbers): the same ranking on every CPU. Against optimizations off (checked on yolov5n, 32 images):
    # the same ranking, errors within 4e-8, 146 s instead of 176 s (separate runs, not interleaved).
    return qdq_session(augmented, session_options())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x.astype(np.float64), -60.0, 60.0)))


def relative_error(quantized: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Mean over outputs of sum((s(q) - s(r))^2) / sum(s(r)^2), s = sigmoid."""
    errors = []
    for q, r in zip(quantized, reference, strict=True):
        sq, sr = _sigmoid(q), _sigmoid(r)
        errors.append(float(np.sum((sq - sr) ** 2) / max(float(np.sum(sr**2)), 1e-30)))
    return sum(errors) / len(errors)


CONFIDENT = 0.1
MIN_CONFIDENT = 20


def _rows(output: np.ndarray, head_format: str) -> np.ndarray:
    """One row per anchor: YOLOv5 (N, A, 5 + nc) cx, cy, w, h, objectness, class probabilities; YOLOv8
    (N, 4 + nc, A) -> cx, cy, w, h, class probabilities."""
    if head_format == "yolov5":
        return output.reshape(-1, output.shape[-1])
    return np.swapaxes(output, 1, 2).reshape(-1, output.shape[1])


def _scores(rows: np.ndarray, head_format: str) -> np.ndarray:
    if head_format == "yolov5":
        return rows[:, 4] * rows[:, 5:].max(axis=1)
    return rows[:, 4:].max(axis=1)


@dataclass(frozen=True)
class ConfidentPredictions:
    """The reference's predictions that `detection_error` compares: their anchors, boxes and scores."""

    anchors: np.ndarray
    boxes: np.ndarray  # cx, cy, w, h as (P, 4), float64
    scores: np.ndarray  # (P,), float64


def confident_predictions(reference: np.ndarray, head_format: str) -> ConfidentPredictions:
    """The predictions FP32 is confident about (score > CONFIDENT; at least MIN_CONFIDENT of them)."""
    rows = _rows(reference, head_format)
    scores = _scores(rows, head_format)
    chosen = np.flatnonzero(scores > CONFIDENT)
    if len(chosen) < MIN_CONFIDENT:
        chosen = np.argsort(-scores)[:MIN_CONFIDENT]
    return ConfidentPredictions(chosen, rows[chosen, :4].astype(np.float64), scores[chosen].astype(np.float64))


def detection_error(quantized: np.ndarray, reference: np.ndarray | ConfidentPredictions, head_format: str) -> float:
    """Mean error over the predictions the reference is confident about (at least MIN_CONFIDENT of them):
    centre error / (w + h) + mean relative w, h error + absolute score error."""
    if not isinstance(reference, ConfidentPredictions):
        reference = confident_predictions(reference, head_format)
    rows = _rows(quantized, head_format)[reference.anchors]
    f, q = reference.boxes, rows[:, :4].astype(np.float64)
    size = np.maximum(f[:, 2:4], 1e-6)
    centre = np.abs(q[:, :2] - f[:, :2]).sum(axis=1) / size.sum(axis=1)
    extent = (np.abs(q[:, 2:4] - f[:, 2:4]) / size).mean(axis=1)
    score = np.abs(_scores(rows, head_format).astype(np.float64) - reference.scores)
    return float(np.mean(centre + extent + score))


def layer_sensitivity(
    model: onnx.ModelProto,
    head: HeadAnalysis,
    amax: dict[str, float],
    images: np.ndarray,
    input_name: str,
    head_format: str,
    progress: Progress | None = None,
) -> list[LayerSensitivity]:
    """Leave-one-out gains of every quantizable conv on `images` (NCHW float32), largest gain first."""
    from yoloq.quant.graph import quantizable_convs
    from yoloq.quant.placement import place_qdq
    from yoloq.quant.qdq import insert_qdq

    if images.ndim != 4 or not len(images):
        raise InputError("sensitivity analysis needs a non-empty NCHW batch of preprocessed calibration images")
    convs = quantizable_convs(model, head)
    if head_format == "end2end":
        outputs = head_output_names(model, head)

        def error(values: list[np.ndarray]) -> float:
            return relative_error(values, reference)
    else:
        outputs = [model.graph.output[0].name]

        def error(values: list[np.ndarray]) -> float:
            return detection_error(values[0], confident, head_format)

    reference = _session(model, outputs).run(outputs, {input_name: images})
    confident = confident_predictions(reference[0], head_format) if head_format != "end2end" else None
    all_int8 = region_base(insert_qdq(model, place_qdq(model, head, []), amax))
    # Each leave-one-out model computes what the all-INT8 one does up to the conv left float: it runs only from
    # there (`changed_region`), on the all-INT8 model's tensors where they enter, computed once.
    regions = {
        name: changed_region(all_int8, insert_qdq(model, place_qdq(model, head, [name]), amax), outputs)
        for name in convs
    }
    entering = list(dict.fromkeys(t for region in regions.values() for t in region.inputs if t not in outputs))
    fed = [t for t in entering if t != input_name]
    values = dict(
        zip(
            [*outputs, *fed],
            _session(with_value_info(all_int8, fed), [*outputs, *fed]).run([*outputs, *fed], {input_name: images}),
            strict=True,
        )
    )
    values[input_name] = images
    if progress:
        progress(f"  sensitivity: all-INT8 model run once; {len(fed)} of its tensors feed the leave-one-out models")
    all_int8_error = error([values[o] for o in outputs])
    results = []
    for position, name in enumerate(convs):
        region = regions[name]
        computed = {}
        if region.outputs:
            session = _session(region.model, region.outputs)
            feeds = {t: values[t] for t in region.inputs}
            computed = dict(zip(region.outputs, session.run(region.outputs, feeds), strict=True))
        left_out = error([computed.get(o, values[o]) for o in outputs])
        gain = (all_int8_error - left_out) / all_int8_error if all_int8_error > 0 else 0.0
        results.append(LayerSensitivity(name, position, left_out, gain))
        if progress and ((position + 1) % 10 == 0 or position + 1 == len(convs)):
            progress(f"  sensitivity: {position + 1}/{len(convs)} convs")
    return sorted(results, key=lambda r: (-r.gain, r.position))


@dataclass(frozen=True)
class Region:
    """The part of a model that computes differently from a base model, as a model of its own: `inputs` are the
    tensors it reads that the base computes the same (or the graph's inputs); `outputs` the requested outputs it
    computes (the others are the base's)."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]


@dataclass(frozen=True)
class RegionBase:
    """The model `changed_region` compares variants with, and what it compares, computed once: its nodes and
    initializers (serialized) and the element type of every tensor."""

    model: onnx.ModelProto
    nodes: frozenset[bytes]
    initializers: dict[str, bytes]
    types: dict[str, int]


def region_base(model: onnx.ModelProto) -> RegionBase:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return RegionBase(
        model,
        frozenset(node.SerializeToString() for node in model.graph.node),
        {init.name: init.SerializeToString() for init in model.graph.initializer},
        {value.name: value.type.tensor_type.elem_type for value in values},
    )


def changed_region(base: RegionBase, variant: onnx.ModelProto, outputs: Sequence[str]) -> Region:
    """The nodes of `variant` (in graph order) that are not nodes of `base`, read an initializer whose value
    differs from base's, or read a tensor such a node produces, with the nodes that compute what they read from
    initializers alone (Constant, the weights' DequantizeLinear), as a model
    from the tensors they read (computed identically by `base`) to those of `outputs` they compute."""
    inits = {init.name: init for init in variant.graph.initializer}
    changed_inits = {name for name, init in inits.items() if base.initializers.get(name) != init.SerializeToString()}
    constants: dict[str, onnx.NodeProto] = {}  # tensors computed from initializers alone -> their node
    for node in variant.graph.node:
        if all(name in inits or name in constants for name in node.input if name):
            constants.update(dict.fromkeys(node.output, node))
    produced: set[str] = set()
    nodes = []
    for node in variant.graph.node:
        reads = set(node.input)
        if node.SerializeToString() not in base.nodes or reads & changed_inits or reads & produced:
            nodes.append(node)
            produced.update(node.output)
    outputs = [o for o in outputs if o in produced]
    read = dict.fromkeys(name for node in nodes for name in node.input if name and name not in produced)
    used_constants: list[onnx.NodeProto] = []  # in graph order, with what they read
    pending = [name for name in read if name in constants]
    while pending:
        node = constants[pending.pop()]
        if node not in used_constants:
            used_constants.append(node)
            pending.extend(name for name in node.input if name in constants)
            read.update(dict.fromkeys(name for name in node.input if name in inits))
    order = {id(node): index for index, node in enumerate(variant.graph.node)}
    used_constants.sort(key=lambda node: order[id(node)])
    inputs = [name for name in read if name not in inits and name not in constants]
    types = base.types
    graph = helper.make_graph(
        [*used_constants, *nodes],
        "changed_region",
        [helper.make_tensor_value_info(name, types[name], None) for name in inputs],
        [helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None) for name in outputs],
        [inits[name] for name in read if name in inits],
    )
    model = helper.make_model(graph, opset_imports=variant.opset_import, ir_version=variant.ir_version)
    return Region(model, inputs, outputs)


def with_value_info(base: RegionBase, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the base model whose value_info types the tensors `names` (so a session can return them)."""
    out = onnx.ModelProto()
    out.CopyFrom(base.model)
    known = {value.name for value in (*out.graph.value_info, *out.graph.output)}
    for name in names:
        if name not in known:
            out.graph.value_info.append(helper.make_tensor_value_info(name, base.types[name], None))
    return out


def save_sensitivity(results: list[LayerSensitivity], path: Path) -> Path:
    return atomic_write_json(path, {"layers": [r.as_json() for r in results]})


def load_sensitivity(path: Path) -> list[LayerSensitivity]:
    return [
        LayerSensitivity(str(r["node"]), int(r["position"]), float(r["error"]), float(r["gain"]))
        for r in read_json(path)["layers"]
    ]


def sensitivity_table(results: list[LayerSensitivity], float_nodes: Sequence[str] = (), limit: int = 25) -> str:
    """The convs with the largest leave-one-out gain as a markdown table (rank, node, error, gain, whether the
    chosen model keeps it in float)."""
    kept = set(float_nodes)
    lines = [
        "| rank | conv | position | error with only this conv float | gain (share of all-INT8 error) | kept in float |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for rank, r in enumerate(results[:limit], start=1):
        mark = "yes" if r.node in kept else ""
        lines.append(f"| {rank} | {r.node} | {r.position} | {r.error:.4f} | {r.gain * 100:+.1f} % | {mark} |")
    if len(results) > limit:
        lines.append(f"| … | {len(results) - limit} more convs, smaller gains | | | | |")
    return "\n".join(lines)


def sensitivity_plot(results: list[LayerSensitivity], path: Path, title: str, float_nodes: Sequence[str] = ()) -> Path:
    """Leave-one-out gain per conv in graph order, float-kept convs highlighted (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda r: r.position)
    kept = set(float_nodes)
    colours = ["tab:red" if r.node in kept else "tab:blue" for r in ordered]
    figure, axes = plt.subplots(figsize=(9, 4), dpi=120)
    axes.bar([r.position for r in ordered], [r.gain * 100 for r in ordered], color=colours)
    axes.set_xlabel("conv (graph order; 0 = stem)")
    axes.set_ylabel("% of the all-INT8 error removed\nby keeping this conv float")
    axes.set_title(title + ("  (red: kept in float)" if kept else ""))
    axes.grid(axis="y", alpha=0.3)
    return save_figure(figure, path)


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
    head_format: str,
    out_dir: Path,
    progress: Progress | None = None,
) -> SensitivityReport:
    """Rank the quantizable convs of `fp32_onnx` with `algorithm`'s ranges on the first `num_images` calibration
    images of `statistics` (content-hashed JSON, reused when present)."""
    from yoloq.quant.graph import analyze_head, image_input, prepare_model, quantizable_convs
    from yoloq.quant.ranges import amax_for

    images = statistics.images.images[:num_images]
    key_parts = [
        METRIC_VERSION,
        statistics.key,
        algorithm,
        percentile if algorithm == "percentile" else None,
        statistics.images.image_hashes[:num_images],
        head_format,
    ]
    started = time.perf_counter()

    def produce(path: Path) -> None:
        model = prepare_model(fp32_onnx)
        head = analyze_head(model)
        batch = np.stack([frame[0] for p in images if (frame := load_preprocessed(p, imgsz)) is not None])
        if progress:
            convs = len(quantizable_convs(model, head))
            progress(f"sensitivity: all-INT8 model with each of {convs} convs left float in turn, {len(batch)} images")
        amax = amax_for(statistics.stats, algorithm, percentile)
        save_sensitivity(layer_sensitivity(model, head, amax, batch, image_input(model), head_format, progress), path)

    cached = get_or_create(out_dir, "sensitivity", key_parts, ".json", produce, load_sensitivity)
    seconds = 0.0 if cached.reused else time.perf_counter() - started
    return SensitivityReport(cached.value, cached.path, algorithm, len(images), seconds, cached.reused)
