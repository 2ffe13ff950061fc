"""Results of a run: per-variant numbers, deltas against FP32, the gate, a table, a JSON document and a plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yoloq.artifacts import file_sha256, save_figure
from yoloq.config import GateConfig, IntervalConfig
from yoloq.interval import DeltaInterval, Matches, delta_interval
from yoloq.quant.formats import FORMATS

if TYPE_CHECKING:
    from yoloq.backends.base import BuiltModel
    from yoloq.validate import Timing, VariantScore


@dataclass(frozen=True)
class VariantResult:
    name: str
    precision: str
    backend: str
    map50_95: float
    map50: float
    latency_ms_b1: float
    throughput_ips: float
    throughput_batch: int
    size_mb: float
    model_path: Path
    delta_map50_95: float = 0.0  # against the FP32 reference variant, in mAP units (0.01 = 1 point)
    delta_map50: float = 0.0
    delta_interval: DeltaInterval | None = None  # bootstrap interval of delta_map50_95 over the report images
    matches: Matches | None = field(default=None, compare=False, repr=False)  # the report set's COCO matching

    def as_json(self) -> dict[str, Any]:
        interval = self.delta_interval
        return {
            "name": self.name,
            "precision": self.precision,
            "backend": self.backend,
            "map50_95": round(self.map50_95, 5),
            "map50": round(self.map50, 5),
            "delta_map50_95_vs_fp32": round(self.delta_map50_95, 5),
            "delta_map50_95_interval": (
                None
                if interval is None
                else {
                    "low": round(interval.low, 5),
                    "high": round(interval.high, 5),
                    "level": interval.level,
                    "draws": interval.draws,
                    "images": interval.images,
                }
            ),
            "latency_ms_b1": round(self.latency_ms_b1, 3),
            "throughput_ips": round(self.throughput_ips, 2),
            "throughput_batch": self.throughput_batch,
            "size_mb": round(self.size_mb, 3),
            "model_sha256": self.model_sha256(),
        }

    def model_sha256(self) -> str | None:
        """The content hash of the model file scored (two machines that score the same file compare evaluation;
        two different files point at calibration or the build); None for a result without its file here."""
        return file_sha256(self.model_path) if self.model_path.is_file() else None

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> VariantResult:
        """A result read back from `as_json` (results.json) or a build target's row (which adds `model_path`)."""
        return cls(
            name=row["name"],
            precision=row["precision"],
            backend=row["backend"],
            map50_95=row["map50_95"],
            map50=row["map50"],
            latency_ms_b1=row["latency_ms_b1"],
            throughput_ips=row["throughput_ips"],
            throughput_batch=row["throughput_batch"],
            size_mb=row["size_mb"],
            model_path=Path(row.get("model_path", "")),
            delta_map50_95=row.get("delta_map50_95_vs_fp32", 0.0),
            delta_interval=DeltaInterval(**interval) if (interval := row.get("delta_map50_95_interval")) else None,
        )


def variant_result(
    name: str, built: BuiltModel, score: VariantScore, fp32: VariantResult | None = None
) -> VariantResult:
    """The result of a built and scored variant, named `name`; deltas against `fp32` when given."""
    result = VariantResult(
        name=name,
        precision=built.variant.precision,
        backend=built.variant.backend,
        map50_95=score.map.map50_95,
        map50=score.map.map50,
        latency_ms_b1=score.timing.latency_ms_b1,
        throughput_ips=score.timing.throughput_ips,
        throughput_batch=score.timing.throughput_batch,
        size_mb=built.size_mb,
        model_path=built.path,
        matches=score.map.matches,
    )
    return (
        result
        if fp32 is None
        else replace(result, delta_map50_95=result.map50_95 - fp32.map50_95, delta_map50=result.map50 - fp32.map50)
    )


def with_timing(result: VariantResult, timing: Timing) -> VariantResult:
    """`result` with the speed measured by the speed stage (variants timed interleaved)."""
    return replace(
        result,
        latency_ms_b1=timing.latency_ms_b1,
        throughput_ips=timing.throughput_ips,
        throughput_batch=timing.throughput_batch,
    )


def with_intervals(results: list[VariantResult], reference_name: str, config: IntervalConfig) -> list[VariantResult]:
    """Each variant with the paired bootstrap interval of its mAP50-95 delta against the reference, scored on the
    same report images (a result without matches, e.g. a build target's row, keeps none)."""
    reference = next(r for r in results if r.name == reference_name)
    if config.draws == 0 or reference.matches is None:
        return results
    return [
        r
        if r.matches is None or r.name == reference_name
        else replace(r, delta_interval=delta_interval(reference.matches, r.matches, config.draws, config.level))
        for r in results
    ]


def variant_metrics(result: VariantResult) -> dict[str, float]:
    """What an MLflow run of one variant logs as metrics."""
    interval = result.delta_interval
    bounds = {} if interval is None else {"delta_map50_95_low": interval.low, "delta_map50_95_high": interval.high}
    return {
        **bounds,
        "map50_95": result.map50_95,
        "map50": result.map50,
        "delta_map50_95_vs_fp32": result.delta_map50_95,
        "delta_map50_vs_fp32": result.delta_map50,
        "latency_ms_b1": result.latency_ms_b1,
        "throughput_ips": result.throughput_ips,
        "size_mb": result.size_mb,
    }


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str]


def with_deltas(results: list[VariantResult], reference_name: str) -> list[VariantResult]:
    reference = next(r for r in results if r.name == reference_name)
    return [
        replace(r, delta_map50_95=r.map50_95 - reference.map50_95, delta_map50=r.map50 - reference.map50)
        for r in results
    ]


def gate_reasons(result: VariantResult, fp32: VariantResult, fp16: VariantResult | None, gate: GateConfig) -> list[str]:
    """Why `result` may not ship (empty: it may): its mAP50-95 drop vs FP32 and, for INT8 with an FP16 variant
    in the run, its drop and speed-up vs FP16."""
    reasons = []
    drop = fp32.map50_95 - result.map50_95
    if drop > gate.max_map_drop + 1e-12:
        reasons.append(
            f"{result.name}: mAP50-95 {result.map50_95:.4f} is {drop * 100:.2f} points below FP32 "
            f"(gate allows {gate.max_map_drop * 100:.2f})"
        )
    if fp16 is None or result.precision not in FORMATS:
        return reasons
    drop16 = fp16.map50_95 - result.map50_95
    if drop16 > gate.max_map_drop_vs_fp16 + 1e-12:
        reasons.append(
            f"{result.name}: mAP50-95 {result.map50_95:.4f} is {drop16 * 100:.2f} points below FP16 "
            f"(gate allows {gate.max_map_drop_vs_fp16 * 100:.2f})"
        )
    speedup = result.throughput_ips / fp16.throughput_ips if fp16.throughput_ips > 0 else math.inf
    if gate.min_speedup_vs_fp16 > 0 and speedup < gate.min_speedup_vs_fp16:
        reasons.append(
            f"{result.name}: {speedup:.2f}x the FP16 throughput at batch {result.throughput_batch} "
            f"(gate wants at least {gate.min_speedup_vs_fp16:.2f}x)"
        )
    return reasons


def check_gate(results: list[VariantResult], gate: GateConfig, reference_name: str | None = None) -> GateVerdict:
    """Every variant must pass `gate_reasons` against the FP32 reference (and the first FP16 variant, if any)."""
    fp32 = next(r for r in results if r.name == reference_name or (reference_name is None and r.precision == "fp32"))
    fp16 = next((r for r in results if r.precision == "fp16"), None)
    reasons = [reason for r in results for reason in gate_reasons(r, fp32, fp16, gate)]
    return GateVerdict(passed=not reasons, reasons=reasons)


@dataclass(frozen=True)
class ShipDecision:
    """Which variant a run ships: the fastest that passes every gate (FP16 when INT8 does not pay), and why."""

    variant: str | None  # None: no variant passes (nothing ships)
    reason: str

    def as_json(self) -> dict[str, str | None]:
        return {"variant": self.variant, "reason": self.reason}


def ship_decision(results: list[VariantResult], gate: GateConfig, reference_name: str) -> ShipDecision:
    """The fastest variant (throughput, timed interleaved) among those with no gate reason; the FP32 reference is
    one of them, so an INT8 or FP16 model ships only where it is faster than FP32 too."""
    fp32 = next(r for r in results if r.name == reference_name)
    fp16 = next((r for r in results if r.precision == "fp16"), None)
    refused = {r.name: gate_reasons(r, fp32, fp16, gate) for r in results}
    passing = [r for r in results if not refused[r.name] and r.throughput_ips > 0]
    if not passing:
        return ShipDecision(
            None, "no variant passes every gate: nothing ships (" + "; ".join(sum(refused.values(), [])) + ")"
        )
    best = max(passing, key=lambda r: r.throughput_ips)
    reason = (
        f"{best.name}: the fastest variant that passes every gate ({best.throughput_ips:,.1f} images/s at batch "
        f"{best.throughput_batch}, {best.delta_map50_95 * 100:+.2f} points vs FP32)"
    )
    slower = [r for r in passing if r is not best and r.throughput_batch == best.throughput_batch]
    if slower:
        reason += "; also passing but slower: " + ", ".join(
            f"{r.name} ({r.throughput_ips / best.throughput_ips:.2f}x)" for r in slower
        )
    failed = [reason for name, reasons in refused.items() for reason in reasons]
    if failed:
        reason += "; refused: " + "; ".join(failed)
    return ShipDecision(best.name, reason)


def results_table(results: list[VariantResult]) -> str:
    """A markdown table (readable in a terminal, in MLflow and in the Prefect UI). Each row names the batch its
    throughput was measured at (ONNX Runtime and TensorRT variants are timed at different batches); "Δ interval"
    is the paired bootstrap interval of the delta (`interval_note` says which)."""
    header = (
        "| variant | precision | backend | mAP50-95 | mAP50 | Δ vs FP32 (points) | Δ interval | latency ms (b1) "
        "| images/s (batch) | size MB |"
    )
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        latency = f"{r.latency_ms_b1:.2f}" if r.latency_ms_b1 < 10 else f"{r.latency_ms_b1:.1f}"
        lines.append(
            f"| {r.name} | {r.precision} | {r.backend} | {r.map50_95:.4f} | {r.map50:.4f} | "
            f"{r.delta_map50_95 * 100:+.2f} | {r.delta_interval.describe() if r.delta_interval else '–'} | {latency} | "
            f"{r.throughput_ips:,.1f} (b{r.throughput_batch}) | "
            f"{r.size_mb:.2f} |"
        )
    return "\n".join(lines)


def interval_note(results: list[VariantResult]) -> str | None:
    """One line that says what the table's "Δ interval" column is, or None when no row has one."""
    interval = next((r.delta_interval for r in results if r.delta_interval), None)
    if interval is None:
        return None
    return (
        f"Δ interval: {interval.level:.0%} paired bootstrap over the {interval.images} report images ({interval.draws} "
        "resamples): where the delta may land on other images like these"
    )


def results_document(
    results: list[VariantResult],
    run_id: str,
    tracking_uri: str,
    gate: GateVerdict,
    ship: ShipDecision | None = None,
    data: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "variants": [r.as_json() for r in results],
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
        "gate_passed": gate.passed,
        "gate_reasons": gate.reasons,
        "ship": ship.as_json() if ship else None,
        "data": data or {},
    }


@dataclass(frozen=True)
class PlotPoint:
    group: str  # one colour (and legend entry) per group
    label: str
    throughput_ips: float
    map50_95: float


def comparison_plot(results: list[VariantResult], path: Path, title: str) -> Path:
    """mAP50-95 against images/s, one labelled point per variant (PNG, written atomically)."""
    points = [PlotPoint("", f"{r.name} ({r.backend})", r.throughput_ips, r.map50_95) for r in results]
    return speed_accuracy_plot(points, path, title, f"images/s (batch {results[0].throughput_batch})")


def speed_accuracy_plot(points: list[PlotPoint], path: Path, title: str, xlabel: str = "images/s") -> Path:
    """Scatter of mAP50-95 against images/s, labelled points, one colour per group (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for group in dict.fromkeys(p.group for p in points):
        mine = [p for p in points if p.group == group]
        axes.scatter([p.throughput_ips for p in mine], [p.map50_95 for p in mine], s=50, label=group or None)
        for p in mine:
            axes.annotate(p.label, (p.throughput_ips, p.map50_95), textcoords="offset points", xytext=(5, 3))
    axes.set_xlabel(xlabel)
    axes.set_ylabel("mAP50-95")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.margins(x=0.15, y=0.1)  # room for the labels
    if any(p.group for p in points):
        axes.legend(fontsize=7)
    return save_figure(figure, path)
