"""Stage 3, calibrate: real images -> an explicit INT8 Q/DQ ONNX, named by a content hash and reused when present."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from yoloq.artifacts import atomic_write_json, content_key, file_sha256, read_json
from yoloq.calibration_data import (
    PREPROCESSING_ID,
    CalibrationDataLoader,
    CalibrationSet,
    overlapping_images,
    select_calibration_images,
)
from yoloq.config import CalibrationConfig
from yoloq.errors import InputError
from yoloq.quantize import quantize_qdq

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CalibrationResult:
    qdq_path: Path
    manifest_path: Path
    num_images: int
    skipped_images: int
    validation_overlap: int
    algorithm: str
    excluded_nodes: list[str]
    seconds: float
    reused: bool
    images_sha256: str


def check_overlap(calibration: CalibrationSet, validation_images: list[Path], max_share: float) -> int:
    """Count calibration images that are also validation images; refuse above `max_share` of the calibration set."""
    overlap = overlapping_images(calibration.image_hashes, validation_images)
    share = overlap / len(calibration.images)
    if overlap and share > max_share:
        raise InputError(
            f"{overlap} of {len(calibration.images)} calibration images ({share:.0%}) are also validation images "
            f"(same content): calibrating on the evaluation set inflates every reported number. Use separate "
            f"folders, or raise calibration.max_validation_overlap (now {max_share}) if you accept that."
        )
    return overlap


def calibrate(
    fp32_onnx: Path,
    input_name: str,
    imgsz: int,
    config: CalibrationConfig,
    validation_images: list[Path],
    out_dir: Path,
    progress: Progress | None = None,
) -> CalibrationResult:
    """Select calibration images, check them against the validation set, and write (or reuse) the Q/DQ model."""
    selected = select_calibration_images(config.images, config.num_images, config.min_images)
    if progress and selected.skipped:
        progress(f"skipped {len(selected.skipped)} unreadable calibration images: {[p.name for p in selected.skipped]}")
    overlap = check_overlap(selected, validation_images, config.max_validation_overlap)
    if progress and overlap:
        progress(f"WARNING: {overlap} calibration images are also validation images (within the allowed share)")
    key = content_key(
        "qdq-v2",
        file_sha256(fp32_onnx),
        selected.content_hash,
        config.algorithm,
        config.percentile if config.algorithm == "percentile" else None,
        PREPROCESSING_ID,
        imgsz,
    )
    qdq_path, manifest_path = out_dir / f"model-{key}.int8-qdq.onnx", out_dir / f"model-{key}.calibration.json"
    if qdq_path.is_file() and manifest_path.is_file():
        manifest = read_json(manifest_path)
        return CalibrationResult(
            qdq_path,
            manifest_path,
            len(selected.images),
            len(selected.skipped),
            overlap,
            config.algorithm,
            manifest["excluded_nodes"],
            0.0,
            reused=True,
            images_sha256=selected.content_hash,
        )
    loader = CalibrationDataLoader(selected.images, input_name, imgsz, config.batch_size)
    if progress:
        progress(f"calibrating ({config.algorithm}) on {len(selected.images)} images in {len(loader)} batches")
    start = time.perf_counter()
    result = quantize_qdq(fp32_onnx, loader, config.algorithm, config.percentile, qdq_path)
    seconds = time.perf_counter() - start
    atomic_write_json(
        manifest_path,
        {
            "model_sha256": file_sha256(fp32_onnx),
            "algorithm": config.algorithm,
            "percentile": config.percentile if config.algorithm == "percentile" else None,
            "preprocessing": PREPROCESSING_ID,
            "imgsz": imgsz,
            "images": [
                {"name": p.name, "sha256": h} for p, h in zip(selected.images, selected.image_hashes, strict=True)
            ],
            "skipped_unreadable": [p.name for p in selected.skipped],
            "validation_overlap": overlap,
            "excluded_nodes": result.excluded_nodes,
            "seconds": round(seconds, 2),
        },
    )
    return CalibrationResult(
        qdq_path,
        manifest_path,
        len(selected.images),
        len(selected.skipped),
        overlap,
        config.algorithm,
        result.excluded_nodes,
        seconds,
        reused=False,
        images_sha256=selected.content_hash,
    )
