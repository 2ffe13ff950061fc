"""`yoloq run` with an unusable model file or image folder: exit 2 with what the file is, before Prefect or MLflow."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tests.conftest import CALIB_IMAGES, MODEL_PT, PROJECT, VAL_IMAGES, VAL_LABELS
from tests.test_checkpoint_sniff import instance_of, malicious_checkpoint, zipped_pickle
from yoloq.config import load_params
from yoloq.errors import InputError
from yoloq.preflight import check_data, check_inputs, count_images


def run_cli(tmp_path: Path, *overrides: str) -> int:
    """`yoloq run` on the shipped params.yaml, with this test's MLflow store and output folder."""
    sets = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"output_dir={tmp_path}/runs", *overrides]
    return main(["run", "-p", str(PROJECT / "params.yaml"), *[a for s in sets for a in ("--set", s)]])


def seg_checkpoint(path: Path) -> Path:
    pytest.importorskip("ultralytics")
    import torch
    from ultralytics import YOLO

    torch.save({"model": YOLO("yolov8n-seg.yaml").model, "train_args": {}}, path)
    return path


def non_yolo_checkpoint(path: Path) -> Path:
    import torch

    torch.save({"w": torch.zeros(3)}, path)
    return path


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


BAD_MODELS = {
    "folder": (lambda d: d, "is a folder; pass a .pt/.yaml/.onnx file"),
    "truncated": (
        lambda d: write(d / "yolov5n.pt", MODEL_PT.read_bytes()[: MODEL_PT.stat().st_size // 2]),
        "is a corrupt or truncated checkpoint",
    ),
    "lfs-pointer": (
        lambda d: write(d / "yolov5n.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:4f1\nsize 3.9e6\n"),
        "is a Git LFS pointer",
    ),
    "not-yolo": (lambda d: non_yolo_checkpoint(d / "weights.pt"), "is a PyTorch file holding no YOLO model"),
    "segmentation": (lambda d: seg_checkpoint(d / "yolov8n-seg.pt"), "is an Ultralytics segmentation checkpoint"),
    "pose": (
        lambda d: zipped_pickle(d / "pose.pt", instance_of("ultralytics.nn.tasks", "PoseModel")),
        "is an Ultralytics pose checkpoint",
    ),
    "bad-onnx": (lambda d: write(d / "model.onnx", b"\x08\x07garbage" * 100), "ONNX"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_an_unusable_model_file_exits_2_before_any_run(tmp_path, capfd, case):
    build, expected = BAD_MODELS[case]
    folder = tmp_path / "models"
    folder.mkdir()
    model = build(folder)
    started = time.monotonic()
    assert run_cli(tmp_path, f"model.path={model}") == 2
    seconds = time.monotonic() - started
    out, err = capfd.readouterr()
    assert f"model.path: {model}" in err and expected in err, err
    assert "yoloq takes a detection model" in err or case in ("folder", "truncated", "lfs-pointer", "bad-onnx")
    assert "Traceback" not in out + err and "temporary server" not in out + err  # Prefect never started
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert seconds < 20, f"preflight took {seconds:.1f} s"


def test_a_malicious_checkpoint_is_never_unpickled(tmp_path, capfd):
    marker = tmp_path / "PWNED"
    model = malicious_checkpoint(tmp_path / "yolov5n.pt", marker)
    assert run_cli(tmp_path, f"model.path={model}") == 2
    err = capfd.readouterr().err
    assert "the checkpoint imports posix.system, which no model needs; yoloq does not unpickle it" in err
    assert not marker.exists() and not (tmp_path / "mlflow.db").exists()


def test_image_folders_are_counted_before_any_run(tmp_path, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    few = tmp_path / "few"
    few.mkdir()
    for image in sorted(CALIB_IMAGES.iterdir())[:3]:
        shutil.copy(image, few)
    (few / "broken.jpg").write_bytes(b"not a jpeg")
    assert run_cli(tmp_path, f"calibration.images={empty}", f"validation.images={few}") == 2
    err = capfd.readouterr().err
    assert f"calibration.images: folder {empty} holds no readable images" in err
    assert "validation.images" not in err  # 3 readable images are enough to validate
    assert run_cli(tmp_path, f"calibration.images={few}") == 2
    err = capfd.readouterr().err
    assert (
        f"calibration.images: folder {few} holds only 3 readable images; 1 files are not images, e.g. broken.jpg" in err
    )
    assert "fewer than calibration.min_images=8" in err and "Traceback" not in err
    # an FP32-only run needs no calibration images
    assert (
        run_cli(
            tmp_path,
            f"calibration.images={empty}",
            "variants=[{name: fp32, precision: fp32}]",
            f"validation.images={empty}",
        )
        == 2
    )
    err = capfd.readouterr().err
    assert "calibration.images" not in err and f"validation.images: folder {empty} holds no readable images" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_counting_images_is_cheap():
    started = time.monotonic()
    readable, unreadable = count_images(CALIB_IMAGES)
    assert (readable, unreadable) == (128, []) and time.monotonic() - started < 2.0
    started = time.monotonic()
    check_inputs(load_params(PROJECT / "params.yaml"))  # the shipped inputs pass, model sniff included
    assert time.monotonic() - started < 2.0


def test_missing_selection_labels_are_named_before_any_run(tmp_path, capfd):
    missing = tmp_path / "no-labels.json"
    assert run_cli(tmp_path, "selection.metric=map", f"selection.labels={missing}") == 2
    err = capfd.readouterr().err
    assert f"selection.labels: {missing} not found" in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()


def mistaken_params(tmp_path: Path, *overrides: str):
    data = {
        "model": {"path": str(MODEL_PT)},
        "calibration": {"images": str(CALIB_IMAGES), "num_images": 16},
        "validation": {"images": str(VAL_IMAGES), "labels": str(VAL_LABELS)},
        "selection": {"images": str(PROJECT / "data/coco/select/images")},
        "search": {"calibration_sizes": [8, 16]},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_params(path, list(overrides))


def labels_with_class(tmp_path: Path, class_id: int) -> Path:
    labels = tmp_path / "labels"
    shutil.copytree(VAL_LABELS, labels)
    first = sorted(labels.glob("*.txt"))[0]
    first.write_text(f"{class_id} 0.5 0.5 0.1 0.1\n")
    return labels


def test_the_data_checks_pass_on_the_shipped_data(tmp_path):
    check_data(mistaken_params(tmp_path), num_classes=80)


@pytest.mark.parametrize(
    "case, message",
    [
        ("calibration_is_validation", "calibration images .* are also validation images"),
        ("selection_is_validation", "selection images are also validation"),
        ("selection_is_calibration", "selection images are also calibration"),
        ("labels_of_another_model", "class"),
    ],
)
def test_data_mistakes_are_found_before_the_run(tmp_path, case, message):
    """Each of these used to fail inside the run, after its MLflow run was created (and left FAILED)."""
    overrides = {
        "calibration_is_validation": [f"calibration.images={VAL_IMAGES}"],
        "selection_is_validation": [f"selection.images={VAL_IMAGES}"],
        "selection_is_calibration": [f"selection.images={CALIB_IMAGES}"],
        "labels_of_another_model": [f"validation.labels={labels_with_class(tmp_path, 95)}"],
    }[case]
    with pytest.raises(InputError, match=message):
        check_data(mistaken_params(tmp_path, *overrides), num_classes=80)


def test_a_search_size_that_calibrates_on_validation_images_is_found(tmp_path):
    """The search's smaller calibration sets are checked too: 4 of the first 8 images are validation images."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for index, image in enumerate(sorted(VAL_IMAGES.iterdir())[:4] + sorted(CALIB_IMAGES.iterdir())[:28]):
        shutil.copy(image, calib / f"{index:03d}{image.suffix}")
    params = mistaken_params(tmp_path, f"calibration.images={calib}", "calibration.max_validation_overlap=0.2")
    with pytest.raises(InputError, match="4 of 8 calibration images"):
        check_data(params, num_classes=80)
    check_data(mistaken_params(tmp_path, f"calibration.images={calib}", "search.enabled=false",
                               "calibration.num_images=32", "calibration.max_validation_overlap=0.2"), 80)  # fmt: skip
