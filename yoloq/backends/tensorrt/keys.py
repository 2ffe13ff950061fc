"""Names of what TensorRT builds write: engines, calibration caches and the tactic timing cache (pure).

Engines are named by everything that changes their bytes, calibration caches by everything that changes their
scales; a change in any of these gives a new name, so a stale file is never reused.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from yoloq.artifacts import content_key
from yoloq.backends.tensorrt.cuda import GpuInfo
from yoloq.backends.tensorrt.versions import BuildPlan, TrtVersion
from yoloq.calibration_data import PREPROCESSING_ID
from yoloq.config import TensorRTConfig, TrtCalibrator

# v2: engines are built with ProfilingVerbosity.DETAILED (the engine inspector then reports kernels, for
# `yoloq profile`); engines named by v1 are rebuilt, not reused.
ENGINE_KEY_VERSION = "trt-engine-v2"


def calibration_cache_key(
    onnx_sha256: str,
    images_hash: str,
    calibrator: TrtCalibrator,
    batch: int,
    imgsz: int,
    tensorrt_version: str,
    library_version: str,
) -> str:
    """Names a calibration cache: model, images (+ preprocessing), algorithm, batch and TensorRT version."""
    return content_key(
        "trt-calib-v1",
        onnx_sha256,
        images_hash,
        PREPROCESSING_ID,
        imgsz,
        calibrator,
        batch,
        tensorrt_version,
        library_version,
    )


def engine_key(
    onnx_sha256: str,
    plan: BuildPlan,
    settings: TensorRTConfig,
    environment: dict[str, str],
    calibration_key: str | None,
) -> str:
    """Names an engine: everything that changes its bytes (the timing cache only speeds the build up)."""
    return content_key(
        ENGINE_KEY_VERSION,
        onnx_sha256,
        asdict(plan),
        settings.profile.model_dump(),
        settings.workspace_mb,
        settings.builder_optimization_level,
        sorted(settings.tactic_sources) if settings.tactic_sources is not None else None,
        {k: environment[k] for k in sorted(environment) if k != "gpu_memory_mb"},
        calibration_key,
    )


def default_timing_cache(out_dir: Path, runtime: TrtVersion, gpu: GpuInfo) -> Path:
    return out_dir / f"trt-timing-{runtime}-{gpu.slug}.cache"
