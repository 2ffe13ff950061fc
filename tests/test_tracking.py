"""MLflow records as a user sees them: the experiment tagged as model training, datasets with content digests and
the source on every run (a real sqlite store, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.tracking import (
    DIGEST_LENGTH,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    ImageSet,
    RunTracker,
    mlflow_ui_hint,
    model_training_experiment,
    runs_page,
)
from tests.conftest import PROJECT
from yoloq.config import load_params
from yoloq.errors import InputError


def store(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_the_experiment_is_created_or_tagged_as_model_training(tmp_path):
    client = store(tmp_path)
    created = model_training_experiment(client, "yoloq", tmp_path)
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    older = client.create_experiment("older")  # made by an earlier yoloq: tagged now
    assert model_training_experiment(client, "older", tmp_path) == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    model_training_experiment(client, "chosen", tmp_path)  # a kind someone set is left alone
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_deleted_experiment_is_an_input_error_before_any_run(tmp_path):
    client = store(tmp_path)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(InputError, match=r"is deleted .*\(mlflow experiments restore --experiment-id"):
        model_training_experiment(client, "gone", tmp_path)


def test_runs_carry_datasets_with_content_digests_and_their_source(tmp_path):
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    data["model"]["path"] = str(PROJECT / "data/models/yolov5n.pt")
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    params = load_params(tmp_path / "params.yaml")
    tracker = RunTracker.start(params, tmp_path, "run", {}, source="prefect:nightly")
    validation = ImageSet("validation", params.validation.images, "a" * 64, 64)
    calibration = ImageSet("calibration", params.calibration.images, "b" * 64, 128)
    tracker.log_datasets([validation, calibration])
    child = tracker.start_child("int8", {}, "variant", datasets=("validation", "selection"))  # no selection here
    parent_run, child_run = tracker.client.get_run(tracker.parent_run_id), tracker.client.get_run(child)

    inputs = {d.dataset.name: d for d in parent_run.inputs.dataset_inputs}
    assert set(inputs) == {"validation", "calibration"}
    assert inputs["validation"].dataset.digest == "a" * DIGEST_LENGTH
    assert inputs["validation"].dataset.source == f'{{"uri": "{params.validation.images}"}}'
    profile = json.loads(inputs["validation"].dataset.profile)
    assert profile == {"num_images": 64, "sha256": "a" * 64}
    assert {t.key: t.value for t in inputs["calibration"].tags} == {"mlflow.data.context": "calibration"}
    assert [d.dataset.name for d in child_run.inputs.dataset_inputs] == ["validation"]
    for run in (parent_run, child_run):
        assert run.data.tags["mlflow.source.name"] == "prefect:nightly"
        assert run.data.tags["mlflow.source.type"] == "JOB"
        assert run.data.tags["mlflow.source.git.commit"]


def test_the_ui_link_opens_the_runs_table():
    assert runs_page("http://127.0.0.1:5000/", "3") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    )


def test_the_ui_hint_names_the_experiment_of_the_run(tmp_path):
    client = store(tmp_path)
    run = client.create_run(model_training_experiment(client, "yoloq", tmp_path))
    hint = mlflow_ui_hint(client.tracking_uri, run.info.run_id)
    assert hint.startswith("mlflow ui --backend-store-uri sqlite:///")
    assert hint.endswith(f"#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning")
