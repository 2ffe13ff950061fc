"""The speed stage: every variant timed in one process, interleaved round by round (yoloq.speed)."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.backends import BuiltModel, closing_runner, get_backend
from yoloq.config import Params
from yoloq.errors import InputError
from yoloq.export import ModelFacts
from yoloq.preprocess import load_preprocessed
from yoloq.speed import SpeedMeasures, compare_speeds
from yoloq.validate import Timing, ValidationSet

SAMPLE_IMAGES = 32  # real preprocessed images, repeated to fill a batch


@task(name="speed", cache_policy=NO_CACHE)
def speed_task(
    builds: dict[str, BuiltModel], dataset: ValidationSet, facts: ModelFacts, params: Params
) -> dict[str, Timing]:
    """Latency at batch 1 and throughput of every built variant, timed interleaved (ratios are not the load)."""
    logger = get_run_logger()
    frames = [f[0] for t in dataset.truths[:SAMPLE_IMAGES] if (f := load_preprocessed(t.path, facts.imgsz)) is not None]
    if not frames:
        raise InputError("timing needs at least one readable validation image")
    sample = np.stack(frames)
    with ExitStack() as stack:
        measures: dict[str, SpeedMeasures] = {}
        for name, built in builds.items():
            backend = get_backend(built.variant.backend, params)
            runner = stack.enter_context(closing_runner(backend.load(built)))
            measures[name] = backend.speed_measures(runner, sample, params)
        speeds = compare_speeds(measures)
    timings = {}
    for name, (throughput, latency) in speeds.items():
        timings[name] = Timing(latency.median_ms, throughput.images_per_s, throughput.batch)
        logger.info(
            "speed %s: %.2f ms at batch 1, %.1f images/s at batch %d (median of %d interleaved rounds)",
            name,
            latency.median_ms,
            throughput.images_per_s,
            throughput.batch,
            len(throughput.ms_per_batch),
        )
    return timings
