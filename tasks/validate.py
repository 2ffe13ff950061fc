from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.backends import BuiltModel, get_backend
from yoloq.config import Params
from yoloq.export import ModelFacts
from yoloq.validate import ValidationSet, VariantScore, score_variant


@task(name="validate", task_run_name="validate-{built.variant.name}", cache_policy=NO_CACHE)
def validate_task(built: BuiltModel, dataset: ValidationSet, facts: ModelFacts, params: Params) -> VariantScore:
    """COCO mAP, latency at batch 1 and throughput of one built variant."""
    logger = get_run_logger()
    name = built.variant.name
    logger.info("validate %s on %d images", name, len(dataset.truths))
    runner = get_backend(built.variant.backend, params).load(built)
    timing_fn = None
    if built.variant.backend == "tensorrt":  # device time (CUDA events) at batch 1 and the profile's max batch
        from yoloq.backends.tensorrt import device_timing_fn

        timing_fn = device_timing_fn(facts.imgsz, params.tensorrt)
    try:
        score = score_variant(
            runner, dataset, facts.head_format, facts.imgsz, facts.names, params.validation, logger.info, timing_fn
        )
    finally:
        if hasattr(runner, "close"):
            runner.close()
    logger.info(
        "validate %s: mAP50-95 %.4f, mAP50 %.4f, %.2f ms at batch 1, %.1f images/s at batch %d (%.0f s)",
        name,
        score.map.map50_95,
        score.map.map50,
        score.timing.latency_ms_b1,
        score.timing.throughput_ips,
        score.timing.throughput_batch,
        score.seconds,
    )
    return score
