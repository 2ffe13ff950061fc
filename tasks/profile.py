"""Per-layer profile of a TensorRT engine after validation, as a Prefect task (the work is in `yoloq`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.backend_registry import backend_spec
from yoloq.backends import BuiltModel
from yoloq.config import Params
from yoloq.errors import YoloqError


@dataclass(frozen=True)
class ProfileOutcome:
    """The files and metrics to log to the variant's MLflow run; `error` says why there are none."""

    files: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@task(name="profile", task_run_name="profile-{built.variant.name}", cache_policy=NO_CACHE)
def profile_task(built: BuiltModel, params: Params, out_dir: Path) -> ProfileOutcome:
    """profile.md/.png/.json of a TensorRT variant's engine in `out_dir`, at the profile's max batch.

    A profile is a diagnosis: when it fails (TensorRT rejects the profiler, the GPU runs out of memory) the run's
    results stand, the failure is logged as a warning and returned as `error`."""
    logger = get_run_logger()
    name, settings = built.variant.name, params.tensorrt.layer_profile
    if not backend_spec(built.variant.backend).profiled or not settings.enabled:
        return ProfileOutcome()
    from yoloq.backends.tensorrt.environment import load_environment
    from yoloq.backends.tensorrt.profile import profile_engine, profile_line
    from yoloq.backends.tensorrt.profile_report import write_profile

    try:
        environment = load_environment().describe()
        profiled = profile_engine(built.path, None, settings.iterations, settings.warmup, environment)
        files = write_profile(profiled, out_dir)
    except (YoloqError, RuntimeError, OSError) as exc:
        logger.warning("profile %s: no profile: %s", name, exc)
        return ProfileOutcome(error=f"{type(exc).__name__}: {exc}")
    metrics = files.metrics
    logger.info("profile %s: %s (batch %d); %s", name, profile_line(metrics), profiled.batch, files.markdown)
    return ProfileOutcome(files.paths, metrics)
