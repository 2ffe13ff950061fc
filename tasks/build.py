from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.backends import BuiltModel, get_backend
from yoloq.config import Params, VariantConfig


@task(name="build", task_run_name="build-{variant.name}", cache_policy=NO_CACHE)
def build_task(
    variant: VariantConfig, params: Params, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path
) -> BuiltModel:
    """Make one variant with its backend (an ONNX model for ONNX Runtime, an engine for TensorRT)."""
    logger = get_run_logger()
    backend = get_backend(variant.backend, params)
    if hasattr(backend, "progress"):
        backend.progress = logger.info  # TensorRT builds take minutes: say what is happening
    built = backend.build(variant, fp32_onnx, qdq_onnx, out_dir)
    logger.info(
        "build %s: %s (%s, %.2f MB) in %.1f s",
        variant.name,
        built.path.name,
        variant.backend,
        built.size_mb,
        built.build_seconds,
    )
    return built
