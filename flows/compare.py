"""Compare quantize runs side by side: variants across MLflow parent runs, as a table and a mAP-vs-speed plot.

    yoloq compare                  # the two latest finished runs of experiment 'yoloq'
    yoloq compare RUN_ID RUN_ID    # these parent runs

The comparison is itself logged to MLflow as a run tagged `yoloq.kind=comparison` holding the table and plot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from flows.tracking import COMPARISON_KIND, KIND_TAG, VARIANT_KIND
from yoloq.artifacts import atomic_write_text
from yoloq.errors import InputError
from yoloq.report import PlotPoint, speed_accuracy_plot


@dataclass(frozen=True)
class VariantRow:
    run_id: str
    run_name: str
    variant: str
    precision: str
    backend: str
    map50_95: float
    delta_vs_fp32: float
    delta_vs_fp16: float | None
    latency_ms_b1: float
    throughput_ips: float
    size_mb: float


def latest_parent_runs(client: MlflowClient, experiment: str, count: int) -> list[str]:
    """Ids of the `count` latest finished parent (flow) runs of `experiment`, newest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise InputError(f"MLflow experiment {experiment!r} does not exist at {client.tracking_uri}: run yoloq first")
    runs = client.search_runs(
        [found.experiment_id],
        "attributes.status = 'FINISHED'",
        max_results=200,
        order_by=["attributes.start_time DESC"],
    )
    parents = [
        r.info.run_id
        for r in runs
        if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get(KIND_TAG) != COMPARISON_KIND
    ]
    if not parents:
        raise InputError(f"no finished yoloq runs in experiment {experiment!r} at {client.tracking_uri}")
    return parents[:count]


def variant_rows(client: MlflowClient, run_id: str) -> list[VariantRow]:
    """One row per child (variant) run of the parent run `run_id`."""
    try:
        parent = client.get_run(run_id)
    except Exception as exc:  # MlflowException for unknown ids
        raise InputError(f"MLflow run {run_id!r} not found at {client.tracking_uri}") from exc
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", order_by=["attributes.start_time ASC"]
    )
    variants = [child for child in children if is_variant_run(child)]
    if not variants:
        raise InputError(f"MLflow run {run_id} has no variant runs: pass the id of a yoloq flow's parent run")
    fp16 = next((c for c in variants if c.data.params.get("precision") == "fp16"), None)
    return [_row(parent, child, fp16) for child in variants]


def is_variant_run(run: Run) -> bool:
    """A child run that holds a variant: tagged yoloq.kind=variant, or (runs logged before that tag) untagged with a
    precision param. The INT8 search's candidates (yoloq.kind=candidate) and other kinds of child runs are not."""
    kind = run.data.tags.get(KIND_TAG)
    if kind is not None:
        return kind == VARIANT_KIND
    return "precision" in run.data.params


def _row(parent: Run, child: Run, fp16: Run | None) -> VariantRow:
    metrics = child.data.metrics
    map50_95 = metrics.get("map50_95", float("nan"))
    return VariantRow(
        run_id=parent.info.run_id,
        run_name=parent.data.tags.get("mlflow.runName", parent.info.run_id[:8]),
        variant=child.data.tags.get("mlflow.runName", "?"),
        precision=child.data.params.get("precision", "?"),
        backend=child.data.params.get("backend", "?"),
        map50_95=map50_95,
        delta_vs_fp32=metrics.get("delta_map50_95_vs_fp32", float("nan")),
        delta_vs_fp16=map50_95 - fp16.data.metrics["map50_95"] if fp16 and "map50_95" in fp16.data.metrics else None,
        latency_ms_b1=metrics.get("latency_ms_b1", float("nan")),
        throughput_ips=metrics.get("throughput_ips", float("nan")),
        size_mb=metrics.get("size_mb", float("nan")),
    )


def comparison_table(rows: list[VariantRow]) -> str:
    lines = [
        "| run | variant | precision | backend | mAP50-95 | Δ vs FP32 (points) | Δ vs FP16 (points) | latency ms (b1) "
        "| images/s | size MB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fp16 = "n/a" if r.delta_vs_fp16 is None else f"{r.delta_vs_fp16 * 100:+.2f}"
        lines.append(
            f"| {r.run_name} | {r.variant} | {r.precision} | {r.backend} | {r.map50_95:.4f} | "
            f"{r.delta_vs_fp32 * 100:+.2f} | {fp16} | {r.latency_ms_b1:.2f} | {r.throughput_ips:.1f} | "
            f"{r.size_mb:.2f} |"
        )
    return "\n".join(lines)


def compare_runs(tracking_uri: str, run_ids: list[str], experiment: str, out_dir: Path) -> tuple[str, Path, str]:
    """Table, plot path and the id of the MLflow comparison run for `run_ids` (default: the two latest runs)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    ids = run_ids or latest_parent_runs(client, experiment, 2)
    rows = [row for run_id in ids for row in variant_rows(client, run_id)]
    table = comparison_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = [PlotPoint(r.run_name, r.variant, r.throughput_ips, r.map50_95) for r in rows]
    plot = speed_accuracy_plot(points, out_dir / "compare.png", "yoloq runs: accuracy vs speed")
    table_path = atomic_write_text(out_dir / "compare.md", table + "\n")
    experiment_id = client.get_run(ids[0]).info.experiment_id
    run = client.create_run(
        experiment_id,
        tags={
            "mlflow.runName": f"compare-{len(ids)}-runs",
            KIND_TAG: COMPARISON_KIND,
            "yoloq.compared_runs": ",".join(ids),
        },
    )
    client.log_artifact(run.info.run_id, str(table_path))
    client.log_artifact(run.info.run_id, str(plot))
    client.set_terminated(run.info.run_id, "FINISHED")
    return table, plot, run.info.run_id
