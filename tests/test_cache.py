"""Content-keyed outputs: produced once, reused while the inputs and the yoloq version are the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from yoloq.cache import cache_path, cached_detections, get_or_create, load_detections, save_detections
from yoloq.heads import Detections


def test_get_or_create_produces_once_per_key(tmp_path: Path) -> None:
    calls = []

    def produce(path: Path) -> None:
        calls.append(path)
        path.write_text("made")

    first = get_or_create(tmp_path, "thing", ["a", 1], ".txt", produce, Path.read_text)
    again = get_or_create(tmp_path, "thing", ["a", 1], ".txt", produce, Path.read_text)
    other = get_or_create(tmp_path, "thing", ["a", 2], ".txt", produce, Path.read_text)
    assert (first.value, again.value, other.value) == ("made", "made", "made")
    assert (first.reused, again.reused) == (False, True) and first.path == again.path != other.path
    assert len(calls) == 2 and cache_path(tmp_path, "thing", ["a", 1], ".txt").name.startswith("thing-")


def test_detections_round_trip_and_are_reused(tmp_path: Path) -> None:
    found = [
        Detections(np.array([[1, 2, 3, 4]], np.float32), np.array([0.9], np.float32), np.array([3])),
        Detections.empty(),
    ]
    save_detections(tmp_path / "d.npz", found)
    loaded = load_detections(tmp_path / "d.npz")
    assert len(loaded) == 2 and loaded[0].boxes_xyxy.tolist() == [[1, 2, 3, 4]] and len(loaded[1].scores) == 0
    runs = []
    for _ in range(2):
        cached, _ = cached_detections(tmp_path, ["model", "images"], lambda: runs.append(1) or found)
    assert runs == [1] and cached[0].classes.tolist() == [3]
