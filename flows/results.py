"""One path for logging results, for local runs (flows/quantize.py) and build targets (flows/targets.py): a child
run per variant, the run's summary files, gate tags, the Prefect markdown artifact."""

from __future__ import annotations

from pathlib import Path

import cv2
from prefect.artifacts import create_markdown_artifact

from flows.outcome import FlowOutcome
from flows.tracking import VARIANT_KIND, RunTracker
from tasks.validate import cached_detect
from yoloq.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text, content_key
from yoloq.backends import BuiltModel
from yoloq.config import Params
from yoloq.drawing import comparison_image
from yoloq.export import ModelFacts
from yoloq.preprocess import read_image
from yoloq.report import VariantResult, comparison_plot, interval_note, results_table, variant_metrics
from yoloq.validate import ValidationSet


def log_variant_run(
    tracker: RunTracker,
    run_name: str,
    run_params: dict[str, str],
    result: VariantResult,
    per_class: str,
    folder: Path,
    artifacts: list[Path],
    extra_metrics: dict[str, float] | None = None,
) -> str:
    """A child run for one variant (named `run_name`; its metrics also on the parent as `<run_name>.<metric>`),
    with its per-class AP table, its model file and `artifacts`. Returns the run id; the caller finishes it."""
    child = tracker.start_child(run_name, run_params, VARIANT_KIND, datasets=("validation",))
    metrics = {**variant_metrics(result), **(extra_metrics or {})}
    tracker.log_metrics(child, metrics)
    tracker.log_metrics(tracker.parent_run_id, {f"{run_name}.{k}": v for k, v in metrics.items()})
    per_class_path = atomic_write_text(folder / "per_class_ap.md", per_class.rstrip("\n") + "\n")
    tracker.log_artifacts(child, [per_class_path, result.model_path, *artifacts])
    return child


PREVIEW_MIN_SCORE = 0.25
"""Detections drawn on the previews: validation keeps everything above 0.001, people look at confident ones."""


def preview_images(
    params: Params,
    builds: dict[str, BuiltModel],
    variants: list[str],
    dataset: ValidationSet,
    facts: ModelFacts,
    folder: Path,
) -> list[Path]:
    """The first `validation.preview_images` validation images, each with every variant's detections side by side
    (JPEGs in `folder`). The detections are validation's own, read from the detection cache."""
    count = params.validation.preview_images
    if count == 0:
        return []
    images = [t.path for t in dataset.truths]
    found = {name: cached_detect(builds[name], images, facts, params)[0] for name in variants}
    paths = []
    for index, path in enumerate(images[:count]):
        image = read_image(path)
        if image is None:
            continue
        picture = comparison_image(image, {n: d[index] for n, d in found.items()}, facts.names, PREVIEW_MIN_SCORE)
        ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 88])
        if ok:
            paths.append(atomic_write_bytes(folder / f"{path.stem}.jpg", encoded.tobytes()))
    return paths


def log_run_summary(params: Params, tracker: RunTracker, outcome: FlowOutcome, note: str, tags: dict[str, str]) -> str:
    """The run's table, plot and results.json on the parent run, its gate (and `tags`), and the Prefect markdown
    artifact; returns the table."""
    parent, report_dir = tracker.parent_run_id, outcome.report_dir
    table = results_table(outcome.results)
    if interval := interval_note(outcome.results):
        table += f"\n\n{interval}"
    plot = comparison_plot(outcome.results, report_dir / "comparison.png", f"{params.model.path.name}: mAP vs speed")
    results_md = atomic_write_text(report_dir / "results.md", f"{table}\n\n{note}\n")
    results_json = atomic_write_json(report_dir / "results.json", outcome.document())
    tracker.log_artifacts(parent, [plot, results_md, results_json])
    gate = outcome.gate
    tracker.set_tags(parent, {"gate": "passed" if gate.passed else "failed", "gate.reasons": "; ".join(gate.reasons)})
    tracker.set_tags(parent, tags)
    gate_line = "gate: passed" if gate.passed else "gate: FAILED: " + "; ".join(gate.reasons)
    create_markdown_artifact(
        key=f"results-{content_key(parent, length=8)}",
        markdown=f"# yoloq results\n\n{table}\n\n{note}\n\n{gate_line}\n\nMLflow run `{parent}`",
        description="yoloq: per-variant mAP and speed",
    )
    return table
