"""`yoloq predict`: a model (file or `models:/NAME@ALIAS`) on an image, a folder of images or a video.

Detections come from yoloq.detector (validation's preprocessing and decoding); this module reads the source, shows
a progress bar, and writes what was asked for: drawn images (a drawn video for a video), detections per image as
JSON, COCO results JSON. Unreadable images are skipped and counted in the summary line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from yoloq.artifacts import atomic_write_json
from yoloq.detector import Detector, ImageDetections, coco_category_id
from yoloq.drawing import draw_detections
from yoloq.errors import InputError
from yoloq.labels import image_id_for
from yoloq.metrics import result_rows
from yoloq.preprocess import IMAGE_SUFFIXES, list_images

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass
class PredictSummary:
    images: int = 0
    detections: int = 0
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0
    written: list[Path] = field(default_factory=list)

    def line(self, source: Path, what: str = "images") -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        noun = what if self.images != 1 else what.rstrip("s")
        text = f"predict: {self.images} {noun} of {source}, {self.detections} detections"
        text += f", {rate:.1f} {what}/s end to end"
        if self.unreadable:
            shown = ", ".join(self.unreadable[:5]) + (", ..." if len(self.unreadable) > 5 else "")
            text += f"; {len(self.unreadable)} unreadable (skipped): {shown}"
        else:
            text += "; 0 unreadable"
        return text


def is_video(source: Path) -> bool:
    return source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES


def image_sources(source: Path) -> list[Path]:
    """The images of `source`: itself (an image file) or a folder's images, sorted by name."""
    if source.is_dir():
        images = list_images(source)
        if not images:
            raise InputError(f"source folder {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return images
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(
                f"source {source}: not an image ({', '.join(IMAGE_SUFFIXES)}) or video ({', '.join(VIDEO_SUFFIXES)})"
            )
        return [source]
    raise InputError(f"source {source} not found: give an image, a folder of images or a video file")


def predict_images(
    detector: Detector,
    images: list[Path],
    save_dir: Path | None,
    json_path: Path | None,
    coco_path: Path | None,
    workers: int = 0,
    progress: bool = True,
) -> PredictSummary:
    """Detections of every image; drawn copies in `save_dir` (same file names), JSON and COCO results as asked."""
    summary = PredictSummary()
    per_image: list[dict[str, Any]] = []
    coco: list[dict[str, Any]] = []
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=len(images), unit="img", desc="predict", disable=not progress, file=sys.stderr)
    for found in detector.stream(images, keys=images, workers=workers, keep_images=save_dir is not None):
        path: Path = found.key
        bar.update(1)
        if found.detections is None:
            summary.unreadable.append(path.name)
            continue
        summary.images += 1
        summary.detections += len(found.detections)
        per_image.append({"file": str(path), **_image_json(found.detections)})
        coco += coco_results(image_id_for(path), found.detections, detector.names)
        if save_dir is not None and found.image is not None:
            drawn = draw_detections(found.image, found.detections)
            target = save_dir / path.name
            if not cv2.imwrite(str(target), drawn):
                raise InputError(f"cannot write {target}: check that {save_dir} is writable")
    bar.close()
    summary.seconds = time.perf_counter() - start
    if summary.images == 0:
        raise InputError(f"none of the {len(images)} images could be read: {', '.join(summary.unreadable[:5])}")
    _write_outputs(detector, summary, per_image, coco, json_path, coco_path, save_dir)
    return summary


def predict_video(
    detector: Detector,
    video: Path,
    save_dir: Path | None,
    json_path: Path | None,
    coco_path: Path | None,
    workers: int = 0,
    progress: bool = True,
) -> PredictSummary:
    """Detections of every frame; a drawn video `save_dir/<stem>.mp4`, JSON per frame and COCO results as asked
    (image_id = frame index)."""
    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise InputError(f"video {video} cannot be opened by OpenCV: is it a video file (mp4, avi, mkv, ...)?")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    summary = PredictSummary()
    per_frame: list[dict[str, Any]] = []
    coco: list[dict[str, Any]] = []
    writer = None
    target = save_dir / f"{video.stem}.mp4" if save_dir is not None else None
    start = time.perf_counter()
    bar = tqdm(total=total, unit="frame", desc="predict", disable=not progress, file=sys.stderr)
    try:
        for found in detector.stream(_frames(capture), workers=workers, keep_images=target is not None):
            bar.update(1)
            if found.detections is None:
                summary.unreadable.append(f"frame {found.key}")
                continue
            summary.images += 1
            summary.detections += len(found.detections)
            per_frame.append({"frame": found.key, **_image_json(found.detections)})
            coco += coco_results(found.key, found.detections, detector.names)
            if target is not None and found.image is not None:
                if writer is None:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    height, width = found.image.shape[:2]
                    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
                    if not writer.isOpened():
                        raise InputError(f"cannot write the video {target}: check that {save_dir} is writable")
                writer.write(draw_detections(found.image, found.detections))
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
    summary.seconds = time.perf_counter() - start
    if summary.images == 0:
        raise InputError(f"video {video}: no frame could be read")
    _write_outputs(detector, summary, per_frame, coco, json_path, coco_path, None)
    if target is not None:
        summary.written.append(target)
    return summary


def _frames(capture: Any) -> Iterator[np.ndarray]:
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def _image_json(found: ImageDetections) -> dict[str, Any]:
    return {"width": found.width, "height": found.height, "detections": found.to_json()}


def coco_results(image_id: int, found: ImageDetections, names: list[str]) -> list[dict[str, Any]]:
    """COCO results rows (bbox x y w h in pixels) of one image, with COCO's own category ids for COCO models."""
    return result_rows(image_id, found.as_detections(), lambda class_id: coco_category_id(class_id, names))


def _write_outputs(
    detector: Detector,
    summary: PredictSummary,
    items: list[dict[str, Any]],
    coco: list[dict[str, Any]],
    json_path: Path | None,
    coco_path: Path | None,
    save_dir: Path | None,
) -> None:
    if json_path is not None:
        document = {
            "model": str(detector.model_path),
            "backend": detector.backend,
            "imgsz": detector.imgsz,
            "conf_threshold": detector.decoding.conf_threshold,
            "iou_threshold": detector.decoding.iou_threshold,
            "max_detections": detector.decoding.max_detections,
            "images": items,
            "unreadable": summary.unreadable,
        }
        summary.written.append(atomic_write_json(json_path, document))
    if coco_path is not None:
        summary.written.append(atomic_write_json(coco_path, coco))
    if save_dir is not None:
        summary.written.append(save_dir)
