"""Content-keyed outputs: `get_or_create(folder, kind, key_parts, suffix, produce, load)` names an output by what
went into it, salted with the yoloq version (whose code decides what the output holds), and reuses it when it
exists. Writers write through `atomic_path`, so an interrupted run leaves no half-written output to reuse.

It serves the exports (yoloq.export), simplified models (yoloq.simplify, keyed to their record), calibration
statistics and Q/DQ models (yoloq.calibrate, keyed to the manifest written last), sensitivity rankings
(yoloq.sensitivity), FP16-typed ONNX for TensorRT 11, and the detections of a model on a set of images
(`cached_detections`: a re-run with nothing changed scores every INT8 search candidate in seconds). TensorRT
engines and calibration caches keep checks of their own: an engine is complete only with its build record, and a
calibration cache is set aside when its header names another TensorRT version or algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from yoloq import __version__
from yoloq.artifacts import atomic_path, content_key
from yoloq.heads import Detections

T = TypeVar("T")


def cache_path(folder: Path, kind: str, key_parts: Sequence[Any], suffix: str) -> Path:
    """Where the output of `kind` made from `key_parts` lives (the key is salted with the yoloq version)."""
    return folder / f"{kind}-{content_key(kind, __version__, list(key_parts))}{suffix}"


@dataclass(frozen=True)
class Cached(Generic[T]):
    value: T
    path: Path
    reused: bool


def get_or_create(
    folder: Path,
    kind: str,
    key_parts: Sequence[Any],
    suffix: str,
    produce: Callable[[Path], None],
    load: Callable[[Path], T],
) -> Cached[T]:
    """`load(path)` of the cached output, producing it first with `produce(path)` (which must write `path`
    atomically, last of everything it writes) when there is none."""
    path = cache_path(folder, kind, key_parts, suffix)
    reused = path.is_file()
    if not reused:
        produce(path)
    return Cached(load(path), path, reused)


def save_detections(path: Path, detections: list[Detections]) -> None:
    """One .npz holding every image's detections (written atomically)."""
    counts = np.array([len(d.scores) for d in detections], np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                counts=counts,
                boxes=np.concatenate([d.boxes_xyxy for d in detections]).reshape(-1, 4).astype(np.float32),
                scores=np.concatenate([d.scores for d in detections]).astype(np.float32),
                classes=np.concatenate([d.classes for d in detections]).astype(np.int64),
            )


def load_detections(path: Path) -> list[Detections]:
    with np.load(path) as data:  # each data[...] decompresses the whole array: read each once
        counts, boxes, scores, classes = (data[key] for key in ("counts", "boxes", "scores", "classes"))
    ends = np.cumsum(counts)
    return [
        Detections(boxes[a:b].copy(), scores[a:b].copy(), classes[a:b].copy())
        for a, b in zip(ends - counts, ends, strict=True)
    ]


def cached_detections(
    folder: Path, key_parts: Sequence[Any], detect: Callable[[], list[Detections]]
) -> tuple[list[Detections], bool]:
    """The detections `detect()` gives, cached under `folder` by `key_parts` (model content, image contents,
    decoding settings)."""
    cached = get_or_create(
        folder, "detections", key_parts, ".npz", lambda path: save_detections(path, detect()), load_detections
    )
    return cached.value, cached.reused
