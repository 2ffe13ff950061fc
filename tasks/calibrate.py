from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.calibrate import CalibrationResult, calibrate
from yoloq.config import CalibrationConfig


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate_task(
    fp32_onnx: Path,
    input_name: str,
    imgsz: int,
    config: CalibrationConfig,
    validation_images: list[Path],
    out_dir: Path,
) -> CalibrationResult:
    """Calibration images -> INT8 Q/DQ ONNX (content-hashed, reused when present)."""
    logger = get_run_logger()
    result = calibrate(fp32_onnx, input_name, imgsz, config, validation_images, out_dir, progress=logger.info)
    logger.info(
        "calibrate: %s %s (%s, %d images, %d skipped, %d nodes kept in float: head decoding tail, stem and head "
        "convs) in %.1f s",
        "reused" if result.reused else "wrote",
        result.qdq_path.name,
        result.algorithm,
        result.num_images,
        result.skipped_images,
        len(result.excluded_nodes),
        result.seconds,
    )
    return result
