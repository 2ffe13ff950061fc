"""The deployment's flat parameter form: enums and ranges in its schema; a set field overrides only its key."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema

from flows.deploy import checkpoint_trigger, flat_overrides, quantize_deployment, run_key
from flows.tracking import code_versions
from tests.conftest import PROJECT
from yoloq.config import load_params


def test_schema_has_dropdowns_and_ranges():
    properties = parameter_schema(quantize_deployment).model_dump()["properties"]
    algorithm = properties["calibration_algorithm"]["anyOf"][0]
    assert algorithm["enum"] == ["minmax", "entropy", "percentile", "mse"]
    assert properties["backend"]["anyOf"][0]["enum"] == ["auto", "onnxruntime", "tensorrt"]
    images = properties["calibration_images"]["anyOf"][0]
    assert (images["minimum"], images["maximum"], images["type"]) == (8, 4096, "integer")
    drop = properties["max_map_drop"]["anyOf"][0]
    assert (drop["minimum"], drop["maximum"]) == (0.0, 1.0)
    assert properties["search_enabled"]["anyOf"][0]["type"] == "boolean"
    speedup = properties["min_speedup_vs_fp16"]["anyOf"][0]
    assert (speedup["minimum"], speedup["maximum"]) == (0.0, 100.0)
    assert all(not isinstance(p.get("default"), dict) for p in properties.values())  # flat: no nested sections


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


def test_out_of_range_and_unknown_choices_are_rejected():
    assert quantize_deployment.validate_parameters({"max_map_drop": 0.05})["max_map_drop"] == 0.05
    with pytest.raises(ParameterTypeError, match="greater than or equal to 8"):
        quantize_deployment.validate_parameters({"calibration_images": 2})
    with pytest.raises(ParameterTypeError, match="calibration_algorithm"):
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
