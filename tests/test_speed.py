"""Variants timed interleaved: per-round ratios cancel a machine's changing load."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from yoloq.speed import SpeedMeasures, compare_speeds, speed_table, tile_batch, time_interleaved, wall_clock_measure


def test_interleaved_ratios_cancel_load_that_changes_between_rounds():
    load = itertools.cycle([1.0, 3.0, 1.5, 2.5])  # the machine's load, changing every round
    current = {"load": 1.0}

    def fast() -> float:
        current["load"] = next(load)  # the load changes once per round (fast runs first)
        return 2.0 * current["load"]

    def slow() -> float:
        return 3.0 * current["load"]

    speeds = time_interleaved({"fast": fast, "slow": slow}, batch=8, rounds=8)
    assert speeds["fast"].speedup_over(speeds["slow"]) == pytest.approx(1.5)  # exactly, whatever the load
    assert len(speeds["slow"].ms_per_batch) == 8 and speeds["fast"].images_per_s > speeds["slow"].images_per_s
    table = speed_table(speeds, "slow")
    assert "| fast |" in table and "1.50" in table
    with pytest.raises(ValueError):
        time_interleaved({}, 8, 1)


def test_variants_with_other_batches_are_timed_in_their_own_rounds():
    order = []

    def measure(name: str, ms: float):
        return lambda: order.append(name) or ms

    measures = {
        "cpu-a": SpeedMeasures(8, measure("cpu-a", 80.0), measure("cpu-a-b1", 12.0), 2),
        "gpu": SpeedMeasures(32, measure("gpu", 3.2), measure("gpu-b1", 0.6), 3),
        "cpu-b": SpeedMeasures(8, measure("cpu-b", 40.0), measure("cpu-b-b1", 8.0), 2),
    }
    speeds = compare_speeds(measures)
    assert list(speeds) == ["cpu-a", "gpu", "cpu-b"]
    assert order[:4] == ["cpu-a", "cpu-b", "cpu-a", "cpu-b"]  # the two batch-8 variants alternate
    throughput, latency = speeds["cpu-b"]
    assert throughput.batch == 8 and throughput.images_per_s == pytest.approx(200.0) and latency.median_ms == 8.0
    assert speeds["gpu"][0].images_per_s == pytest.approx(10_000.0) and len(speeds["gpu"][0].ms_per_batch) == 3


def test_wall_clock_measure_and_tiling():
    frames = np.zeros((3, 3, 4, 4), np.float32)
    assert tile_batch(frames, 8).shape == (8, 3, 4, 4) and tile_batch(frames, 2).shape == (2, 3, 4, 4)
    calls = []
    measure = wall_clock_measure(lambda batch: calls.append(batch.shape[0]), tile_batch(frames, 8), iterations=3)
    assert measure() >= 0.0 and calls == [8, 8, 8]
