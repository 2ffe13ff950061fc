"""Calibration statistics: max |x| and a |x| histogram of every activation to calibrate, streamed over images.

An augmented copy of the model returns the activations for a few images at a time; only running statistics are
kept, so memory stays bounded by one sub-batch of activations whatever the image count. Every range algorithm
(`yoloq.quant.ranges`) works from these statistics, so comparing algorithms costs one calibration pass.
ONNX Runtime's own calibrators are not used: in onnxruntime 1.32 MinMax with `CalibMaxIntermediateOutputs` drops
every full chunk without computing its range ("No data is collected" when the chunk size divides the sample
count), and the histogram calibrators keep every activation of every image in memory.

Reproducible across machines: FP32 convolutions differ in their last bits between CPUs (AVX2, AVX-512 and VNNI
kernels sum in other orders, about 1e-6 relative), so a raw max |x| would differ too. Every range is snapped up to a
grid of RANGE_GRID_STEPS steps per octave (`snap_amax`) before it is used, so those differences change a scale only
when a raw range lies within about 1e-6 of a grid point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from yoloq.artifacts import atomic_path
from yoloq.errors import InputError

HISTOGRAM_BINS = 2048
CALIBRATION_SUB_BATCH = 2  # images per calibration inference: bounds the activations held at once
RANGE_GRID_STEPS = 32  # ranges are rounded up to 32 steps per octave (at most 3.1 % wider)


def snap_amax(value: float) -> float:
    """`value` rounded up to the range grid (RANGE_GRID_STEPS per octave); 0 stays 0."""
    if value <= 0.0 or not math.isfinite(value):
        return 0.0 if value <= 0.0 else value
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, mantissa in [0.5, 1)
    steps = 2 * RANGE_GRID_STEPS
    return math.ldexp(math.ceil(mantissa * steps) / steps, exponent)


@dataclass(frozen=True)
class TensorStats:
    """Calibration statistics of the activations to quantize: max |x| and a |x| histogram per tensor."""

    amax: dict[str, float]  # snapped (snap_amax): the histogram's upper edge
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


def calibration_session(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    """A CPU session on a copy of `model` that also returns `tensors` as outputs (exact FP32, no fusions)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    values = {value.name: value for value in augmented.graph.value_info}
    skip = {value.name for value in (*augmented.graph.output, *augmented.graph.input)}  # inputs: read from the feed
    for name in tensors:
        if name not in skip:
            augmented.graph.output.append(values[name])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])


def activations(
    session: ort.InferenceSession, loader: Iterable[dict[str, np.ndarray]], input_name: str, tensors: list[str]
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Per sub-batch of at most CALIBRATION_SUB_BATCH images: (image count, {tensor name: activation})."""
    computed = [name for name in tensors if name != input_name]
    for batch in loader:
        images = batch[input_name]
        for start in range(0, len(images), CALIBRATION_SUB_BATCH):
            sub_batch = images[start : start + CALIBRATION_SUB_BATCH]
            values = dict(zip(computed, session.run(computed, {input_name: sub_batch}), strict=True))
            if input_name in tensors:
                values[input_name] = sub_batch
            yield len(sub_batch), values


def collect_amax(
    session: ort.InferenceSession, loader: Iterable[dict[str, np.ndarray]], input_name: str, tensors: list[str]
) -> tuple[dict[str, float], int]:
    """Max |x| per tensor over all calibration images (snapped up to the range grid), and the image count."""
    amax = dict.fromkeys(tensors, 0.0)
    images = 0
    for count, values in activations(session, loader, input_name, tensors):
        images += count
        for name, value in values.items():
            if value.size:
                amax[name] = max(amax[name], float(value.max()), -float(value.min()))
    return {name: snap_amax(value) for name, value in amax.items()}, images


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
    for _, values in activations(session, loader, input_name, tensors):
        for name, value in values.items():
            index = (np.abs(value.ravel()) * np.float32(bins / amax[name])).astype(np.int32)
            np.minimum(index, bins - 1, out=index)  # values beyond the first pass's amax cannot occur; be safe
            hists[name] += np.bincount(index, minlength=bins)
    return hists


def collect_stats(
    model: onnx.ModelProto, tensors: list[str], loader: Iterable[dict[str, np.ndarray]], input_name: str
) -> TensorStats:
    """Two streaming passes over the calibration images: max |x| per tensor, then |x| histograms."""
    session = calibration_session(model, tensors)
    amax, images = collect_amax(session, loader, input_name, tensors)
    if images == 0:
        raise InputError("the calibration data loader yielded no images: check calibration.images")
    hists = collect_histograms(session, loader, input_name, amax)
    if hists and sum(int(hist.sum()) for hist in hists.values()) == 0:
        raise InputError("the calibration data loader yielded nothing on its second pass: pass a re-iterable loader")
    return TensorStats(amax, hists, images)
