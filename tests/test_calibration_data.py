from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import CALIB_IMAGES, VAL_IMAGES
from yoloq.calibrate import check_overlap
from yoloq.calibration_data import CalibrationDataLoader, select_calibration_images
from yoloq.errors import InputError
from yoloq.preprocess import letterbox, list_images, read_image


def copy_images(source, target, count):
    target.mkdir(parents=True, exist_ok=True)
    for path in list_images(source)[:count]:
        shutil.copyfile(path, target / path.name)
    return target


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    folder = copy_images(CALIB_IMAGES, tmp_path / "calib", 10)
    (folder / "000000000000.jpg").write_bytes(b"truncated")
    (folder / "000000000001.png").write_bytes(b"")
    selected = select_calibration_images(folder, num_images=100, min_images=4)
    assert len(selected.images) == 10
    assert [p.name for p in selected.skipped] == ["000000000000.jpg", "000000000001.png"]
    assert len(selected.image_hashes) == 10


def test_too_few_readable_images_fail_with_the_counts(tmp_path):
    folder = copy_images(CALIB_IMAGES, tmp_path / "calib", 3)
    (folder / "bad.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match=r"only 3 readable images \(1 unreadable skipped\), need at least 8"):
        select_calibration_images(folder, num_images=128, min_images=8)


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        select_calibration_images(tmp_path / "empty", 8, 1)
    with pytest.raises(InputError, match="not found"):
        select_calibration_images(tmp_path / "missing", 8, 1)


def test_loader_yields_batches_with_the_validation_preprocessing():
    images = list_images(CALIB_IMAGES)[:5]
    loader = CalibrationDataLoader(images, "images", 640, batch_size=2)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [b["images"].shape for b in batches] == [(2, 3, 640, 640), (2, 3, 640, 640), (1, 3, 640, 640)]
    expected, _ = letterbox(read_image(images[0]), 640)
    assert np.array_equal(batches[0]["images"][0], expected)  # same function as validation
    assert len(list(loader)) == 3  # re-iterable


def test_validation_overlap_warns_then_refuses(tmp_path):
    folder = copy_images(CALIB_IMAGES, tmp_path / "calib", 20)
    for path in list_images(VAL_IMAGES)[:1]:
        shutil.copyfile(path, folder / f"copy-{path.name}")  # renamed copy: detected by content
    selected = select_calibration_images(folder, 100, 1)
    validation = list_images(VAL_IMAGES)
    assert check_overlap(selected, validation, max_share=0.05) == 1  # 1 of 21 is under 5 %: warn only
    for path in list_images(VAL_IMAGES)[1:4]:
        shutil.copyfile(path, folder / path.name)
    selected = select_calibration_images(folder, 100, 1)
    with pytest.raises(InputError, match=r"4 of 24 calibration images \(17%\) are also validation images"):
        check_overlap(selected, validation, max_share=0.05)
