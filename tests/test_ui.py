"""The Prefect custom-run form and the MLflow experiment page in a real browser (the system chromium, headless):
benchmarks/ui_screenshots.py, which also writes the screenshots that the README shows (docs/)."""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks.ui_screenshots import chromium_path, run_checks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        chromium_path() is None, reason="needs Debian's chromium for the browser check: apt-get install -y chromium"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="needs the playwright package (pip install -e '.[dev]')"
    ),
]


def test_the_form_shows_params_yaml_and_mlflow_opens_on_the_runs_with_datasets_and_source(tmp_path):
    seen = run_checks(tmp_path, tmp_path / "shots")
    fields = seen["form"]["fields"]
    assert (fields["calibration_images"], fields["validation_images"], fields["max_map_drop"]) == ("16", "8", "0.015")
    assert seen["form"]["backend_options"] == ["auto", "onnxruntime", "tensorrt"]
    assert seen["mlflow_params"] == {  # one field changed in the form; the others as in params.yaml
        "gate.max_map_drop": "0.05",
        "calibration.num_images": "16",
        "validation.num_images": "8",
    }
    assert "/runs" in seen["mlflow_ui"]["remembered_landing"]
    assert {p.name for p in (tmp_path / "shots").iterdir()} == {"prefect-custom-run.png", "mlflow-runs.png"}
