"""The deployment's flat parameter form: params.yaml's values, enums and ranges in its schema; a changed field
overrides only its key."""

from __future__ import annotations

import importlib.util
import json
from datetime import timedelta
from pathlib import Path

import pytest
from prefect.exceptions import ParameterTypeError

from flows.deploy import checkpoint_trigger, declared_schedule, flat_overrides, quantize_deployment, run_key
from flows.form import changed_fields, form_values, parameter_schema
from flows.tracking import code_versions
from tests.conftest import PROJECT, shipped, write_params
from yoloq.config import load_params


def form(params_path: Path = PROJECT / "params.yaml") -> dict:
    return parameter_schema(load_params(params_path), params_path)


def test_the_form_shows_params_yaml_values_typed_with_dropdowns_ranges_and_descriptions():
    properties = form()["properties"]
    assert properties["calibration_algorithm"]["enum"] == ["minmax", "entropy", "percentile", "mse"]
    assert properties["calibration_algorithm"]["default"] == "minmax"
    assert properties["backend"]["enum"] == ["auto", "onnxruntime", "tensorrt"]
    images = properties["calibration_images"]
    assert (images["minimum"], images["maximum"], images["type"], images["default"]) == (1, 100_000, "integer", 128)
    drop = properties["max_map_drop"]
    assert (drop["minimum"], drop["maximum"], drop["default"]) == (0.0, 1.0, 0.005)
    assert properties["search_enabled"] == {**properties["search_enabled"], "type": "boolean", "default": True}
    assert properties["validation_images"]["default"] == 0 and properties["validation_images"]["minimum"] == 0
    assert properties["model_path"]["default"] == str(PROJECT / "data/models/yolov5n.pt")
    for name, prop in properties.items():  # no `X | None` toggles, a description each, in the flow's order
        assert "anyOf" not in prop and prop["type"] != "null" and prop["description"], name
        assert not isinstance(prop.get("default"), dict), name  # flat: no nested sections
    assert list(properties) == list(parameter_schema_of_flow()["properties"])
    assert properties["max_map_drop"]["description"].startswith("gate.max_map_drop: largest mAP50-95 drop")


def parameter_schema_of_flow() -> dict:
    from prefect.utilities.callables import parameter_schema as signature_schema

    return signature_schema(quantize_deployment).model_dump()


def test_the_form_follows_params_yaml(tmp_path):
    data = shipped()
    data["gate"]["max_map_drop"] = 0.02
    data["validation"]["num_images"] = 16
    properties = form(write_params(tmp_path, data))["properties"]
    assert properties["max_map_drop"]["default"] == 0.02 and properties["validation_images"]["default"] == 16


def test_a_field_left_as_shown_keeps_params_yaml_and_a_changed_one_overrides_only_its_key():
    shown = form_values(load_params(PROJECT / "params.yaml"))
    submitted = {**shown, "max_map_drop": 0.05}  # what the UI form sends: every field, one changed
    assert flat_overrides(**changed_fields(submitted, shown)) == ["gate.max_map_drop=0.05"]
    assert flat_overrides(**changed_fields({"calibration_images": 64}, {})) == ["calibration.num_images=64"]
    assert flat_overrides(validation_images=0) == ["validation.num_images=null"]  # 0 = all images


def test_one_field_overrides_one_key_and_keeps_the_rest():
    shipped = load_params(PROJECT / "params.yaml")
    overrides = flat_overrides(calibration_images=64)
    assert overrides == ["calibration.num_images=64"]
    changed = load_params(PROJECT / "params.yaml", overrides)
    assert changed.calibration.num_images == 64
    assert changed.calibration.algorithm == shipped.calibration.algorithm
    assert changed.gate == shipped.gate and changed.validation == shipped.validation
    assert flat_overrides(calibration_algorithm="entropy", extra=["validation.batch_size=4"]) == [
        "calibration.algorithm=entropy",
        "validation.batch_size=4",
    ]


VERSIONS = {"yoloq": "0.1.0", "yoloq.git_commit": "f7f7b3e", "tensorrt": "10.3.0"}


def test_run_key_follows_content_and_settings_not_the_path(tmp_path):
    copy = tmp_path / "renamed.pt"
    copy.write_bytes((PROJECT / "data/models/yolov5n.pt").read_bytes())
    base = run_key(load_params(PROJECT / "params.yaml"), VERSIONS)
    assert run_key(load_params(PROJECT / "params.yaml", [f"model.path={copy}"]), VERSIONS) == base
    assert run_key(load_params(PROJECT / "params.yaml", ["calibration.num_images=64"]), VERSIONS) != base


@pytest.mark.parametrize(
    "upgrade", [{"yoloq": "0.2.0"}, {"yoloq.git_commit": "0123abc"}, {"tensorrt": "10.4.0"}, {"tensorrt": "none"}]
)
def test_run_key_changes_with_the_code_and_tensorrt_versions(upgrade):
    # a run after upgrading yoloq or TensorRT must not be skipped as done
    params = load_params(PROJECT / "params.yaml")
    assert run_key(params, {**VERSIONS, **upgrade}) != run_key(params, VERSIONS)


def test_code_versions_name_this_checkout_and_the_installed_tensorrt():
    import subprocess

    import yoloq

    versions = code_versions()
    assert set(versions) == {"yoloq", "yoloq.git_commit", "tensorrt"}
    assert versions["yoloq"] == yoloq.__version__
    checkout = Path(yoloq.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, check=True)
    assert versions["yoloq.git_commit"] == head.stdout.strip()
    if importlib.util.find_spec("tensorrt") is None:
        assert versions["tensorrt"] == "none"


def test_checkpoint_trigger_templates_the_path_from_the_event():
    trigger = checkpoint_trigger()
    assert trigger.expect == {"yoloq.checkpoint.created"}
    assert trigger.parameters == {"model_path": "{{ event.payload.path }}", "skip_if_done": True}


def test_the_trigger_starts_one_run_per_checkpoint_content_within_its_window():
    trigger = checkpoint_trigger(dedupe_hours=2)
    assert trigger.for_each == {"prefect.resource.id"}  # yoloq.checkpoint.<sha256>: one bucket per content
    assert (trigger.posture, trigger.threshold, trigger.within) == ("Reactive", 1, timedelta(hours=2))


def test_the_schedule_comes_from_params_unless_cron_is_given(tmp_path):
    data = shipped()
    data["schedule"] = {"cron": "0 3 * * *", "timezone": "Europe/Berlin", "checkpoint_dedupe_hours": 6}
    path = write_params(tmp_path, data)
    assert declared_schedule(path, None) == ("0 3 * * *", "Europe/Berlin", 6)
    assert declared_schedule(path, "*/5 * * * *")[0] == "*/5 * * * *"
    assert declared_schedule(PROJECT / "params.yaml", None)[0] is None


def test_out_of_range_and_unknown_choices_are_rejected_by_the_form_schema():
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    schema = form()
    validate({"max_map_drop": 0.05}, schema, raise_on_error=True, ignore_required=True)  # what the server checks
    for bad in ({"calibration_images": 0}, {"max_map_drop": 2.0}, {"calibration_algorithm": "kl"}):
        with pytest.raises(ValidationError):
            validate(bad, schema, raise_on_error=True, ignore_required=True)
    with pytest.raises(ParameterTypeError, match="calibration_algorithm"):  # the flow's own signature, too
        quantize_deployment.validate_parameters({"calibration_algorithm": "kl"})


def test_targets_in_params():
    from yoloq.errors import ConfigError

    params = load_params(PROJECT / "params.yaml", ["targets=[{name: h100, work_pool: gpu-h100}]"])
    assert params.targets[0].work_pool == "gpu-h100" and params.targets[0].timeout_s == 7200
    assert load_params(PROJECT / "params.yaml").targets == []
    with pytest.raises(ConfigError, match="target names must be unique; repeated: a"):
        load_params(PROJECT / "params.yaml", ["targets=[{name: a, work_pool: p}, {name: a, work_pool: q}]"])
    with pytest.raises(ConfigError, match="targets.0.pool: unknown key"):
        load_params(PROJECT / "params.yaml", ["targets=[{name: a, pool: p}]"])


def test_search_and_fp16_gate_fields_become_overrides():
    overrides = flat_overrides(search_enabled=False, max_map_drop_vs_fp16=0.002, min_speedup_vs_fp16=1.2)
    assert overrides == ["gate.max_map_drop_vs_fp16=0.002", "gate.min_speedup_vs_fp16=1.2", "search.enabled=false"]
    params = load_params(PROJECT / "params.yaml", overrides)
    assert not params.search.enabled and params.gate.min_speedup_vs_fp16 == 1.2


def test_a_run_may_only_pick_a_model_inside_the_watched_folder(tmp_path):
    from flows.deploy import confined_overrides
    from yoloq.errors import InputError

    params = PROJECT / "params.yaml"
    watched = tmp_path / "watched"
    watched.mkdir()
    inside = watched / "retrained.pt"
    outside = tmp_path / "elsewhere.pt"
    for path in (inside, outside):
        path.write_bytes(b"weights")
    (watched / "link.pt").symlink_to(outside)
    overrides = flat_overrides(model_path=str(watched / "sub" / ".." / "retrained.pt"))
    assert confined_overrides(params, overrides, watched) == [*overrides, f"model.path={inside.resolve()}"]
    for sneaky in (outside, watched / ".." / "elsewhere.pt", watched / "link.pt"):
        with pytest.raises(InputError, match="is outside the watched folder"):
            confined_overrides(params, flat_overrides(model_path=str(sneaky)), watched)
    with pytest.raises(InputError, match="is outside the watched folder"):  # the same through extra_overrides
        confined_overrides(params, flat_overrides(extra=[f"model.path={outside}"]), watched)
    assert confined_overrides(params, ["calibration.num_images=64"], None) == ["calibration.num_images=64"]
    with pytest.raises(InputError, match="--watch-root FOLDER"):  # no watched folder: params.yaml's model only
        confined_overrides(params, flat_overrides(model_path=str(inside)), None)
    with pytest.raises(InputError, match="this deployment runs with"):
        confined_overrides(tmp_path / "mine.yaml", [], watched, deployment_params=params)


def test_a_triggered_run_outside_the_watched_folder_fails_before_mlflow(tmp_path, monkeypatch):
    from flows.deploy import PARAMS_ENV, WATCH_ROOT_ENV
    from tests.conftest import shipped, write_params
    from yoloq.errors import InputError

    params = write_params(tmp_path, shipped())  # its MLflow store would be tmp_path/mlflow.db
    watched = tmp_path / "watched"
    watched.mkdir()
    monkeypatch.setenv(WATCH_ROOT_ENV, str(watched))
    monkeypatch.setenv(PARAMS_ENV, str(params))
    with pytest.raises(InputError, match="is outside the watched folder"):
        quantize_deployment(params_path=str(params), model_path=str(PROJECT / "data/models/yolov5n.pt"))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_serving_with_the_trigger_needs_a_watched_folder(tmp_path, monkeypatch, capsys):
    import flows.deploy

    monkeypatch.setattr(flows.deploy, "prefect_api_url", lambda: "http://127.0.0.1:4200/api")
    params = str(PROJECT / "params.yaml")
    assert flows.deploy.main(["serve", "-p", params]) == 2
    assert "needs --watch-root FOLDER" in capsys.readouterr().err
    assert flows.deploy.main(["serve", "-p", params, "--watch-root", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    env = flows.deploy.deployment_env(PROJECT / "params.yaml", tmp_path)
    assert env["YOLOQ_PARAMS"] == str(PROJECT / "params.yaml") and env["YOLOQ_WATCH_ROOT"] == str(tmp_path.resolve())
    assert json.loads(env["YOLOQ_FORM_VALUES"]) == form_values(load_params(PROJECT / "params.yaml"))
    (tmp_path / "bad.yaml").write_text("calibration: {num_images: many}\n")
    assert flows.deploy.main(["serve", "-p", str(tmp_path / "bad.yaml"), "--no-trigger"]) == 2
    assert "calibration.num_images" in capsys.readouterr().err


def test_run_key_changes_when_the_images_or_labels_change_under_the_same_paths(tmp_path):
    import shutil

    from tests.conftest import VAL_IMAGES, VAL_LABELS

    (tmp_path / "images").mkdir()
    labels = tmp_path / "labels"
    shutil.copytree(VAL_LABELS, labels)
    for image in sorted(VAL_IMAGES.iterdir())[:4]:
        shutil.copyfile(image, tmp_path / "images" / image.name)
    sets = [f"validation.images={tmp_path / 'images'}", f"validation.labels={labels}", "validation.num_images=4"]
    base = run_key(load_params(PROJECT / "params.yaml", sets), VERSIONS)
    first = sorted(labels.iterdir())[0]
    first.write_text(first.read_text() + "0 0.5 0.5 0.1 0.1\n")
    assert run_key(load_params(PROJECT / "params.yaml", sets), VERSIONS) != base
