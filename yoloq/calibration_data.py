"""Calibration images: selection (unreadable files skipped and counted) and a Polygraphy-style data loader.

The loader is an iterable of `{input_name: batch}` dicts, built lazily one batch at a time with the same
`letterbox` that validation uses, so memory stays bounded whatever the image count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from yoloq.artifacts import content_key, file_sha256
from yoloq.errors import InputError
from yoloq.preprocess import list_images, load_preprocessed, read_image

PREPROCESSING_ID = "letterbox-v1:pad114:rgb:div255:nchw"


@dataclass(frozen=True)
class CalibrationSet:
    images: list[Path]
    skipped: list[Path] = field(default_factory=list)
    image_hashes: list[str] = field(default_factory=list)

    @property
    def content_hash(self) -> str:
        return content_key(self.image_hashes, length=32)


def select_calibration_images(folder: Path, num_images: int, min_images: int) -> CalibrationSet:
    """The first `num_images` readable images of `folder` (sorted by name); unreadable ones are skipped and counted."""
    if not folder.is_dir():
        raise InputError(f"calibration folder {folder} not found: set calibration.images to a folder of images")
    candidates = list_images(folder)
    if not candidates:
        raise InputError(f"calibration folder {folder} holds no images (.jpg/.png/.bmp/.webp): add training images")
    chosen: list[Path] = []
    skipped: list[Path] = []
    for path in candidates:
        if len(chosen) == num_images:
            break
        if read_image(path) is None:
            skipped.append(path)
        else:
            chosen.append(path)
    if len(chosen) < min_images:
        raise InputError(
            f"calibration folder {folder}: only {len(chosen)} readable images ({len(skipped)} unreadable skipped), "
            f"need at least {min_images} (calibration.min_images): add images or lower calibration.min_images"
        )
    return CalibrationSet(chosen, skipped, [file_sha256(p) for p in chosen])


class CalibrationDataLoader:
    """Polygraphy-style data loader: iterating yields `{input_name: float32 NCHW batch}`.

    Re-iterable (each pass re-reads the images), so it can feed several calibrators in turn.
    """

    def __init__(self, images: list[Path], input_name: str, imgsz: int, batch_size: int) -> None:
        if not images:
            raise InputError("calibration data loader got no images")
        self.images = images
        self.input_name = input_name
        self.imgsz = imgsz
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.images), self.batch_size):
            batch = []
            for path in self.images[start : start + self.batch_size]:
                loaded = load_preprocessed(path, self.imgsz)
                if loaded is None:
                    raise InputError(f"calibration image {path} became unreadable during calibration")
                batch.append(loaded[0])
            yield {self.input_name: np.stack(batch)}


def overlapping_images(calibration_hashes: list[str], validation_images: list[Path]) -> int:
    """How many calibration images are byte-identical to a validation image."""
    validation_hashes = {file_sha256(p) for p in validation_images}
    return sum(1 for digest in calibration_hashes if digest in validation_hashes)
