"""What every stage of one run shares: its parameters, its MLflow runs, its cache and its report folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.tracking import RunTracker
from yoloq.config import Params
from yoloq.export import ExportResult


@dataclass(frozen=True)
class RunContext:
    params: Params
    tracker: RunTracker
    cache_dir: Path  # content-keyed outputs shared by runs (exports, statistics, Q/DQ models, engines)
    report_dir: Path  # this run's reports
    exported: ExportResult | None = None  # the export made before the MLflow run opened (None: prepare exports)

    @property
    def calibration_dir(self) -> Path:
        return self.cache_dir / "calibration"

    @property
    def build_dir(self) -> Path:
        return self.cache_dir / "build"
