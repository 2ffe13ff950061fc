"""Validation: detections of a runner on images and their COCO mAP; the timing of one model on its own."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yoloq.artifacts import content_key, file_sha256
from yoloq.backends.base import Runner
from yoloq.config import TimingConfig, ValidationConfig
from yoloq.errors import InputError
from yoloq.heads import DecodeSettings, Detections, HeadFormat, decode
from yoloq.labels import GroundTruthStats, ImageTruth, load_ground_truth, yolo_label_path
from yoloq.metrics import MapResult, coco_map
from yoloq.preprocess import Letterbox, boxes_to_original, list_images, load_preprocessed
from yoloq.speed import tile_batch

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ValidationSet:
    truths: list[ImageTruth]
    stats: GroundTruthStats


@dataclass(frozen=True)
class Timing:
    latency_ms_b1: float
    throughput_ips: float
    throughput_batch: int


NOT_TIMED = Timing(0.0, 0.0, 0)
"""The timing of a result whose speed is measured elsewhere (the flow's interleaved speed stage)."""


TimingFn = Callable[[Runner, list[Path]], Timing]


@dataclass(frozen=True)
class VariantScore:
    map: MapResult
    timing: Timing
    seconds: float


@dataclass(frozen=True)
class LabelledImages:
    images: list[Path]
    labels: Path  # folder of YOLO .txt files, or a COCO instances .json


def validation_sources(config: ValidationConfig) -> list[LabelledImages]:
    """Exactly the images the validation scores, with their labels: the first `num_images` (by name) of the main
    folder, then every image of each of `extra_sets`. Raises InputError naming the key of a missing folder."""
    if not config.images.is_dir():
        raise InputError(f"validation images folder {config.images} not found: set validation.images")
    if not config.labels.exists():
        raise InputError(f"validation labels {config.labels} not found: set validation.labels (folder or COCO json)")
    images = list_images(config.images)
    if config.num_images is not None:
        images = images[: config.num_images]
    if not images:
        raise InputError(f"validation folder {config.images} holds no images")
    sources = [LabelledImages(images, config.labels)]
    for index, extra in enumerate(config.extra_sets):
        where = f"validation.extra_sets.{index}"
        extra_images = list_images(extra.images) if extra.images.is_dir() else []
        if not extra_images:
            raise InputError(f"{where}.images: {extra.images} is not a folder of images")
        if not extra.labels.exists():
            raise InputError(f"{where}.labels: {extra.labels} not found (YOLO label folder or COCO json)")
        sources.append(LabelledImages(extra_images, extra.labels))
    return sources


def load_validation_set(config: ValidationConfig, num_classes: int) -> ValidationSet:
    """The validation images (first `num_images` by name of the main folder) and their ground truth, followed by
    every image of `extra_sets`: one set, scored by one COCO evaluation."""
    first, *rest = validation_sources(config)
    truths, stats = load_ground_truth(first.images, first.labels, num_classes)
    for source in rest:
        more, more_stats = load_ground_truth(source.images, source.labels, num_classes)
        truths += more
        stats = merge_stats(stats, more_stats)
    ids = [t.image_id for t in truths]
    if len(set(ids)) != len(ids):
        raise InputError("validation sets share image ids (the same image twice?): list each image folder once")
    return ValidationSet(truths, stats)


def validation_set_sha256(config: ValidationConfig) -> str:
    """One hash of exactly what the validation scores (`validation_sources`): every selected image (name, which
    gives its COCO image id, and content) with its YOLO label file (or none: background), or the set's COCO json.
    Changing num_images, an extra set, an image or a label changes it."""
    sets = []
    for source in validation_sources(config):
        in_folder = source.labels.is_dir()
        images = [[image.name, file_sha256(image), _yolo_label_sha256(image, source.labels)] for image in source.images]
        sets.append({"coco_json": None if in_folder else file_sha256(source.labels), "images": images})
    return content_key("validation-set-v1", sets, length=64)


def _yolo_label_sha256(image: Path, labels: Path) -> str | None:
    """The hash of `image`'s label file when `labels` is a YOLO label folder; None without one (or for COCO json)."""
    label = yolo_label_path(image, labels)
    return file_sha256(label) if labels.is_dir() and label.is_file() else None


def merge_stats(a: GroundTruthStats, b: GroundTruthStats) -> GroundTruthStats:
    return GroundTruthStats(
        **{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(GroundTruthStats)}
    )


def detect(
    runner: Runner,
    images: list[Path],
    head_format: HeadFormat,
    imgsz: int,
    config: ValidationConfig,
    progress: Progress | None = None,
) -> list[Detections]:
    """Run every image through `runner` (batches of `config.batch_size`): detections in original-image pixels."""
    detections: list[Detections] = []
    total = len(images)
    report_every = max(1, total // 4)
    for start in range(0, total, config.batch_size):
        chunk = images[start : start + config.batch_size]
        frames = []
        for path in chunk:
            loaded = load_preprocessed(path, imgsz)
            if loaded is None:
                raise InputError(f"image {path} is unreadable: remove or replace it")
            frames.append(loaded)
        detections += detect_frames(runner, frames, head_format, decode_settings(config))
        done = start + len(chunk)
        if progress and (done // report_every != start // report_every or done == total):
            progress(f"  detected {done}/{total} images")
    return detections


def decode_settings(config: ValidationConfig) -> DecodeSettings:
    """Validation's decoding settings (conf, IoU, max detections)."""
    return DecodeSettings(config.conf_threshold, config.iou_threshold, config.max_detections)


def detect_frames(
    runner: Runner, frames: list[tuple[np.ndarray, Letterbox]], head_format: HeadFormat, decoding: DecodeSettings
) -> list[Detections]:
    """One batch of letterboxed images (`load_preprocessed` / `letterbox` output) through `runner`, decoded with NMS:
    detections in original-image pixels. Prediction (yoloq.detector) runs the same two steps: the stacked batch
    through the runner, then `decode_frames`."""
    output = runner.infer(np.stack([chw for chw, _ in frames]))
    return decode_frames(output, [box for _, box in frames], head_format, decoding)


def decode_frames(
    output: np.ndarray, boxes: list[Letterbox], head_format: HeadFormat, decoding: DecodeSettings
) -> list[Detections]:
    """A batch's raw output decoded with NMS, each image's boxes mapped back to its original pixels."""
    decoded = decode(output, head_format, decoding.conf_threshold, decoding.iou_threshold, decoding.max_detections)
    detections = []
    for item, box in zip(decoded, boxes, strict=True):
        original = boxes_to_original(item.boxes_xyxy, box).astype(np.float32)
        detections.append(dataclasses.replace(item, boxes_xyxy=original))
    return detections


def evaluate(
    runner: Runner,
    dataset: ValidationSet,
    head_format: HeadFormat,
    imgsz: int,
    class_names: list[str],
    config: ValidationConfig,
    progress: Progress | None = None,
) -> MapResult:
    """Run every validation image through `runner` and score the detections with COCO mAP."""
    detections = detect(runner, [t.path for t in dataset.truths], head_format, imgsz, config, progress)
    return coco_map(dataset.truths, detections, class_names)


def measure_timing(runner: Runner, images: list[Path], imgsz: int, config: TimingConfig) -> Timing:
    """Latency at batch 1 (median ms) and throughput at `config.batch_size` (images/s), on real images."""
    if not images:
        raise InputError("timing needs at least one image")
    frames = [load_preprocessed(p, imgsz) for p in images[: config.batch_size]]
    batch = tile_batch(np.stack([f[0] for f in frames if f is not None]), config.batch_size)
    single = batch[:1]
    for _ in range(config.warmup):
        runner.infer(single)
        runner.infer(batch)
    latencies = []
    for _ in range(config.iterations):
        start = time.perf_counter()
        runner.infer(single)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(config.iterations):
        runner.infer(batch)
    elapsed = time.perf_counter() - start
    return Timing(
        latency_ms_b1=statistics.median(latencies) * 1000.0,
        throughput_ips=config.batch_size * config.iterations / elapsed,
        throughput_batch=config.batch_size,
    )


def score_variant(
    runner: Runner,
    dataset: ValidationSet,
    head_format: HeadFormat,
    imgsz: int,
    class_names: list[str],
    config: ValidationConfig,
    progress: Progress | None = None,
    timing_fn: TimingFn | None = None,
) -> VariantScore:
    """mAP, then timing of one model on its own (`yoloq validate`): wall clock at batch 1 and
    `config.timing.batch_size` unless the backend brings its own `timing_fn` (TensorRT: device time with CUDA
    events). The quantize flow times its variants together instead (tasks/speed.py)."""
    start = time.perf_counter()
    result = evaluate(runner, dataset, head_format, imgsz, class_names, config, progress)
    images = [t.path for t in dataset.truths]
    timing = timing_fn(runner, images) if timing_fn else measure_timing(runner, images, imgsz, config.timing)
    return VariantScore(map=result, timing=timing, seconds=time.perf_counter() - start)
