from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PROJECT, shipped, write_params
from yoloq.backends import get_backend
from yoloq.config import apply_override, flatten, load_params, parse_override
from yoloq.errors import BackendUnavailable, ConfigError


def test_shipped_params_load_and_resolve_paths_against_their_folder():
    params = load_params(PROJECT / "params.yaml")
    assert params.model.path == PROJECT / "data/models/yolov5n.pt"
    assert params.calibration.images == PROJECT / "data/coco/calib/images"
    assert params.reference_variant.name == "fp32"
    assert params.needs_calibration


def test_unknown_key_lists_valid_keys(tmp_path):
    data = shipped()
    data["calibration"]["algoritm"] = "minmax"
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, data))
    message = str(err.value)
    assert "calibration.algoritm: unknown key" in message
    assert "algorithm" in message and "num_images" in message


def test_wrong_choice_lists_valid_choices(tmp_path):
    data = shipped()
    data["calibration"]["algorithm"] = "entropy2"
    with pytest.raises(
        ConfigError, match=r"calibration.algorithm: Input should be 'minmax', 'entropy', 'percentile' or 'mse'"
    ):
        load_params(write_params(tmp_path, data))


def test_wrong_type_is_reported_with_its_key(tmp_path):
    data = shipped()
    data["calibration"]["num_images"] = "many"
    with pytest.raises(ConfigError, match=r"calibration.num_images: Input should be a valid integer"):
        load_params(write_params(tmp_path, data))


def test_set_overrides_any_key_and_is_validated():
    params = load_params(
        PROJECT / "params.yaml", ["calibration.num_images=16", "validation.images=/x/y", "variants.1.name=q8"]
    )
    assert params.calibration.num_images == 16
    assert params.validation.images == Path("/x/y")
    assert params.variants[1].name == "q8"
    with pytest.raises(ConfigError, match="validation.batchsize: unknown key"):
        load_params(PROJECT / "params.yaml", ["validation.batchsize=4"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_params(PROJECT / "params.yaml", ["calibration.num_images"])
    with pytest.raises(ConfigError, match="needs an index"):
        load_params(PROJECT / "params.yaml", ["variants.7.name=x"])


def test_override_parsing():
    assert parse_override("a.b=1.5") == (["a", "b"], 1.5)
    assert parse_override("a.b=null") == (["a", "b"], None)
    data: dict = {"a": {"b": 1}, "l": [{"x": 1}]}
    apply_override(data, ["a", "c"], True)
    apply_override(data, ["l", "0", "x"], 2)
    assert data == {"a": {"b": 1, "c": True}, "l": [{"x": 2}]}


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"name": "q", "precision": "int8"}, "precision int8 needs quantization"),
        ({"name": "q", "precision": "fp32", "quantization": "qdq"}, "needs a quantized precision \\(int8\\)"),
        (
            {"name": "q", "precision": "int8", "quantization": "implicit", "backend": "onnxruntime"},
            "backend 'onnxruntime' builds fp32, int8 \\(qdq\\), not int8 \\(implicit\\): use backend 'tensorrt'",
        ),
        ({"name": "h", "precision": "fp16", "backend": "onnxruntime"}, "not fp16: use backend 'tensorrt'"),
    ],
)
def test_inconsistent_variants_are_rejected(tmp_path, variant, message):
    data = shipped()
    data["variants"].append(variant)
    with pytest.raises(ConfigError, match=message):
        load_params(write_params(tmp_path, data))


def test_variants_need_unique_names_and_an_fp32_reference(tmp_path):
    data = shipped()
    data["variants"].append({"name": "fp32"})
    with pytest.raises(ConfigError, match="repeated: fp32"):
        load_params(write_params(tmp_path, data))
    data = shipped()
    data["variants"] = [data["variants"][1]]
    with pytest.raises(ConfigError, match="need one fp32 variant"):
        load_params(write_params(tmp_path, data))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_tensorrt_variant_without_tensorrt_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="pip install"):
        get_backend("tensorrt")


def test_flatten_for_mlflow():
    flat = flatten(load_params(PROJECT / "params.yaml"))
    assert flat["calibration.algorithm"] == "minmax"
    assert flat["variants.1.quantization"] == "qdq"


# -- backend selection and the tensorrt section ---------------------------------------------------------------


def test_top_level_backend_is_inherited_by_variants_without_one(tmp_path):
    data = shipped()
    data["backend"] = "tensorrt"
    data["variants"][0]["backend"] = "onnxruntime"
    data["variants"].append({"name": "q8", "precision": "int8", "quantization": "implicit", "calibrator": "entropy2"})
    data["variants"].append({"name": "h", "precision": "fp16"})
    params = load_params(write_params(tmp_path, data))
    by_name = {v.name: v for v in params.variants}
    assert by_name["fp32"].backend == "onnxruntime"  # its own backend wins
    assert by_name["int8"].backend == "tensorrt"  # inherited
    assert by_name["q8"].backend == "tensorrt" and by_name["q8"].trt_calibrator == "entropy2"
    assert by_name["h"].backend == "tensorrt"


def test_fp16_and_implicit_are_accepted_on_auto(tmp_path):
    data = shipped()
    data["variants"].append({"name": "h", "precision": "fp16", "backend": "auto"})
    data["variants"].append({"name": "q8", "precision": "int8", "quantization": "implicit", "backend": "auto"})
    params = load_params(write_params(tmp_path, data))
    assert params.variants[3].trt_calibrator == "minmax"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backend": "cuda"}, r"backend: Input should be 'auto', 'onnxruntime' or 'tensorrt'"),
        ({"tensorrt": {"profile": {"min_batch": 8, "opt_batch": 4}}}, "min_batch <= opt_batch <= max_batch"),
        ({"tensorrt": {"builder_optimization_level": 6}}, "builder_optimization_level"),
        ({"tensorrt": {"tactic_sources": ["cudnn"]}}, "not a TacticSource name"),
        ({"tensorrt": {"workspace": 1}}, r"tensorrt.workspace: unknown key; valid keys: profile, workspace_mb"),
        ({"tensorrt": {"profile": {"opt": 1}}}, r"valid keys: min_batch, opt_batch, max_batch"),
    ],
)
def test_bad_tensorrt_settings_are_reported(tmp_path, change, message):
    data = {**shipped(), **change}
    with pytest.raises(ConfigError, match=message):
        load_params(write_params(tmp_path, data))


def test_calibrator_only_with_implicit(tmp_path):
    data = shipped()
    data["variants"][1]["calibrator"] = "entropy2"  # the shipped int8 variant is qdq
    with pytest.raises(ConfigError, match="calibrator 'entropy2' applies to quantization 'implicit' only"):
        load_params(write_params(tmp_path, data))
    data["variants"][1]["calibrator"] = "entropy"
    with pytest.raises(ConfigError, match="'minmax', 'entropy2' or 'legacy'"):
        load_params(write_params(tmp_path, data))


def test_tensorrt_defaults_and_timing_cache_path_resolution(tmp_path):
    data = shipped()
    data["tensorrt"] = {"timing_cache": "caches/timing.cache", "tactic_sources": ["EDGE_MASK_CONVOLUTIONS"]}
    params = load_params(write_params(tmp_path, data))
    assert params.tensorrt.timing_cache == tmp_path / "caches/timing.cache"
    assert params.tensorrt.profile.max_batch == 32 and params.tensorrt.fp16_fallback
    assert params.tensorrt.timing.iterations >= 200
    assert (
        load_params(
            PROJECT / "params.yaml", ["tensorrt.builder_optimization_level=0"]
        ).tensorrt.builder_optimization_level
        == 0
    )


def test_search_steps_and_sizes_are_checked_with_their_keys():
    with pytest.raises(ConfigError, match=r"search.float_steps: Value error, must be increasing and >= 0"):
        load_params(PROJECT / "params.yaml", ["search.float_steps=[4, 2]"])
    with pytest.raises(ConfigError, match=r"search.calibration_sizes: Value error, every size must be >= 1"):
        load_params(PROJECT / "params.yaml", ["search.calibration_sizes=[64, 0]"])


# -- names that become folders of the run's report -----------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a..b", "..int8", "int8..", "../x", "a/b", "a b"])
def test_variant_and_target_names_that_could_leave_the_run_folder_are_refused(tmp_path, name):
    data = shipped()
    data["variants"][1]["name"] = name
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, data))
    assert "variants.1.name" in str(err.value) and "letters, digits" in str(err.value)
    data = shipped()
    data["targets"] = [{"name": name, "work_pool": "gpu"}]
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, data))
    assert "targets.0.name" in str(err.value) and "letters, digits" in str(err.value)


@pytest.mark.parametrize("name", ["int8", "int8-qdq", "fp16.v2", "a_b.c-d", "8"])
def test_ordinary_names_with_single_dots_are_accepted(tmp_path, name):
    data = shipped()
    data["variants"][1]["name"] = name
    data["targets"] = [{"name": name, "work_pool": "gpu"}]
    params = load_params(write_params(tmp_path, data))
    assert params.variants[1].name == name and params.targets[0].name == name


# -- code defaults are the shipped params.yaml's --------------------------------------------------------------

PATH_KEYS = (
    "model.path",
    "calibration.images",
    "validation.images",
    "validation.labels",
    "selection.images",
    "selection.labels",
    "output_dir",
)


def test_a_params_file_with_only_the_model_means_the_shipped_params(tmp_path):
    """Every default in yoloq/config.py equals params.yaml's value (README documents those): a key left out of a
    params file means what the shipped file says. Paths are compared relative to each file's folder."""
    minimal = write_params(tmp_path, {"model": {"path": shipped()["model"]["path"]}})
    defaults, reference = flatten(load_params(minimal)), flatten(load_params(PROJECT / "params.yaml"))
    for key in PATH_KEYS:
        defaults[key] = str(Path(defaults[key]).relative_to(tmp_path.resolve()))
        reference[key] = str(Path(reference[key]).relative_to(PROJECT))
    assert set(defaults) == set(reference)
    differing = {key: (defaults[key], reference[key]) for key in reference if defaults[key] != reference[key]}
    assert differing == {}, "code default vs params.yaml"


def test_what_a_backend_builds_comes_from_the_registry():
    from yoloq.backend_registry import BACKENDS, backends_that_build

    assert backends_that_build("fp16", "none") == ["tensorrt"]
    assert backends_that_build("int8", "qdq") == ["onnxruntime", "tensorrt"]
    assert all(spec.backend_class.count(":") == 1 for spec in BACKENDS.values())
    assert BACKENDS["tensorrt"].isolated_builds and not BACKENDS["onnxruntime"].isolated_builds


def test_build_targets_search_on_each_target_so_they_need_the_selection_set(tmp_path):
    data = shipped()
    data["targets"] = [{"name": "h200", "work_pool": "gpu-h200", "backend": "tensorrt"}]
    params = load_params(write_params(tmp_path, data))
    assert params.needs_selection and params.targets[0].backend == "tensorrt"
    data["search"]["enabled"] = False
    assert not load_params(write_params(tmp_path, data)).needs_selection


def test_schedule_in_params(tmp_path):
    data = shipped()
    assert load_params(write_params(tmp_path, data)).schedule.cron is None
    data["schedule"] = {"cron": "0 3 * * *", "timezone": "Europe/Berlin", "checkpoint_dedupe_hours": 2}
    schedule = load_params(write_params(tmp_path, data)).schedule
    assert (schedule.cron, schedule.timezone, schedule.checkpoint_dedupe_hours) == ("0 3 * * *", "Europe/Berlin", 2)
    data["schedule"] = {"cron": "every night"}
    with pytest.raises(ConfigError, match="schedule.cron.*not a cron expression"):
        load_params(write_params(tmp_path, data))


def test_map_selection_needs_labels():
    with pytest.raises(ConfigError, match="metric map scores candidates against labels"):
        load_params(PROJECT / "params.yaml", ["selection.metric=map", "selection.labels=null"])
    assert load_params(PROJECT / "params.yaml", ["selection.metric=agreement", "selection.labels=null"])
