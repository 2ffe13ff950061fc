from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.config import SimplifyConfig
from yoloq.simplify import SimplifyResult, simplify_model


@task(name="simplify", cache_policy=NO_CACHE)
def simplify_task(
    source: Path, images: list[Path], input_name: str, imgsz: int, config: SimplifyConfig, out_dir: Path
) -> SimplifyResult:
    """onnxsim + Polygraphy equivalence check; falls back to the unsimplified model (and says so)."""
    logger = get_run_logger()
    result = simplify_model(source, images, input_name, imgsz, config, out_dir)
    log = logger.info if result.simplified or not config.enabled else logger.warning
    log(
        "simplify: %s%s (max abs err %.3g, max rel err %.3g)",
        "reused: " if result.reused else "",
        result.message,
        result.max_abs_error,
        result.max_rel_error,
    )
    return result
