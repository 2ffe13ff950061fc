"""Range algorithms: the symmetric range (amax) each calibration algorithm picks from one set of statistics.

minmax takes max |x|; percentile the given percentile of |x|; entropy TensorRT's KL-divergence threshold; mse the
threshold with the least fake-quantization squared error over the histogram (NVIDIA pytorch-quantization's "mse"
calibrator). Entropy clips YOLO's long-tailed SiLU activations too hard: -5 points on yolov5n, like TensorRT's
entropy calibrator. Every result is snapped up to the range grid (`snap_amax`), so it is the same on any CPU.
"""

from __future__ import annotations

import numpy as np

from yoloq.errors import InputError
from yoloq.quant.formats import INT8, QuantFormat
from yoloq.quant.statistics import TensorStats, snap_amax

ALGORITHMS = ("minmax", "entropy", "percentile", "mse")
ENTROPY_QUANT_BINS = 128  # INT8 magnitudes: 128 levels on each side of zero


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


def mse_amax(hist: np.ndarray, amax: float, start_bin: int = ENTROPY_QUANT_BINS, fmt: QuantFormat = INT8) -> float:
    """The threshold (a bin's upper edge, from `start_bin` up) with the least fake-quantization squared error in
    `fmt`, each bin's values taken at its centre (NVIDIA pytorch-quantization's `mse` method on a |x| histogram)."""
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
        quantized = fmt.fake_quantize(centres[None, :], thresholds / fmt.qmax)
        errors = ((quantized - centres[None, :]) ** 2 * counts[None, :]).sum(axis=1)
        index = int(np.argmin(errors))
        if errors[index] < best_error:
            best_amax, best_error = float(thresholds[index, 0]), float(errors[index])
    return best_amax


def check_algorithm(algorithm: str, percentile: float) -> None:
    if algorithm not in ALGORITHMS:
        raise InputError(f"calibration algorithm {algorithm!r} is unknown: use one of {', '.join(ALGORITHMS)}")
    if algorithm == "percentile" and not 90.0 < percentile <= 100.0:
        raise InputError(f"calibration.percentile {percentile} is outside (90, 100]: e.g. 99.99")


def amax_for(stats: TensorStats, algorithm: str, percentile: float, fmt: QuantFormat = INT8) -> dict[str, float]:
    """The symmetric range per tensor that `algorithm` picks from the statistics, snapped to the range grid."""
    check_algorithm(algorithm, percentile)
    if algorithm == "minmax":
        return {name: snap_amax(value) for name, value in stats.amax.items()}
    pick = {
        "percentile": lambda hist, value: percentile_amax(hist, value, percentile),
        "entropy": entropy_amax,
        "mse": lambda hist, value: mse_amax(hist, value, fmt=fmt),
    }[algorithm]
    return {
        name: snap_amax(pick(stats.hists[name], value) if name in stats.hists else value)
        for name, value in stats.amax.items()
    }
