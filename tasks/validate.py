from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.backends import BuiltModel, get_backend
from yoloq.config import ValidationConfig
from yoloq.export import ModelFacts
from yoloq.validate import ValidationSet, VariantScore, score_variant


@task(name="validate", task_run_name="validate-{built.variant.name}", cache_policy=NO_CACHE)
def validate_task(
    built: BuiltModel, dataset: ValidationSet, facts: ModelFacts, config: ValidationConfig
) -> VariantScore:
    """COCO mAP, latency at batch 1 and throughput of one built variant."""
    logger = get_run_logger()
    name = built.variant.name
    logger.info("validate %s on %d images", name, len(dataset.truths))
    runner = get_backend(built.variant.backend).load(built)
    score = score_variant(runner, dataset, facts.head_format, facts.imgsz, facts.names, config, progress=logger.info)
    logger.info(
        "validate %s: mAP50-95 %.4f, mAP50 %.4f, %.1f ms at batch 1, %.1f images/s at batch %d (%.0f s)",
        name,
        score.map.map50_95,
        score.map.map50,
        score.timing.latency_ms_b1,
        score.timing.throughput_ips,
        score.timing.throughput_batch,
        score.seconds,
    )
    return score
