"""Label tables, YOLO label parsing and ground-truth loading, on the real COCO files in data/coco."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from yoloq.errors import InputError
from yoloq.labels import (
    COCO80_NAMES,
    COCO80_TO_COCO91,
    NON_NUMERIC_ID_BASE,
    image_id_for,
    load_ground_truth,
    read_yolo_label_file,
)
from yoloq.preprocess import list_images

DATA = Path(__file__).resolve().parents[1] / "data" / "coco"
VAL_IMAGES, VAL_LABELS = DATA / "val" / "images", DATA / "val" / "labels"
CALIB_IMAGES, CALIB_LABELS = DATA / "calib" / "images", DATA / "calib" / "labels"


def test_coco80_to_coco91_is_the_standard_mapping() -> None:
    assert len(COCO80_TO_COCO91) == 80
    assert list(COCO80_TO_COCO91) == sorted(set(COCO80_TO_COCO91))
    assert set(range(1, 91)) - set(COCO80_TO_COCO91) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert (COCO80_TO_COCO91[0], COCO80_TO_COCO91[11], COCO80_TO_COCO91[79]) == (1, 13, 90)


def test_coco80_names() -> None:
    assert len(COCO80_NAMES) == 80
    assert len(set(COCO80_NAMES)) == 80
    assert (COCO80_NAMES[0], COCO80_NAMES[1], COCO80_NAMES[79]) == ("person", "bicycle", "toothbrush")
    assert COCO80_NAMES[58] == "potted plant"


def test_image_id_for_numeric_and_other_stems() -> None:
    assert image_id_for(Path("000000000139.jpg")) == 139
    assert image_id_for(Path("/some/where/42.png")) == 42
    dog = image_id_for(Path("dog.jpg"))
    assert dog >= NON_NUMERIC_ID_BASE
    assert dog == image_id_for(Path("elsewhere/dog.png"))  # depends on the stem only, stable across calls
    assert dog != image_id_for(Path("cat.jpg"))
    assert image_id_for(Path("١٢.jpg")) >= NON_NUMERIC_ID_BASE  # non-ASCII digits are not a COCO id


@pytest.mark.parametrize(("folder", "files", "boxes"), [(VAL_LABELS, 64, 440), (CALIB_LABELS, 126, 929)])
def test_real_label_files_all_parse(folder: Path, files: int, boxes: int) -> None:
    label_files = sorted(folder.glob("*.txt"))
    assert len(label_files) == files
    total = 0
    for path in label_files:
        classes, cxcywh = read_yolo_label_file(path, 80)
        assert classes.dtype == np.int64 and cxcywh.dtype == np.float64
        assert cxcywh.shape == (len(classes), 4)
        assert ((classes >= 0) & (classes < 80)).all()
        total += len(classes)
    assert total == boxes


def test_read_label_file_values_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("\n3 0.5 0.5 0.2 0.4\n   \n7.0 0.1 0.2 0.05 0.1\n1 1.0005 0.5 0.1 0.1\n\n")
    classes, cxcywh = read_yolo_label_file(path, 80)
    assert classes.tolist() == [3, 7, 1]
    np.testing.assert_allclose(cxcywh[0], [0.5, 0.5, 0.2, 0.4])
    assert cxcywh[2, 0] == pytest.approx(1.0005)  # within the rounding tolerance


def test_read_empty_label_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("")
    classes, cxcywh = read_yolo_label_file(path, 80)
    assert classes.shape == (0,) and cxcywh.shape == (0, 4)


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("3 0.5 0.5 0.2", "4 fields instead of 5"),
        ("3 0.5 0.5 0.2 0.4 0.9", "6 fields instead of 5"),
        ("3 0.5 0.5 0.2 0.4 0.1 0.2 0.3 0.4", "segmentation polygons"),
        ("cat 0.5 0.5 0.2 0.4", "not an integer"),
        ("2.5 0.5 0.5 0.2 0.4", "not an integer"),
        ("3 0.5 abc 0.2 0.4", "cy 'abc' is not a number"),
        ("80 0.5 0.5 0.2 0.4", "class 80 is out of range"),
        ("-1 0.5 0.5 0.2 0.4", "class -1 is out of range"),
        ("3 1.2 0.5 0.2 0.4", "cx 1.2 is outside [0, 1]"),
        ("3 0.5 -0.5 0.2 0.4", "cy -0.5 is outside [0, 1]"),
        ("3 0.5 0.5 0.2 nan", "h nan is outside [0, 1]"),
        ("3 0.5 0.5 0 0.4", "w 0 is not positive"),
        ("3 0.5 0.5 0.2 -0.0", "h -0.0 is not positive"),
        ("3 0.5 0.5 0.2 0.0", "h 0.0 is not positive"),
    ],
)
def test_bad_label_line_names_file_line_text_and_expectation(tmp_path: Path, bad_line: str, problem: str) -> None:
    path = tmp_path / "000000000001.txt"
    path.write_text(f"1 0.5 0.5 0.1 0.1\n\n{bad_line}\n2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(InputError) as caught:
        read_yolo_label_file(path, 80)
    message = str(caught.value)
    assert f"{path}:3" in message
    assert bad_line in message
    assert problem in message
    assert "expected 5 fields `class cx cy w h`" in message and "0..79" in message


def test_bad_label_file_in_a_labels_folder_is_reported_by_load_ground_truth(tmp_path: Path) -> None:
    image = list_images(VAL_IMAGES)[0]
    (tmp_path / f"{image.stem}.txt").write_text("58 0.5 0.5 0.1 0.1\n58 0.5 0.5 0.1\n")
    with pytest.raises(InputError, match=rf"{image.stem}\.txt:2"):
        load_ground_truth([image], tmp_path, 80)


def test_load_ground_truth_real_val() -> None:
    images = list_images(VAL_IMAGES)
    truths, stats = load_ground_truth(images, VAL_LABELS, 80)
    assert (stats.num_images, stats.num_boxes) == (64, 440)
    assert (stats.background_images, stats.orphan_labels, stats.crowd_skipped) == (0, 0, 0)
    assert [t.path for t in truths] == images
    first = truths[0]
    assert (first.image_id, first.width, first.height) == (139, 640, 426)
    assert first.boxes_xyxy.dtype == np.float64 and first.classes.dtype == np.int64
    # COCO annotation of image 139: potted plant (58), bbox xywh [236.98, 142.51, 24.70, 69.50]
    assert first.classes[0] == 58
    np.testing.assert_allclose(first.boxes_xyxy[0], [236.98, 142.51, 236.98 + 24.70, 142.51 + 69.50], atol=0.01)
    for truth in truths:
        assert (truth.boxes_xyxy[:, 2:] > truth.boxes_xyxy[:, :2]).all()
        assert truth.boxes_xyxy.min() >= -1.0 and truth.boxes_xyxy[:, 2].max() <= truth.width + 1.0


def test_load_ground_truth_real_calib_has_two_background_images() -> None:
    truths, stats = load_ground_truth(list_images(CALIB_IMAGES), CALIB_LABELS, 80)
    assert (stats.num_images, stats.num_boxes, stats.background_images, stats.orphan_labels) == (128, 929, 2, 0)
    assert sum(1 for t in truths if len(t.classes) == 0) == 2


def test_orphan_labels_are_counted() -> None:
    images = list_images(VAL_IMAGES)[:10]
    truths, stats = load_ground_truth(images, VAL_LABELS, 80)
    assert (stats.num_images, stats.orphan_labels, stats.background_images) == (10, 54, 0)


def test_images_without_label_file_are_background(tmp_path: Path) -> None:
    images = list_images(VAL_IMAGES)[:6]
    for image in images[:4]:
        shutil.copy(VAL_LABELS / f"{image.stem}.txt", tmp_path)
    truths, stats = load_ground_truth(images, tmp_path, 80)
    assert (stats.num_images, stats.background_images, stats.orphan_labels) == (6, 2, 0)
    assert [len(t.classes) for t in truths[4:]] == [0, 0]
    assert truths[4].boxes_xyxy.shape == (0, 4)


def test_unreadable_and_missing_images_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "000000000007.jpg"
    broken.write_bytes(b"this is not a jpeg")
    with pytest.raises(InputError, match="000000000007.jpg: cannot decode image"):
        load_ground_truth([broken], VAL_LABELS, 80)
    with pytest.raises(InputError, match="missing.jpg: image file does not exist"):
        load_ground_truth([tmp_path / "missing.jpg"], VAL_LABELS, 80)


def test_labels_path_must_be_folder_or_json(tmp_path: Path) -> None:
    images = list_images(VAL_IMAGES)[:1]
    with pytest.raises(InputError, match="folder of YOLO .txt files or a COCO instances .json"):
        load_ground_truth(images, tmp_path / "nowhere", 80)


def test_duplicate_image_ids_are_rejected(tmp_path: Path) -> None:
    image = list_images(VAL_IMAGES)[0]
    copy = tmp_path / "139.jpg"
    shutil.copy(image, copy)
    with pytest.raises(InputError, match="both get image id 139"):
        load_ground_truth([image, copy], VAL_LABELS, 80)


def _val_as_coco_json(images: list[Path], extra_images: int = 0) -> dict:
    """The real val YOLO labels rewritten as a COCO instances file (91-ids, pixel xywh)."""
    truths, _ = load_ground_truth(images, VAL_LABELS, 80)
    data: dict = {"images": [], "annotations": [], "categories": [{"id": c, "name": "x"} for c in COCO80_TO_COCO91]}
    for truth in truths:
        data["images"].append(
            {
                "id": truth.image_id,
                "file_name": f"val2017/{truth.path.name}",
                "width": truth.width,
                "height": truth.height,
            }
        )
        for box, class_index in zip(truth.boxes_xyxy.tolist(), truth.classes.tolist(), strict=True):
            x1, y1, x2, y2 = box
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": truth.image_id,
                    "category_id": COCO80_TO_COCO91[class_index],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0,
                }
            )
    for n in range(extra_images):
        data["images"].append({"id": 900000 + n, "file_name": f"{900000 + n}.jpg", "width": 10, "height": 10})
    return data


def test_coco_json_labels_match_the_yolo_folder(tmp_path: Path) -> None:
    images = list_images(VAL_IMAGES)
    data = _val_as_coco_json(images, extra_images=3)
    first_id = data["images"][0]["id"]
    data["annotations"].append(
        {"id": 99999, "image_id": first_id, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1}
    )
    data["annotations"].append(
        {"id": 99998, "image_id": first_id, "category_id": 1, "bbox": [0, 0, 0, 50], "iscrowd": 0}
    )
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(data))
    from_json, stats = load_ground_truth(images, path, 80)
    from_txt, _ = load_ground_truth(images, VAL_LABELS, 80)
    assert (stats.num_images, stats.num_boxes, stats.background_images) == (64, 440, 0)
    assert (stats.orphan_labels, stats.crowd_skipped, stats.degenerate_skipped) == (3, 1, 1)
    for a, b in zip(from_json, from_txt, strict=True):
        assert (a.image_id, a.width, a.height) == (b.image_id, b.width, b.height)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-9)


def test_coco_json_images_without_annotations_are_background(tmp_path: Path) -> None:
    images = list_images(VAL_IMAGES)[:3]
    data = _val_as_coco_json(images[:2])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    truths, stats = load_ground_truth(images, path, 80)
    assert (stats.num_images, stats.background_images) == (3, 1)
    assert len(truths[2].classes) == 0


def test_coco_json_unknown_category_is_rejected(tmp_path: Path) -> None:
    images = list_images(VAL_IMAGES)[:1]
    data = _val_as_coco_json(images)
    data["annotations"][0]["category_id"] = 12  # one of the unused COCO-91 ids
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="category id 12"):
        load_ground_truth(images, path, 80)


def test_coco_json_size_mismatch_is_rejected(tmp_path: Path) -> None:
    images = list_images(VAL_IMAGES)[:1]
    data = _val_as_coco_json(images)
    data["images"][0]["width"] = 100
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="image is 640x426 but"):
        load_ground_truth(images, path, 80)


def test_malformed_coco_json_is_rejected(tmp_path: Path) -> None:
    images = list_images(VAL_IMAGES)[:1]
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot read COCO json"):
        load_ground_truth(images, path, 80)
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(InputError, match="malformed COCO json"):
        load_ground_truth(images, path, 80)
