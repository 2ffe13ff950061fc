"""Thin Prefect tasks around the core stages: logging and progress here, the work in `yoloq`."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.backends import BuiltModel
from yoloq.build import build_variant_with_deadline
from yoloq.config import Params, VariantConfig


@task(name="build", task_run_name="build-{variant.name}", cache_policy=NO_CACHE)
def build_task(
    variant: VariantConfig, params: Params, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path
) -> BuiltModel:
    """Make one variant with its backend (an ONNX model for ONNX Runtime, an engine for TensorRT).

    TensorRT builds run in a child process that is killed at `build.timeout_s` (Prefect's own task timeout cannot
    stop a thread inside TensorRT's C++ code)."""
    logger = get_run_logger()
    built = build_variant_with_deadline(variant, params, fp32_onnx, qdq_onnx, out_dir, logger.info)
    logger.info(
        "build %s: %s (%s, %.2f MB) in %.1f s",
        variant.name,
        built.path.name,
        variant.backend,
        built.size_mb,
        built.build_seconds,
    )
    return built
