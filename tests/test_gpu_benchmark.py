"""The GPU benchmark's CPU-side helpers: speed-only models travel without weights; ModelOpt's opset relabelled."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.gpu_int8 import extra_rows, is_row, refill_weights, relabel_opset, strip_weights, table
from tests.conftest import VAL_IMAGES, VAL_LABELS
from tests.test_quantize import yolov5_like


def test_stripped_weights_are_refilled_with_the_same_shapes_and_types(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(yolov5_like(), source)
    stripped = tmp_path / "stripped.onnx"
    strip_weights(source, stripped)
    assert stripped.stat().st_size < source.stat().st_size
    refilled = refill_weights(stripped, tmp_path / "refilled.onnx")
    onnx.checker.check_model(onnx.load(str(refilled)))
    before = {i.name: (tuple(i.dims), i.data_type) for i in onnx.load(str(source)).graph.initializer}
    after = {i.name: (tuple(i.dims), i.data_type) for i in onnx.load(str(refilled)).graph.initializer}
    assert before == after
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert ort.InferenceSession(str(refilled), providers=["CPUExecutionProvider"]).run(None, {"images": x})


def test_a_newer_opset_is_relabelled_only_when_every_node_exists_there(tmp_path: Path) -> None:
    model = yolov5_like()
    model.opset_import[0].version = 19
    path = tmp_path / "m19.onnx"
    onnx.save(model, path)
    relabel_opset(path, 17)
    assert onnx.load(str(path)).opset_import[0].version == 17


def test_the_table_marks_failed_builds_and_random_weights() -> None:
    row = {"images_per_s_b32": 9000.0, "x_fp16_b32": 1.3, "ms_b1": 0.5, "build_s": 120.0, "profile": {}}
    results = {
        "settings": {"builder_optimization_level": 2, "tactic_sources": "JIT", "profile": "1/8/32", "timing": "x"},
        "models": {"yolov8s": {"rows": {"qdq": row, "modelopt": {"error": "EngineBuildError: boom"}}}},
    }
    text = table(results)
    assert "| yolov8s | qdq | 9,000 | 1.30 | 0.500 | random weights |" in text and "failed: EngineBuildError" in text


def test_extra_qdq_rows_name_their_model_and_file() -> None:
    rows = extra_rows(["yolov8n:qdq-top4=a.onnx", "yolov8n:qdq-top8=b.onnx", "yolov5n:qdq-top2=c.onnx"])
    assert rows == {
        "yolov8n": {"qdq-top4": Path("a.onnx"), "qdq-top8": Path("b.onnx")},
        "yolov5n": {"qdq-top2": Path("c.onnx")},
    }
    assert is_row("qdq-top4") and is_row("fp16") and not is_row("qdq-") and not is_row("fp8")
    for bad in ("qdq-top4=a.onnx", "yolov8n:fp16=a.onnx", "yolov8n:qdq-all=a.onnx", "yolov8n:qdq-top4"):
        with pytest.raises(SystemExit, match="MODEL:qdq-NAME=PATH"):
            extra_rows([bad])


def test_saved_detections_are_scored_per_set_against_the_reference(
    tmp_path: Path, exported, capsys, monkeypatch
) -> None:
    from benchmarks import score_detections
    from yoloq.cache import save_detections
    from yoloq.heads import Detections
    from yoloq.labels import load_ground_truth
    from yoloq.preprocess import list_images

    sets = []
    for name, images in (("a", slice(0, 3)), ("b", slice(3, 5))):
        folder = tmp_path / name
        (folder / "images").mkdir(parents=True)
        (folder / "labels").mkdir()
        for image in list_images(VAL_IMAGES)[images]:
            shutil.copy(image, folder / "images")
            shutil.copy(VAL_LABELS / f"{image.stem}.txt", folder / "labels")
        sets.append(folder)
    names = exported.facts.names
    truths = [t for f in sets for t in load_ground_truth(list_images(f / "images"), f / "labels", len(names))[0]]
    perfect = [
        Detections(t.boxes_xyxy.astype(np.float32), np.ones(len(t.classes), np.float32), t.classes) for t in truths
    ]
    save_detections(tmp_path / "m-fp16.npz", perfect)
    save_detections(tmp_path / "m-int8.npz", [*perfect[:3], Detections.empty(), Detections.empty()])
    argv = ["x", "--model", str(exported.onnx_path), "--set", str(sets[0]), "--set", str(sets[1])]
    monkeypatch.setattr(sys, "argv", [*argv, str(tmp_path / "m-fp16.npz"), str(tmp_path / "m-int8.npz")])
    assert score_detections.main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| detections | all 5 | Δ | first 3 | Δ | rest 2 |")
    assert lines[2] == "| m-fp16 | 100.00 | +0.00 | 100.00 | +0.00 | 100.00 | +0.00 |"
    assert lines[3].startswith("| m-int8 |") and "| 100.00 | +0.00 | 0.00 | -100.00 |" in lines[3]


def test_scoring_detections_names_a_missing_file_or_reference(tmp_path: Path, monkeypatch) -> None:
    from benchmarks import score_detections

    base = ["x", "--model", str(tmp_path / "m.onnx"), "--set", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*base, str(tmp_path / "a-int8.npz")])
    with pytest.raises(SystemExit, match="not found: .*m.onnx, .*a-int8.npz"):
        score_detections.main()
    for name in ("m.onnx", "a-int8.npz"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"--reference fp16: none of the files is named \*-fp16.npz"):
        score_detections.main()
