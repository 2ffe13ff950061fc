from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.artifacts import file_sha256, files_sha256
from yoloq.backends import BuiltModel, closing_runner, get_backend, output_head_format
from yoloq.cache import cached_detections
from yoloq.calibration_data import PREPROCESSING_ID
from yoloq.config import Params
from yoloq.export import ModelFacts
from yoloq.heads import Detections
from yoloq.metrics import coco_map
from yoloq.validate import NOT_TIMED, Progress, ValidationSet, VariantScore, detect


def cached_detect(
    built: BuiltModel, images: list[Path], facts: ModelFacts, params: Params, progress: Progress | None = None
) -> tuple[list[Detections], bool]:
    """Detections of `built` on `images`, reused when the same model content saw the same image contents with the
    same decoding settings (a re-run with nothing changed scores every search candidate in seconds)."""
    config = params.validation
    head_format = output_head_format(built, facts.head_format)
    key = [
        "detections-v2",  # v2: Q/DQ models on ONNX Runtime run the integer-exact simulation (yoloq.quant.simulate)
        PREPROCESSING_ID,
        file_sha256(built.path),
        files_sha256(images),
        head_format,
        facts.imgsz,
        config.conf_threshold,
        config.iou_threshold,
        config.max_detections,
        built.variant.backend,
    ]

    def run() -> list[Detections]:
        with closing_runner(get_backend(built.variant.backend, params).load(built)) as runner:
            return detect(runner, images, head_format, facts.imgsz, config, progress)

    return cached_detections(params.output_dir / "cache" / "detections", key, run)


@task(name="validate", task_run_name="validate-{built.variant.name}", cache_policy=NO_CACHE)
def validate_task(built: BuiltModel, dataset: ValidationSet, facts: ModelFacts, params: Params) -> VariantScore:
    """COCO mAP of one built variant on the validation (report) set; its speed comes from the speed stage."""
    logger = get_run_logger()
    name = built.variant.name
    started = time.perf_counter()
    detections, reused = cached_detect(built, [t.path for t in dataset.truths], facts, params, logger.info)
    result = coco_map(dataset.truths, detections, facts.names, keep_matches=True)  # for the delta's interval
    logger.info(
        "validate %s: mAP50-95 %.4f, mAP50 %.4f on %d images (%s)",
        name,
        result.map50_95,
        result.map50,
        len(dataset.truths),
        "cached detections" if reused else f"{time.perf_counter() - started:.0f} s",
    )
    return VariantScore(result, NOT_TIMED, time.perf_counter() - started)


@task(name="detect", task_run_name="detect-{built.variant.name}", cache_policy=NO_CACHE)
def detect_task(built: BuiltModel, images: list[Path], facts: ModelFacts, params: Params) -> list[Detections]:
    """Detections of one built variant on `images` (the selection set): the validation settings, no scoring."""
    return cached_detect(built, images, facts, params)[0]
