from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.calibrate import (
    CalibrationResult,
    CalibrationStats,
    QdqModel,
    calibrate,
    calibration_statistics,
    write_qdq_model,
)
from yoloq.config import CalibrationConfig
from yoloq.sensitivity import SensitivityReport, analyze_sensitivity


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


@task(name="calibration-statistics", task_run_name="calibration-statistics-{num_images}", cache_policy=NO_CACHE)
def statistics_task(
    fp32_onnx: Path,
    input_name: str,
    imgsz: int,
    config: CalibrationConfig,
    validation_images: list[Path],
    out_dir: Path,
    num_images: int,
) -> CalibrationStats:
    """Activation statistics of `num_images` calibration images (content-hashed, reused when present)."""
    logger = get_run_logger()
    stats = calibration_statistics(
        fp32_onnx, input_name, imgsz, config, validation_images, out_dir, num_images, progress=logger.info
    )
    logger.info(
        "calibration statistics: %s %s (%d images) in %.1f s",
        "reused" if stats.reused else "wrote",
        stats.path.name,
        len(stats.images.images),
        stats.seconds,
    )
    return stats


@task(name="qdq-model", task_run_name="qdq-{algorithm}", cache_policy=NO_CACHE)
def qdq_task(
    fp32_onnx: Path,
    statistics: CalibrationStats,
    algorithm: str,
    percentile: float,
    float_nodes: list[str] | None,
    out_dir: Path,
    imgsz: int,
) -> QdqModel:
    """One Q/DQ model: `algorithm`'s ranges, `float_nodes` kept in float (content-hashed, reused when present)."""
    return write_qdq_model(fp32_onnx, statistics, algorithm, percentile, float_nodes, out_dir, imgsz)


@task(name="sensitivity", cache_policy=NO_CACHE)
def sensitivity_task(
    fp32_onnx: Path,
    statistics: CalibrationStats,
    algorithm: str,
    percentile: float,
    num_images: int,
    imgsz: int,
    head_format: str,
    out_dir: Path,
) -> SensitivityReport:
    """Rank every quantizable conv by how much keeping it float helps the all-INT8 model (content-hashed)."""
    logger = get_run_logger()
    report = analyze_sensitivity(
        fp32_onnx, statistics, algorithm, percentile, num_images, imgsz, head_format, out_dir, progress=logger.info
    )
    top = ", ".join(f"{layer.node} ({layer.gain * 100:+.1f} %)" for layer in report.layers[:3])
    logger.info(
        "sensitivity: %s %d convs in %.0f s; largest gains from float: %s",
        "reused" if report.reused else "ranked",
        len(report.layers),
        report.seconds,
        top,
    )
    return report
