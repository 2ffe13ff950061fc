"""Ground truth: COCO-80 class tables, YOLO .txt label files and COCO instances .json, read into original pixels."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yoloq.errors import InputError
from yoloq.preprocess import read_image

COCO80_TO_COCO91: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65,
    67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip

COCO80_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

COORD_TOLERANCE = 1e-3
"""Normalised coordinates may stray this far outside [0, 1] (rounding in converters) before a line is rejected."""

NON_NUMERIC_ID_BASE = 10**12
"""Image ids for non-numeric file stems start here, far above any COCO id, so the two kinds never collide."""

_EXPECTED_LINE = (
    "expected 5 fields `class cx cy w h`: class an integer 0..{last}, cx cy w h numbers normalised to [0, 1], "
    "w and h > 0"
)


@dataclass(frozen=True, eq=False)
class ImageTruth:
    """Ground-truth boxes of one image in original-image pixels. eq=False: arrays do not compare as one bool."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes_xyxy: np.ndarray  # (n, 4) float64, original pixels
    classes: np.ndarray  # (n,) int64, 0..num_classes-1


@dataclass(frozen=True)
class GroundTruthStats:
    """What load_ground_truth found, for the run log."""

    num_images: int
    num_boxes: int
    background_images: int  # images with no boxes: no label file, an empty one, or only crowd/degenerate boxes
    orphan_labels: int  # label files (or COCO json image entries) that match no image
    crowd_skipped: int  # COCO json annotations with iscrowd=1, not evaluated
    degenerate_skipped: int = 0  # COCO json annotations with width or height <= 0


def image_id_for(path: Path) -> int:
    """The COCO image id of an image file.

    A stem of ASCII digits is the COCO id itself (000000000139.jpg -> 139). Any other stem gets a stable id
    NON_NUMERIC_ID_BASE + the first 48 bits of sha1(stem): the same on every run and machine, and never equal
    to a numeric id below 10**12.
    """
    stem = path.stem
    if stem.isascii() and stem.isdigit():
        return int(stem)
    digest = hashlib.sha1(stem.encode("utf-8")).hexdigest()
    return NON_NUMERIC_ID_BASE + int(digest[:12], 16)


def _bad_line(path: Path, line_number: int, text: str, problem: str, num_classes: int) -> InputError:
    expected = _EXPECTED_LINE.format(last=num_classes - 1)
    return InputError(f"{path}:{line_number}: {problem} in {text!r}; {expected}. Fix or remove this line.")


def _parse_class(field: str) -> int | None:
    """An integer class id; '3' and '3.0' are accepted, '3.5' and 'cat' are not."""
    try:
        return int(field)
    except ValueError:
        pass
    try:
        value = float(field)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _parse_line(path: Path, line_number: int, text: str, num_classes: int) -> tuple[int, list[float]]:
    fields = text.split()
    if len(fields) != 5:
        problem = f"{len(fields)} fields instead of 5"
        if len(fields) > 5:
            problem += " (segmentation polygons are not supported)"
        raise _bad_line(path, line_number, text, problem, num_classes)
    class_id = _parse_class(fields[0])
    if class_id is None:
        raise _bad_line(path, line_number, text, f"class {fields[0]!r} is not an integer", num_classes)
    if not 0 <= class_id < num_classes:
        raise _bad_line(path, line_number, text, f"class {class_id} is out of range", num_classes)
    coords: list[float] = []
    for name, field in zip(("cx", "cy", "w", "h"), fields[1:], strict=True):
        try:
            value = float(field)
        except ValueError:
            raise _bad_line(path, line_number, text, f"{name} {field!r} is not a number", num_classes) from None
        if not -COORD_TOLERANCE <= value <= 1.0 + COORD_TOLERANCE:  # also rejects nan and inf
            raise _bad_line(path, line_number, text, f"{name} {field} is outside [0, 1]", num_classes)
        if name in ("w", "h") and value <= 0.0:
            raise _bad_line(path, line_number, text, f"{name} {field} is not positive", num_classes)
        coords.append(value)
    return class_id, coords


def read_yolo_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one YOLO label file: (classes (n,) int64, boxes (n, 4) float64 normalised cx cy w h).

    Blank lines are skipped. Any other malformed line raises InputError naming `file:line`, the text and the
    expected format.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read label file ({exc}); expected a UTF-8 text file.") from exc
    classes: list[int] = []
    boxes: list[list[float]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        class_id, coords = _parse_line(path, line_number, stripped, num_classes)
        classes.append(class_id)
        boxes.append(coords)
    return np.array(classes, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 4)


def cxcywh_normalised_to_xyxy(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised cx cy w h -> x1 y1 x2 y2 in pixels of a width x height image (float64)."""
    out = np.empty((len(boxes), 4), dtype=np.float64)
    out[:, 0] = (boxes[:, 0] - boxes[:, 2] / 2) * width
    out[:, 1] = (boxes[:, 1] - boxes[:, 3] / 2) * height
    out[:, 2] = (boxes[:, 0] + boxes[:, 2] / 2) * width
    out[:, 3] = (boxes[:, 1] + boxes[:, 3] / 2) * height
    return out


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as the pipeline decodes it; InputError when it cannot be decoded."""
    if not path.is_file():
        raise InputError(f"{path}: image file does not exist; check the image folder.")
    image = read_image(path)
    if image is None:
        raise InputError(f"{path}: cannot decode image; remove the file or replace it with a valid JPEG/PNG.")
    height, width = image.shape[:2]
    return int(width), int(height)


@dataclass(frozen=True)
class _ImageBoxes:
    boxes_xyxy: np.ndarray
    classes: np.ndarray


def _empty_boxes() -> _ImageBoxes:
    return _ImageBoxes(np.zeros((0, 4), dtype=np.float64), np.zeros((0,), dtype=np.int64))


@dataclass(frozen=True)
class _CocoJson:
    boxes_by_name: dict[str, _ImageBoxes]
    size_by_name: dict[str, tuple[int, int]]
    crowd_skipped_by_name: dict[str, int]
    degenerate_skipped_by_name: dict[str, int]


def _coco_category_to_class(categories: list[int], num_classes: int, path: Path) -> dict[int, int]:
    mapping: dict[int, int] = {}
    for category_id in categories:
        if category_id not in COCO80_TO_COCO91 or COCO80_TO_COCO91.index(category_id) >= num_classes:
            raise InputError(
                f"{path}: category id {category_id} is not one of the standard COCO-91 ids of classes "
                f"0..{num_classes - 1}; use the official COCO instances json or YOLO .txt labels."
            )
        mapping[category_id] = COCO80_TO_COCO91.index(category_id)
    return mapping


def _read_coco_json(path: Path, num_classes: int) -> _CocoJson:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read COCO json ({exc}); expected a COCO instances_*.json file.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise InputError(f"{path}: not a COCO instances file; expected a json object with 'images' and 'annotations'.")
    try:
        name_by_id = {int(image["id"]): Path(str(image["file_name"])).name for image in data["images"]}
        size_by_name = {
            Path(str(image["file_name"])).name: (int(image["width"]), int(image["height"])) for image in data["images"]
        }
        annotations = [
            (int(a["image_id"]), int(a["category_id"]), [float(v) for v in a["bbox"]], int(a.get("iscrowd", 0)))
            for a in data["annotations"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"{path}: malformed COCO json ({exc!r}); images need id, file_name, width, height and annotations "
            "need image_id, category_id and bbox [x, y, w, h]."
        ) from exc
    class_of = _coco_category_to_class(sorted({a[1] for a in annotations}), num_classes, path)
    boxes: dict[str, list[list[float]]] = {}
    classes: dict[str, list[int]] = {}
    crowd: dict[str, int] = {}
    degenerate: dict[str, int] = {}
    for image_id, category_id, bbox, iscrowd in annotations:
        if image_id not in name_by_id:
            raise InputError(f"{path}: an annotation refers to image id {image_id}, which is not in 'images'.")
        name = name_by_id[image_id]
        if len(bbox) != 4:
            raise InputError(f"{path}: annotation bbox {bbox} of image {name} does not have 4 numbers [x, y, w, h].")
        if iscrowd:
            crowd[name] = crowd.get(name, 0) + 1
            continue
        x, y, w, h = bbox
        if not (w > 0 and h > 0):
            degenerate[name] = degenerate.get(name, 0) + 1
            continue
        boxes.setdefault(name, []).append([x, y, x + w, y + h])
        classes.setdefault(name, []).append(class_of[category_id])
    boxes_by_name = {
        name: _ImageBoxes(np.array(boxes[name], dtype=np.float64), np.array(classes[name], dtype=np.int64))
        for name in boxes
    }
    return _CocoJson(boxes_by_name, size_by_name, crowd, degenerate)


def _check_unique_ids(truths: list[ImageTruth]) -> None:
    seen: dict[int, Path] = {}
    for truth in truths:
        if truth.image_id in seen:
            raise InputError(
                f"{truth.path} and {seen[truth.image_id]} both get image id {truth.image_id}; "
                "give every image a distinct file stem."
            )
        seen[truth.image_id] = truth.path


def yolo_label_path(image: Path, labels: Path) -> Path:
    """The YOLO label file of `image` in the label folder `labels` (000000000139.jpg -> 000000000139.txt)."""
    return labels / f"{image.stem}.txt"


def _load_from_folder(images: list[Path], labels: Path, num_classes: int) -> tuple[list[ImageTruth], GroundTruthStats]:
    truths: list[ImageTruth] = []
    for path in images:
        width, height = image_size(path)
        label_file = yolo_label_path(path, labels)
        if label_file.is_file():
            classes, cxcywh = read_yolo_label_file(label_file, num_classes)
            found = _ImageBoxes(cxcywh_normalised_to_xyxy(cxcywh, width, height), classes)
        else:
            found = _empty_boxes()
        truths.append(ImageTruth(image_id_for(path), path, width, height, found.boxes_xyxy, found.classes))
    image_stems = {path.stem for path in images}
    orphans = sum(1 for f in labels.glob("*.txt") if f.is_file() and f.stem not in image_stems)
    stats = GroundTruthStats(
        num_images=len(truths),
        num_boxes=sum(len(t.classes) for t in truths),
        background_images=sum(1 for t in truths if len(t.classes) == 0),
        orphan_labels=orphans,
        crowd_skipped=0,
    )
    return truths, stats


def _load_from_json(images: list[Path], labels: Path, num_classes: int) -> tuple[list[ImageTruth], GroundTruthStats]:
    coco = _read_coco_json(labels, num_classes)
    truths: list[ImageTruth] = []
    for path in images:
        width, height = image_size(path)
        listed = coco.size_by_name.get(path.name)
        if listed is not None and listed != (width, height):
            raise InputError(
                f"{path}: image is {width}x{height} but {labels} says {listed[0]}x{listed[1]}; "
                "the boxes would not line up. Use the images the annotation file was made for."
            )
        found = coco.boxes_by_name.get(path.name, _empty_boxes())
        truths.append(ImageTruth(image_id_for(path), path, width, height, found.boxes_xyxy, found.classes))
    image_names = {path.name for path in images}
    stats = GroundTruthStats(
        num_images=len(truths),
        num_boxes=sum(len(t.classes) for t in truths),
        background_images=sum(1 for t in truths if len(t.classes) == 0),
        orphan_labels=sum(1 for name in coco.size_by_name if name not in image_names),
        crowd_skipped=sum(n for name, n in coco.crowd_skipped_by_name.items() if name in image_names),
        degenerate_skipped=sum(n for name, n in coco.degenerate_skipped_by_name.items() if name in image_names),
    )
    return truths, stats


def load_ground_truth(images: list[Path], labels: Path, num_classes: int) -> tuple[list[ImageTruth], GroundTruthStats]:
    """Ground truth for `images` (same order), boxes in original pixels.

    `labels` is a folder of YOLO .txt files named like the images (000000000139.jpg -> 000000000139.txt), or a
    COCO instances .json file whose images are matched by file name and whose category ids are mapped back to
    0..79 through COCO80_TO_COCO91 (crowd and zero-size boxes are skipped and counted). An image without labels
    is background. Every image is decoded once to learn its size; an unreadable one raises InputError.
    """
    if num_classes < 1:
        raise InputError(f"num_classes is {num_classes}; it must be at least 1.")
    if labels.is_dir():
        truths, stats = _load_from_folder(images, labels, num_classes)
    elif labels.is_file() and labels.suffix.lower() == ".json":
        truths, stats = _load_from_json(images, labels, num_classes)
    else:
        raise InputError(
            f"{labels}: labels must be a folder of YOLO .txt files or a COCO instances .json file; check the path."
        )
    _check_unique_ids(truths)
    return truths, stats
