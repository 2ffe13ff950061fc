"""What a quantize run ends with: every variant's result, the gate, the ship decision, and where it was logged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoloq.report import GateVerdict, ShipDecision, VariantResult, results_document


@dataclass(frozen=True)
class FlowOutcome:
    results: list[VariantResult]
    gate: GateVerdict
    run_id: str
    tracking_uri: str
    report_dir: Path
    ship: ShipDecision | None = None
    data: dict[str, str] = field(default_factory=dict)  # which images did what: selection, report, calibration

    def document(self) -> dict[str, Any]:
        return results_document(self.results, self.run_id, self.tracking_uri, self.gate, self.ship, self.data)
