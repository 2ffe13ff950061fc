"""Time an engine: device time of `execute_async_v3` (CUDA events) and end-to-end time per image."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yoloq.backends.tensorrt.cuda import EventTimer
from yoloq.backends.tensorrt.runner import TensorRTRunner
from yoloq.config import TensorRTConfig, ValidationConfig
from yoloq.errors import InputError
from yoloq.heads import HeadFormat, decode
from yoloq.preprocess import load_preprocessed
from yoloq.speed import tile_batch
from yoloq.validate import Timing


@dataclass(frozen=True)
class DeviceTiming:
    """GPU time of `execute_async_v3` (CUDA events), after warm-up."""

    batch: int
    iterations: int
    latency_ms_median: float  # one execution at a time (synchronised): what a single request waits for
    latency_ms_p90: float
    throughput_ms_per_batch: float  # back-to-back executions on the stream: steady-state cost of one batch
    images_per_s: float


def time_device(runner: TensorRTRunner, batch: np.ndarray, iterations: int, warmup: int) -> DeviceTiming:
    """Device time of the engine on `batch` (N within the profile), measured with CUDA events."""
    size = batch.shape[0]
    if not runner.min_batch <= size <= runner.max_batch:
        raise InputError(f"timing batch {size} is outside the engine profile {runner.min_batch}..{runner.max_batch}")
    runner.set_input(batch)
    for _ in range(warmup):
        runner.execute()
    runner.synchronize()
    timer = EventTimer(runner.cudart, runner.stream_ptr)
    start = timer.create()
    end = 0
    try:
        end = timer.create()
        latencies = []
        for _ in range(iterations):
            timer.record(start)
            runner.execute()
            timer.record(end)
            latencies.append(timer.elapsed_ms(start, end))
        timer.record(start)
        for _ in range(iterations):
            runner.execute()
        timer.record(end)
        total_ms = timer.elapsed_ms(start, end)
    finally:
        timer.destroy(start)
        if end:
            timer.destroy(end)
    per_batch = total_ms / iterations
    return DeviceTiming(
        batch=size,
        iterations=iterations,
        latency_ms_median=statistics.median(latencies),
        latency_ms_p90=float(np.percentile(latencies, 90)),
        throughput_ms_per_batch=per_batch,
        images_per_s=size * 1000.0 / per_batch,
    )


def measure_device_timing(
    runner: TensorRTRunner, sample: np.ndarray, batch_sizes: list[int], iterations: int, warmup: int
) -> list[DeviceTiming]:
    """Device timing at each batch size, with `sample` (real preprocessed images) tiled to fill each batch."""
    timings = []
    for size in batch_sizes:
        batch = tile_batch(sample, size)
        timings.append(time_device(runner, batch, iterations, warmup))
    return timings


def measure_end_to_end(
    runner: Any,
    images: list[Path],
    imgsz: int,
    head_format: HeadFormat,
    config: ValidationConfig,
    warmup: int = 2,
) -> float:
    """Wall milliseconds per image for read + letterbox + infer (batch 1) + decode with NMS, over `images`."""
    if not images:
        raise InputError("end-to-end timing needs at least one image")

    def one(path: Path) -> None:
        loaded = load_preprocessed(path, imgsz)
        if loaded is None:
            raise InputError(f"image {path} is unreadable")
        output = runner.infer(loaded[0][None])
        decode(output, head_format, config.conf_threshold, config.iou_threshold, config.max_detections)

    for path in images[:warmup]:
        one(path)
    start = time.perf_counter()
    for path in images:
        one(path)
    return (time.perf_counter() - start) * 1000.0 / len(images)


def device_timing(runner: TensorRTRunner, images: list[Path], imgsz: int, settings: TensorRTConfig) -> Timing:
    """`yoloq validate`'s timing of an engine: device latency at batch 1 and images/s at the largest batch both the
    settings and the engine's own profile allow."""
    size = min(settings.profile.max_batch, runner.max_batch)
    frames = [load_preprocessed(p, imgsz) for p in images[:size]]
    sample = np.stack([frame[0] for frame in frames if frame is not None])
    single, full = measure_device_timing(runner, sample, [1, size], settings.timing.iterations, settings.timing.warmup)
    return Timing(latency_ms_b1=single.latency_ms_median, throughput_ips=full.images_per_s, throughput_batch=full.batch)


def device_timing_fn(imgsz: int, settings: TensorRTConfig) -> Callable[[TensorRTRunner, list[Path]], Timing]:
    """`score_variant`'s timing_fn for engines: `device_timing` with these settings."""
    return lambda runner, images: device_timing(runner, images, imgsz, settings)
