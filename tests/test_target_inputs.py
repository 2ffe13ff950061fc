"""The target-inputs folder: what the parent stages for build targets, and what a worker makes of a copy of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.prepare import PreparedModels
from flows.target_inputs import (
    INPUTS_FILE,
    TargetInputs,
    _check_download,
    prepared_from_inputs,
    shipped_calibration,
    stage_target_inputs,
    target_params,
)
from tests.conftest import CALIB_IMAGES, MODEL_PT, PROJECT, VAL_IMAGES, VAL_LABELS
from yoloq.artifacts import file_sha256, read_json
from yoloq.calibrate import calibration_statistics
from yoloq.config import TargetConfig, load_params
from yoloq.export import ExportResult, facts_for_onnx
from yoloq.selection import load_selection_set
from yoloq.validate import load_validation_set, validation_set_sha256


@pytest.fixture(scope="module")
def staged(simplified, exported, tmp_path_factory):
    root = tmp_path_factory.mktemp("parent")
    overrides = [
        f"model.path={MODEL_PT}",
        f"calibration.images={CALIB_IMAGES}",
        f"validation.images={VAL_IMAGES}",
        f"validation.labels={VAL_LABELS}",
        "validation.num_images=4",
        f"selection.images={PROJECT / 'data/coco/select/images'}",
        "selection.num_images=3",
        "search.sensitivity_images=2",
        f"output_dir={root / 'runs'}",
    ]
    params = load_params(PROJECT / "params.yaml", overrides)
    fp32 = simplified.onnx_path
    facts = facts_for_onnx(fp32, 640)
    dataset = load_validation_set(params.validation, len(facts.names))
    images = [t.path for t in dataset.truths]
    selection = load_selection_set(params.selection, len(facts.names), images, [])
    prepared = PreparedModels(
        ExportResult(fp32, facts, exported.input_name, exported.output_name, True), dataset, fp32, None, selection
    )
    stats = calibration_statistics(fp32, exported.input_name, 640, params.calibration, images, root / "cal", 8)
    folder = stage_target_inputs(params, prepared, [stats], 128, root / "target-inputs")
    return params, prepared, stats, folder


def test_the_inputs_hold_exactly_what_a_target_reads_with_hashes(staged):
    params, _, stats, folder = staged
    document = read_json(folder / INPUTS_FILE)
    files = document["files"]
    assert sorted(p for p in files if p.startswith("data/validation/0/images/")) == [
        f"data/validation/0/images/{p.name}" for p in sorted(VAL_IMAGES.iterdir())[:4]
    ]
    assert len([p for p in files if p.startswith("data/selection/images/")]) == 3
    assert len([p for p in files if p.startswith("data/calibration/images/")]) == 2  # the sensitivity ranking's
    assert f"statistics/{stats.path.name}" in files and document["statistics"][0]["num_images"] == 8
    assert all(file_sha256(folder / name) == sha for name, sha in files.items())
    assert _check_download(folder) == ""


def test_a_worker_runs_from_its_copy_with_its_own_paths_and_the_upstream_statistics(staged, tmp_path):
    params, prepared, stats, folder = staged
    copy = tmp_path / "worker" / "target-inputs"
    shutil.copytree(folder, copy)  # what the download gives
    inputs = TargetInputs(copy, read_json(copy / INPUTS_FILE))
    target = TargetConfig(name="h100", work_pool="gpu", backend="onnxruntime")
    local = target_params(params, target, inputs, tmp_path / "worker")
    for path in (local.validation.images, local.validation.labels, local.selection.images, local.calibration.images):
        assert Path(path).is_relative_to(copy)
    assert local.output_dir == tmp_path / "worker" and all(v.backend == "onnxruntime" for v in local.variants)
    assert validation_set_sha256(local.validation) == validation_set_sha256(params.validation)  # the same images

    worker = prepared_from_inputs(local, inputs)
    assert [t.image_id for t in worker.dataset.truths] == [t.image_id for t in prepared.dataset.truths]
    assert worker.selection is not None and worker.selection.images_sha256 == prepared.selection.images_sha256
    shipped = shipped_calibration(local, inputs)
    got = shipped.statistics(8)
    assert (got.key, got.images.image_hashes, got.fp32_sha256) == (
        stats.key,
        stats.images.image_hashes,
        stats.fp32_sha256,
    )
    assert got.path.is_relative_to(copy) and shipped.available_images == 128
    with pytest.raises(Exception, match="statistics of \\[8\\] images, not 16"):
        shipped.statistics(16)

    (copy / next(iter(inputs.document["files"]))).write_bytes(b"changed")
    assert "files differ" in _check_download(copy)
