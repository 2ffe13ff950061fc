"""The images the validation scores, and the hash of exactly that set (MLflow tag data.validation_set_sha256)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import VAL_IMAGES, VAL_LABELS
from yoloq.config import LabelledSet, ValidationConfig
from yoloq.preprocess import list_images
from yoloq.validate import load_validation_set, validation_set_sha256, validation_sources


def copy_set(root: Path, images: list[Path]) -> LabelledSet:
    """`images` and their YOLO label files copied into root/images and root/labels."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for image in images:
        shutil.copy(image, root / "images" / image.name)
        label = VAL_LABELS / f"{image.stem}.txt"
        if label.is_file():
            shutil.copy(label, root / "labels" / label.name)
    return LabelledSet(images=root / "images", labels=root / "labels")


@pytest.fixture
def sets(tmp_path) -> tuple[LabelledSet, LabelledSet]:
    shipped = list_images(VAL_IMAGES)
    return copy_set(tmp_path / "main", shipped[:5]), copy_set(tmp_path / "extra", shipped[5:7])


def config(main: LabelledSet, *extra: LabelledSet, num_images: int | None = None) -> ValidationConfig:
    return ValidationConfig(images=main.images, labels=main.labels, extra_sets=list(extra), num_images=num_images)


def test_sources_are_the_images_the_validation_scores(sets):
    main, extra = sets
    chosen = config(main, extra, num_images=3)
    sources = validation_sources(chosen)
    assert [s.images for s in sources] == [list_images(main.images)[:3], list_images(extra.images)]
    assert [s.labels for s in sources] == [main.labels, extra.labels]
    scored = [t.path for t in load_validation_set(chosen, 80).truths]
    assert scored == [image for source in sources for image in source.images]


def test_hash_is_stable_and_follows_the_selected_images(sets):
    main, extra = sets
    base = validation_set_sha256(config(main, extra))
    assert validation_set_sha256(config(main, extra)) == base
    assert validation_set_sha256(config(main, extra, num_images=4)) != base
    assert validation_set_sha256(config(main, extra, num_images=5)) == base  # all 5 images: the same set
    assert validation_set_sha256(config(main)) != base  # without the extra set


def test_hash_follows_labels_and_extra_sets(sets):
    main, extra = sets
    base = validation_set_sha256(config(main, extra))
    label = sorted(main.labels.glob("*.txt"))[0]
    original = label.read_text()
    label.write_text(original.replace("0.", "0.1", 1))
    assert validation_set_sha256(config(main, extra)) != base  # a label of the main set
    label.write_text(original)
    assert validation_set_sha256(config(main, extra)) == base
    label.unlink()
    assert validation_set_sha256(config(main, extra)) != base  # an image became background
    shutil.copy(VAL_LABELS / label.name, label)
    extra_image = list_images(extra.images)[0]
    extra_image.unlink()
    assert validation_set_sha256(config(main, extra)) != base  # an image of the extra set


def test_hash_follows_a_coco_json(sets, tmp_path):
    main, _ = sets
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with_json = ValidationConfig(images=main.images, labels=coco)
    base = validation_set_sha256(with_json)
    assert base != validation_set_sha256(config(main))
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1}]}))
    assert validation_set_sha256(with_json) != base
