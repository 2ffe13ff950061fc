from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.backends import BuiltModel, closing_runner, get_backend
from yoloq.config import Params
from yoloq.export import ModelFacts
from yoloq.heads import Detections
from yoloq.validate import TimingFn, ValidationSet, VariantScore, detect, score_variant


@task(name="validate", task_run_name="validate-{built.variant.name}", cache_policy=NO_CACHE)
def validate_task(
    built: BuiltModel, dataset: ValidationSet, facts: ModelFacts, params: Params, measure_speed: bool = True
) -> VariantScore:
    """COCO mAP, latency at batch 1 and throughput of one built variant (timing skipped without measure_speed)."""
    logger = get_run_logger()
    name = built.variant.name
    logger.info("validate %s on %d images", name, len(dataset.truths))
    timing_fn = _timing_fn(built, facts, params)
    with closing_runner(get_backend(built.variant.backend, params).load(built)) as runner:
        score = score_variant(
            runner,
            dataset,
            facts.head_format,
            facts.imgsz,
            facts.names,
            params.validation,
            logger.info,
            timing_fn,
            measure_speed,
        )
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


def _timing_fn(built: BuiltModel, facts: ModelFacts, params: Params) -> TimingFn | None:
    if built.variant.backend != "tensorrt":
        return None  # wall clock at batch 1 and validation.timing.batch_size
    from yoloq.backends.tensorrt.timing import device_timing_fn  # device time (CUDA events), batch 1 and profile max

    return device_timing_fn(facts.imgsz, params.tensorrt)


@task(name="detect", task_run_name="detect-{built.variant.name}", cache_policy=NO_CACHE)
def detect_task(built: BuiltModel, images: list[Path], facts: ModelFacts, params: Params) -> list[Detections]:
    """Detections of one built variant on `images` (the selection set): the validation settings, no scoring."""
    with closing_runner(get_backend(built.variant.backend, params).load(built)) as runner:
        return detect(runner, images, facts.head_format, facts.imgsz, params.validation)
