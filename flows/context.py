"""What every stage of one run shares: its parameters, its MLflow runs, its cache and its report folder."""

from __future__ import annotations

import time
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


def new_run_folder(output_dir: Path, stem: str, now: time.struct_time | None = None) -> Path:
    """A new folder `output_dir/<stem>-<YYYYmmdd-HHMMSS>` for one run's reports, created here (mkdir fails when it
    exists) so no other run can get it; later runs started in the same second get `...-2`, `...-3`, ..."""
    stamp = time.strftime("%Y%m%d-%H%M%S", now or time.localtime())
    output_dir.mkdir(parents=True, exist_ok=True)
    count = 1
    while True:
        folder = output_dir / (f"{stem}-{stamp}" if count == 1 else f"{stem}-{stamp}-{count}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            count += 1
