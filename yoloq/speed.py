"""Speed of variants compared fairly: every variant timed in one process, interleaved round by round.

A shared machine's load changes from minute to minute, so variants timed minutes apart compare that load, not the
variants (measured here: the same INT8 model 1.37x slower than FP32 in one run, 2.8x faster in the next). Here
each round times every variant once, back to back, and the ratio of two variants is the median of their per-round
ratios: load that changes between rounds cancels out. Each backend brings its own `Measure` (wall clock on the
CPU, CUDA events on the GPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

Measure = Callable[[], float]
"""One timing of one variant: milliseconds per batch."""


@dataclass(frozen=True)
class VariantSpeed:
    name: str
    batch: int
    ms_per_batch: list[float]  # one value per round

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms_per_batch)

    @property
    def images_per_s(self) -> float:
        return self.batch * 1000.0 / self.median_ms

    def speedup_over(self, other: VariantSpeed) -> float:
        """Median over rounds of other's time / this one's time (> 1: this variant is faster)."""
        ratios = [b / a for a, b in zip(self.ms_per_batch, other.ms_per_batch, strict=True) if a > 0]
        return statistics.median(ratios) if ratios else float("nan")


def time_interleaved(measures: Mapping[str, Measure], batch: int, rounds: int) -> dict[str, VariantSpeed]:
    """Time every variant once per round, in the same order each round, `rounds` times."""
    if rounds < 1 or not measures:
        raise ValueError("time_interleaved needs at least one variant and one round")
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            samples[name].append(measure())
    return {name: VariantSpeed(name, batch, values) for name, values in samples.items()}


def tile_batch(frames: np.ndarray, size: int) -> np.ndarray:
    """`size` images from `frames` (N, C, H, W), repeating them when there are fewer."""
    return np.concatenate([frames] * -(-size // len(frames)))[:size]


def wall_clock_measure(infer: Callable[[np.ndarray], object], batch: np.ndarray, iterations: int) -> Measure:
    """A Measure for a CPU runner: wall milliseconds per batch over `iterations` back-to-back inferences."""

    def measure() -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            infer(batch)
        return (time.perf_counter() - start) * 1000.0 / iterations

    return measure


def speed_table(speeds: Mapping[str, VariantSpeed], reference: str) -> str:
    """Markdown: per variant, ms per batch (median over rounds), images/s and the speed-up over `reference`."""
    base = speeds[reference]
    lines = [
        f"| variant | ms per batch of {base.batch} (median of {len(base.ms_per_batch)} rounds) | images/s | "
        f"x {reference} |",
        "|---|---:|---:|---:|",
    ]
    for name, speed in speeds.items():
        lines.append(f"| {name} | {speed.median_ms:.3f} | {speed.images_per_s:,.0f} | {speed.speedup_over(base):.2f} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class SpeedMeasures:
    """How a backend times one loaded variant: throughput at `batch` and latency at batch 1 (ms per call)."""

    batch: int
    throughput: Measure  # ms per batch of `batch`
    latency: Measure  # ms per batch of 1
    rounds: int  # how many interleaved rounds this backend's settings ask for


def compare_speeds(measures: Mapping[str, SpeedMeasures]) -> dict[str, tuple[VariantSpeed, VariantSpeed]]:
    """Throughput and latency of every variant, interleaved: variants with the same batch are timed in the same
    rounds (their ratios are fair), as many rounds as the group's measures ask for; returns name -> (throughput
    speed, batch-1 speed)."""
    by_batch: dict[int, dict[str, SpeedMeasures]] = {}
    for name, measure in measures.items():
        by_batch.setdefault(measure.batch, {})[name] = measure
    result: dict[str, tuple[VariantSpeed, VariantSpeed]] = {}
    for batch, group in by_batch.items():
        rounds = max(m.rounds for m in group.values())
        throughput = time_interleaved({name: m.throughput for name, m in group.items()}, batch, rounds)
        latency = time_interleaved({name: m.latency for name, m in group.items()}, 1, rounds)
        for name in group:
            result[name] = (throughput[name], latency[name])
    return {name: result[name] for name in measures}
