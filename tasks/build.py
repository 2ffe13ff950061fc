from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.backends import BuiltModel, get_backend
from yoloq.config import VariantConfig


@task(name="build", task_run_name="build-{variant.name}", cache_policy=NO_CACHE)
def build_task(variant: VariantConfig, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path) -> BuiltModel:
    """Make one variant with its backend."""
    logger = get_run_logger()
    built = get_backend(variant.backend).build(variant, fp32_onnx, qdq_onnx, out_dir)
    logger.info(
        "build %s: %s (%s, %.2f MB) in %.1f s",
        variant.name,
        built.path.name,
        variant.backend,
        built.size_mb,
        built.build_seconds,
    )
    return built
