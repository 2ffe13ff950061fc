"""Stage 3, calibrate: real images -> an explicit INT8 Q/DQ ONNX, named by a content hash and reused when present."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from yoloq.artifacts import atomic_write_json, file_sha256, read_json
from yoloq.cache import cache_path, get_or_create
from yoloq.calibration_data import (
    PREPROCESSING_ID,
    CalibrationDataLoader,
    CalibrationSet,
    overlapping_images,
    select_calibration_images,
)
from yoloq.config import CalibrationConfig
from yoloq.errors import InputError
from yoloq.quant.graph import HeadAnalysis, analyze_head, default_float_convs, prepare_model
from yoloq.quant.placement import calibration_tensors
from yoloq.quant.qdq import WrittenQdq, write_qdq
from yoloq.quant.ranges import amax_for, check_algorithm
from yoloq.quant.statistics import TensorStats, collect_stats

Progress = Callable[[str], None]
STATS_VERSION = "stats-v2"  # v2: ranges snapped to the range grid; Add/Concat/pass-through tensors too
QDQ_VERSION = "qdq-v4"  # v4: yoloq.quant.placement rules (residual Add, Concat, pass-through)


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


@dataclass(frozen=True)
class CalibrationStats:
    """Activation statistics of one calibration set (content-hashed .npz, reused when present)."""

    path: Path
    key: str
    stats: TensorStats
    fp32_sha256: str
    images: CalibrationSet
    validation_overlap: int
    seconds: float
    reused: bool


@dataclass(frozen=True)
class QdqModel:
    """One INT8 Q/DQ model written from calibration statistics (content-hashed, reused when present)."""

    path: Path
    manifest_path: Path
    algorithm: str
    float_nodes: list[str]  # convs kept in float by choice (default: stem + head convs; or the precision search's)
    excluded_nodes: list[str]  # everything left in float: the decoding tail + float_nodes
    reused: bool


def calibration_statistics(
    fp32_onnx: Path,
    input_name: str,
    imgsz: int,
    config: CalibrationConfig,
    validation_images: list[Path],
    out_dir: Path,
    num_images: int | None = None,
    progress: Progress | None = None,
) -> CalibrationStats:
    """Select `num_images` (default calibration.num_images) calibration images, check them against the validation
    set, and collect (or reuse) the statistics every algorithm and every choice of float layers is computed from."""
    selected = select_calibration_images(config.images, num_images or config.num_images, config.min_images)
    if progress and selected.skipped:
        progress(f"skipped {len(selected.skipped)} unreadable calibration images: {[p.name for p in selected.skipped]}")
    overlap = check_overlap(selected, validation_images, config.max_validation_overlap)
    if progress and overlap:
        progress(f"WARNING: {overlap} calibration images are also validation images (within the allowed share)")
    fp32_sha = file_sha256(fp32_onnx)
    start = time.perf_counter()

    def produce(path: Path) -> None:
        model = prepare_model(fp32_onnx)
        loader = CalibrationDataLoader(selected.images, input_name, imgsz, config.batch_size)
        if progress:
            progress(f"calibrating on {len(selected.images)} images ({len(loader)} batches, two passes)")
        collect_stats(model, calibration_tensors(model, analyze_head(model)), loader, input_name).save(path)

    key_parts = [STATS_VERSION, fp32_sha, selected.content_hash, PREPROCESSING_ID, imgsz]
    cached = get_or_create(out_dir, "stats", key_parts, ".npz", produce, TensorStats.load)
    seconds = 0.0 if cached.reused else time.perf_counter() - start
    key = cached.path.stem.removeprefix("stats-")
    return CalibrationStats(cached.path, key, cached.value, fp32_sha, selected, overlap, seconds, cached.reused)


def write_qdq_model(
    fp32_onnx: Path,
    statistics: CalibrationStats,
    algorithm: str,
    percentile: float,
    float_nodes: list[str] | None,
    out_dir: Path,
    imgsz: int,
) -> QdqModel:
    """The Q/DQ model for one algorithm and one set of float convs (None = the default: stem + head convs)."""
    check_algorithm(algorithm, percentile)
    prepared: list[tuple[onnx.ModelProto, HeadAnalysis]] = []  # loaded once, and only when needed

    def graph() -> tuple[onnx.ModelProto, HeadAnalysis]:
        if not prepared:
            model = prepare_model(fp32_onnx)
            prepared.append((model, analyze_head(model)))
        return prepared[0]

    chosen = default_float_convs(graph()[1]) if float_nodes is None else list(float_nodes)
    key_parts = [QDQ_VERSION, statistics.key, algorithm, percentile if algorithm == "percentile" else None]
    key_parts.append(sorted(chosen))
    path = cache_path(out_dir, "model", key_parts, ".int8-qdq.onnx")
    if not path.is_file():  # the manifest, written last, says the model is complete; a model alone is not
        cache_path(out_dir, "model", key_parts, ".calibration.json").unlink(missing_ok=True)

    def produce(manifest_path: Path) -> None:
        amax = amax_for(statistics.stats, algorithm, percentile)
        written = write_qdq(*graph(), amax, chosen, path)
        atomic_write_json(manifest_path, _manifest(statistics, algorithm, percentile, imgsz, chosen, written, amax))

    cached = get_or_create(out_dir, "model", key_parts, ".calibration.json", produce, read_json)
    return QdqModel(path, cached.path, algorithm, chosen, cached.value["excluded_nodes"], cached.reused)


def _manifest(
    statistics: CalibrationStats,
    algorithm: str,
    percentile: float,
    imgsz: int,
    chosen: list[str],
    written: WrittenQdq,
    amax: dict[str, float],
) -> dict[str, object]:
    """What a Q/DQ model was made from and of: model, images, algorithm, the convs kept in float, every range."""
    excluded = list(written.placement.excluded)
    ranges = written.placement.group_amax(amax)
    selected = statistics.images
    return {
        "model_sha256": statistics.fp32_sha256,
        "algorithm": algorithm,
        "percentile": percentile if algorithm == "percentile" else None,
        "preprocessing": PREPROCESSING_ID,
        "imgsz": imgsz,
        "images": [{"name": p.name, "sha256": h} for p, h in zip(selected.images, selected.image_hashes, strict=True)],
        "skipped_unreadable": [p.name for p in selected.skipped],
        "validation_overlap": statistics.validation_overlap,
        "float_nodes": chosen,
        "excluded_nodes": excluded,
        "quantized_nodes": written.quantized_nodes,
        "placement": written.placement.rule_counts(),
        "amax": {name: ranges[name] for name in sorted(ranges)},
    }


def calibrate(
    fp32_onnx: Path,
    input_name: str,
    imgsz: int,
    config: CalibrationConfig,
    validation_images: list[Path],
    out_dir: Path,
    progress: Progress | None = None,
) -> CalibrationResult:
    """Calibration statistics, then the Q/DQ model with calibration.algorithm and the default float convs (stem +
    head convs), both reused when present: the plain recipe, without the search."""
    start = time.perf_counter()
    statistics = calibration_statistics(
        fp32_onnx, input_name, imgsz, config, validation_images, out_dir, progress=progress
    )
    qdq = write_qdq_model(fp32_onnx, statistics, config.algorithm, config.percentile, None, out_dir, imgsz)
    return CalibrationResult(
        qdq.path,
        qdq.manifest_path,
        len(statistics.images.images),
        len(statistics.images.skipped),
        statistics.validation_overlap,
        config.algorithm,
        qdq.excluded_nodes,
        time.perf_counter() - start,
        reused=statistics.reused and qdq.reused,
        images_sha256=statistics.images.content_hash,
    )
