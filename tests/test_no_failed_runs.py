"""A user's mistake fails with exit 2 before the run's MLflow run exists: no FAILED run is left behind.

The mistakes found by params.yaml's validation and the preflight (tests/test_config.py, tests/test_preflight.py)
fail before Prefect starts; these are found in the data (`yoloq.preflight.check_data`, after the export) or in
MLflow, and used to fail inside the run, leaving its MLflow run FAILED."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from flows.cli import main
from tests.conftest import CALIB_IMAGES, MODEL_PT, PROJECT, VAL_IMAGES, VAL_LABELS
from tests.test_preflight import labels_with_class

pytestmark = pytest.mark.slow  # the real export and a temporary Prefect server


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mistakes")
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    data["model"]["path"] = str(MODEL_PT)
    data["calibration"].update(images=str(CALIB_IMAGES), num_images=16)
    data["validation"].update(images=str(VAL_IMAGES), labels=str(VAL_LABELS), num_images=8)
    data["selection"].update(images=str(PROJECT / "data/coco/select/images"))
    data["search"]["calibration_sizes"] = [8, 16]
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    return root


def every_run(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiments = client.search_experiments(view_type=ViewType.ALL)
    ids = [e.experiment_id for e in experiments]
    return client.search_runs(ids, run_view_type=ViewType.ALL) if ids else []


@pytest.mark.parametrize(
    "case, message",
    [
        ("calibration_is_validation", "are also validation images"),
        ("selection_is_validation", "selection images are also validation"),
        ("labels_of_another_model", "class"),
        ("deleted_experiment", "is deleted"),
    ],
)
def test_a_mistake_in_the_data_or_mlflow_exits_2_and_leaves_no_mlflow_run(project, tmp_path, capfd, case, message):
    overrides = {
        "calibration_is_validation": [f"calibration.images={VAL_IMAGES}"],
        "selection_is_validation": [f"selection.images={VAL_IMAGES}"],
        "labels_of_another_model": [f"validation.labels={labels_with_class(tmp_path, 95)}"],
        "deleted_experiment": ["mlflow.experiment=deleted"],
    }[case]
    if case == "deleted_experiment":
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        client.delete_experiment(client.create_experiment("deleted"))
    args = ["run", "-p", str(project / "params.yaml"), *(a for o in overrides for a in ("--set", o))]
    assert main(args) == 2
    assert message in capfd.readouterr().err
    assert every_run(project) == []  # not even a FAILED one
