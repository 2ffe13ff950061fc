from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from yoloq.config import ExportConfig, ModelConfig
from yoloq.export import ExportResult, export_model


@task(name="export", cache_policy=NO_CACHE)
def export_task(model: ModelConfig, config: ExportConfig, out_dir: Path) -> ExportResult:
    """Checkpoint -> ONNX (reused when the same checkpoint and settings were exported before)."""
    logger = get_run_logger()
    logger.info("export: %s (opset %d, dynamic batch %s)", model.path, config.opset, config.dynamic_batch)
    result = export_model(model, config, out_dir)
    facts = result.facts
    logger.info(
        "export: %s %s -> %s [family %s, head %s, %d classes, stride %d, input %d]",
        "reused" if result.reused else "wrote",
        model.path.name,
        result.onnx_path.name,
        facts.family,
        facts.head_format,
        len(facts.names),
        facts.stride,
        facts.imgsz,
    )
    return result
