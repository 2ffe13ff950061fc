"""Prediction: Detector (ONNX Runtime for real, TensorRT with the fakes), `yoloq predict`, and models:/ URIs resolved
through a real MLflow sqlite store."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import flows.cli
from tests.conftest import PROJECT, VAL_IMAGES, VAL_LABELS
from tests.fake_tensorrt import OUTPUT, FakeDevice, install
from yoloq.backends import closing_runner
from yoloq.backends.onnxruntime import OnnxRuntimeRunner
from yoloq.backends.tensorrt.nms import DET_BOXES, DET_CLASSES, DET_SCORES, NUM_DETS
from yoloq.backends.tensorrt.uint8_input import uint8_input_onnx
from yoloq.backends.tensorrt.versions import Availability
from yoloq.config import ValidationConfig
from yoloq.detector import Detector, engine_facts
from yoloq.errors import BackendUnavailable, InputError
from yoloq.heads import DecodeSettings
from yoloq.labels import COCO80_NAMES
from yoloq.preprocess import list_images
from yoloq.validate import decode_settings, detect


def assert_same(found, expected) -> None:
    np.testing.assert_array_equal(found.boxes_xyxy, expected.boxes_xyxy)
    np.testing.assert_array_equal(found.scores, expected.scores)
    np.testing.assert_array_equal(found.class_ids if hasattr(found, "class_ids") else found.classes, expected.classes)


def test_predictions_are_exactly_validations_detections(simplified):
    images = list_images(VAL_IMAGES)[:6]
    config = ValidationConfig(images=VAL_IMAGES, labels=VAL_LABELS)
    with Detector.load(simplified.onnx_path, decoding=decode_settings(config), batch_size=4) as detector:
        predicted = detector(images)
    with closing_runner(OnnxRuntimeRunner(simplified.onnx_path)) as runner:
        validated = detect(runner, images, "yolov5", 640, config)
    assert len(predicted) == len(validated) == 6
    for found, expected in zip(predicted, validated, strict=True):
        assert_same(found, expected)
        assert found.class_names == [COCO80_NAMES[c] for c in expected.classes.tolist()]
    assert sum(len(p) for p in predicted) > 100


def test_paths_arrays_threads_unreadable_images_and_closing(simplified, tmp_path):
    path = list_images(VAL_IMAGES)[0]
    image = cv2.imread(str(path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    detector = Detector.load(simplified.onnx_path, decoding=DecodeSettings(0.25, 0.6, 100), batch_size=2)
    with detector:
        from_path, from_array, from_gray = detector([path, image, cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)])
        assert_same(from_array, from_path.as_detections())
        assert (from_path.width, from_path.height) == (image.shape[1], image.shape[0]) and len(from_path) > 0
        assert from_gray.width == image.shape[1]
        assert from_path.to_json()[0].keys() == {"box", "score", "class_id", "class_name"}
        with pytest.raises(InputError, match="broken.jpg"):
            detector([path, broken])
        sources = [broken, path, path, image, broken]  # batches of 2: the pipeline runs over three of them
        streamed = list(detector.stream(sources, workers=2, keep_images=True))
        assert [p.key for p in streamed] == [0, 1, 2, 3, 4]
        assert [p.detections is None for p in streamed] == [True, False, False, False, True]
        assert streamed[1].image is not None and streamed[1].image.shape == image.shape
        for found in streamed[1:4]:
            assert_same(found.detections, from_path.as_detections())
        assert [p.detections is None for p in detector.stream([broken, broken, broken], workers=1)] == [True] * 3
    assert detector.runner is None
    with pytest.raises(RuntimeError, match="closed"):
        detector([path])


def test_missing_and_wrong_models_say_what_to_do(tmp_path):
    with pytest.raises(InputError, match="not found"):
        Detector.load(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="flows.model_uri.load_detector"):
        Detector.load("models:/yoloq-yolov5n@champion")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    with pytest.raises(InputError, match="tensorrt only"):
        Detector.load(engine, "onnxruntime")
    with pytest.raises(BackendUnavailable):  # no TensorRT on this machine
        Detector.load(engine)
    with pytest.raises(InputError, match="build record"):
        engine_facts(engine)


def test_engine_facts_come_from_the_build_record_or_its_source_onnx(simplified, tmp_path):
    engine = tmp_path / "trt-fp16-abc.engine"
    engine.write_bytes(b"engine")
    record = engine.with_suffix(".json")
    record.write_text(json.dumps({"details": {"source_onnx": str(simplified.onnx_path), "nms": "efficient_nms"}}))
    facts = engine_facts(engine)
    assert facts.head_format == "end2end" and facts.names == list(COCO80_NAMES) and facts.imgsz == 640
    written = {"family": "yolov8", "head_format": "yolov8", "names": ["a", "b"], "stride": 32, "imgsz": 64}
    record.write_text(json.dumps({"details": {}, "facts": {**written, "source_sha256": "x"}}))
    assert engine_facts(engine).names == ["a", "b"]


# -- TensorRT, with the fake tensorrt and polygraphy.cuda ---------------------------------------------------------


def fake_engine(tmp_path: Path, names: list[str], head_format: str) -> Path:
    engine = tmp_path / "trt-int8-qdq-abc.engine"
    engine.write_bytes(b"engine bytes")
    facts = {"family": "yolov8", "head_format": head_format, "names": names, "stride": 32, "imgsz": 64}
    engine.with_suffix(".json").write_text(json.dumps({"details": {}, "facts": {**facts, "source_sha256": "x"}}))
    return engine


def yolov8_head(batch: np.ndarray) -> dict[str, np.ndarray]:
    """One box per image at the input's centre (cx 32, cy 32, 16 x 16), class 3 at 0.9; 10 anchors."""
    out = np.zeros((batch.shape[0], 84, 10), np.float32)
    out[:, 0:4, 0] = [32, 32, 16, 16]
    out[:, 4 + 3, 0] = 0.9
    return {OUTPUT: out}


def released(device: FakeDevice) -> bool:
    gc.collect()
    return device.allocated == {} and device.streams_open == 0 and device.alive() == []


def test_a_tensorrt_detector_runs_an_engine_and_frees_the_gpu(monkeypatch, tmp_path):
    device = install(monkeypatch, FakeDevice(compute=yolov8_head, profile=(1, 2, 4)))
    monkeypatch.setattr("yoloq.backends.tensorrt_availability", lambda: Availability(()))
    names = [f"c{i}" for i in range(80)]
    with Detector.load(fake_engine(tmp_path, names, "yolov8"), decoding=DecodeSettings(0.25, 0.6, 10)) as detector:
        assert detector.backend == "tensorrt" and detector.head_format == "yolov8"
        found = detector([np.zeros((128, 128, 3), np.uint8)] * 6)  # batches above the profile's max run in pieces
    assert released(device)
    assert len(found) == 6
    np.testing.assert_allclose(found[0].boxes_xyxy, [[48, 48, 80, 80]])  # 24..40 at scale 0.5
    assert found[0].class_names == ["c3"] and found[0].scores.tolist() == pytest.approx([0.9])


def test_an_engine_with_nms_inside_is_decoded_from_its_four_outputs(monkeypatch, tmp_path):
    def nms_outputs(batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        boxes = np.zeros((n, 5, 4), np.float32)
        boxes[:, 0], boxes[:, 1], boxes[:, 2] = [8, 8, 24, 24], [30, 30, 60, 60], [1, 1, 2, 2]
        scores = np.tile(np.array([0.8, 0.5, 0.7, 0, 0], np.float32), (n, 1))  # row 2: past num_dets
        classes = np.tile(np.array([1, 0, 1, 0, 0], np.int32), (n, 1))
        return {NUM_DETS: np.full((n, 1), 2, np.int32), DET_BOXES: boxes, DET_SCORES: scores, DET_CLASSES: classes}

    outputs = {NUM_DETS: ((1,), "INT32"), DET_BOXES: ((5, 4), "FLOAT"), DET_SCORES: ((5,), "FLOAT")}
    outputs[DET_CLASSES] = ((5,), "INT32")
    device = install(monkeypatch, FakeDevice(compute=nms_outputs, outputs=outputs))
    monkeypatch.setattr("yoloq.backends.tensorrt_availability", lambda: Availability(()))
    with Detector.load(fake_engine(tmp_path, ["a", "b"], "yolov8")) as detector:
        assert detector.head_format == "end2end"  # the runner saw EfficientNMS_TRT's outputs
        (found,) = detector([np.zeros((64, 64, 3), np.uint8)])
    assert released(device)
    assert found.class_names == ["b", "a"]
    np.testing.assert_allclose(found.boxes_xyxy, [[8, 8, 24, 24], [30, 30, 60, 60]])


# -- yoloq predict -------------------------------------------------------------------------------------------------


def image_folder(tmp_path: Path, count: int = 2) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in list_images(VAL_IMAGES)[:count]:
        shutil.copy(path, folder / path.name)
    (folder / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return folder


def test_yoloq_predict_on_a_folder_draws_writes_json_and_counts_unreadable(simplified, tmp_path, capsys):
    folder = image_folder(tmp_path)
    out, json_path, coco_path = tmp_path / "drawn", tmp_path / "d.json", tmp_path / "coco.json"
    args = ["predict", "--model", str(simplified.onnx_path), "--source", str(folder), "--no-progress"]
    assert flows.cli.main([*args, "--save", str(out), "--json", str(json_path), "--coco", str(coco_path)]) == 0
    printed = capsys.readouterr().out
    assert "predict: 2 images" in printed and "1 unreadable (skipped): zz-broken.jpg" in printed
    document = json.loads(json_path.read_text())
    assert [Path(i["file"]).name for i in document["images"]] == [p.name for p in list_images(VAL_IMAGES)[:2]]
    assert document["unreadable"] == ["zz-broken.jpg"] and document["backend"] == "onnxruntime"
    assert all(d["score"] >= 0.25 for i in document["images"] for d in i["detections"])
    with Detector.load(simplified.onnx_path) as detector:  # the JSON holds the detections unrounded
        first = detector([Path(document["images"][0]["file"])])[0]
    written = document["images"][0]["detections"]
    np.testing.assert_array_equal(np.array([d["box"] for d in written], np.float32), first.boxes_xyxy)
    np.testing.assert_array_equal(np.array([d["score"] for d in written], np.float32), first.scores)
    coco = json.loads(coco_path.read_text())
    assert len(coco) == sum(len(i["detections"]) for i in document["images"]) > 0
    assert {row["image_id"] for row in coco} <= {139, 285} and all(1 <= row["category_id"] <= 90 for row in coco)
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in list_images(VAL_IMAGES)[:2]]


def test_yoloq_predict_on_a_video_writes_a_drawn_video(simplified, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    frame = cv2.resize(cv2.imread(str(list_images(VAL_IMAGES)[0])), (320, 240))
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (320, 240))
    for _ in range(3):
        writer.write(frame)
    writer.release()
    args = ["predict", "--model", str(simplified.onnx_path), "--source", str(video), "--no-progress"]
    assert flows.cli.main([*args, "--save", str(tmp_path / "out"), "--json", str(tmp_path / "v.json")]) == 0
    assert "predict: 3 frames" in capsys.readouterr().out
    frames = json.loads((tmp_path / "v.json").read_text())["images"]
    assert [f["frame"] for f in frames] == [0, 1, 2]
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    capture.release()


def test_yoloq_predict_bad_input_exits_2_with_one_line(simplified, tmp_path, capsys):
    folder = image_folder(tmp_path, 0)
    base = ["predict", "--no-progress"]
    assert flows.cli.main([*base, "--model", str(tmp_path / "none.onnx"), "--source", str(folder)]) == 2
    assert "model" in capsys.readouterr().err
    assert flows.cli.main([*base, "--model", str(simplified.onnx_path), "--source", str(folder)]) == 2
    assert "could be read" in capsys.readouterr().err
    assert flows.cli.main([*base, "--model", str(simplified.onnx_path), "--source", str(tmp_path / "x")]) == 2
    (tmp_path / "good").mkdir()
    good = image_folder(tmp_path / "good", 1)
    assert flows.cli.main([*base, "--model", str(simplified.onnx_path), "--source", str(good), "--decode", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "decode gpu runs on the TensorRT backend only" in err and "Traceback" not in err
    missing_store = f"sqlite:///{tmp_path / 'none.db'}"
    uri = ["--model", "models:/yoloq-yolov5n@champion", "--source", str(folder), "--tracking-uri", missing_store]
    assert flows.cli.main([*base, *uri]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store" in err and "Traceback" not in err
    assert not (tmp_path / "none.db").exists()


def test_models_uri_resolves_the_champion_on_a_real_mlflow_store(simplified, tmp_path, capsys, monkeypatch):
    from flows.model_uri import load_detector
    from flows.registry import register_champion
    from yoloq.config import load_params
    from yoloq.report import ShipDecision, VariantResult

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("yoloq", artifact_location=(tmp_path / "artifacts").as_uri())
    params = load_params(PROJECT / "params.yaml")
    onnx_path = tmp_path / "model-fp32.sim.onnx"
    shutil.copy(simplified.onnx_path, onnx_path)
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(onnx_path))
    result = VariantResult("fp32", "fp32", "onnxruntime", 0.33, 0.5, 20.0, 50.0, 8, 7.9, onnx_path)
    register_champion(client, params, ShipDecision("fp32", "fastest"), [result], {"fp32": run_id})

    folder = image_folder(tmp_path, 2)
    base = ["predict", "--no-progress", "--source", str(folder), "--tracking-uri", uri, "-p", str(tmp_path / "none")]
    assert flows.cli.main([*base, "--model", "models:/yoloq-yolov5n@champion", "--json", str(tmp_path / "a.json")]) == 0
    assert flows.cli.main([*base, "--model", str(onnx_path), "--json", str(tmp_path / "b.json")]) == 0
    via_registry = json.loads((tmp_path / "a.json").read_text())["images"]
    assert via_registry == json.loads((tmp_path / "b.json").read_text())["images"]
    assert "version 1 of yoloq-yolov5n" in capsys.readouterr().out

    assert flows.cli.main([*base, "--model", "models:/yoloq-yolov5n@production"]) == 2
    assert "has no alias 'production' (aliases: champion)" in capsys.readouterr().err
    assert flows.cli.main([*base, "--model", "models:/yoloq-other@champion"]) == 2
    assert "no registered model 'yoloq-other'" in capsys.readouterr().err

    # a registered engine: without TensorRT here, `auto` runs the ONNX it was built from (logged beside it): the model
    # before the TensorRT-only surgery (here the uint8-input ONNX TensorRT parsed)
    engine = tmp_path / "trt-int8-qdq-abc.engine"
    engine.write_bytes(b"engine bytes")
    parsed = uint8_input_onnx(onnx_path, tmp_path / "surgery")
    record = {"details": {"source_onnx": str(parsed), "model_onnx": str(onnx_path)}, "build_seconds": 1.0}
    engine.with_suffix(".json").write_text(json.dumps(record))
    engine_run = client.create_run(experiment).info.run_id
    for path in (engine, engine.with_suffix(".json"), onnx_path, parsed):
        client.log_artifact(engine_run, str(path))
    trt = VariantResult("int8", "int8", "tensorrt", 0.33, 0.5, 1.0, 900.0, 32, 3.0, engine)
    register_champion(client, params, ShipDecision("int8", "fastest"), [trt], {"int8": engine_run})
    messages: list[str] = []
    detector = load_detector(
        "models:/yoloq-yolov5n@champion", tracking_uri=uri, cache_dir=tmp_path / "cache", progress=messages.append
    )
    with detector:
        assert detector.backend == "onnxruntime" and detector.model_path.name == onnx_path.name
    assert "running its source ONNX on ONNX Runtime" in messages[-1]
    with pytest.raises(BackendUnavailable, match="TensorRT engine"):
        load_detector("models:/yoloq-yolov5n/2", "tensorrt", tracking_uri=uri, cache_dir=tmp_path / "cache")

    # with TensorRT here (the fakes): the engine runs; one that does not load here is rebuilt from its source ONNX
    install(monkeypatch, FakeDevice())
    monkeypatch.setattr("yoloq.backends.tensorrt_availability", lambda: Availability(()))
    cache = tmp_path / "cache"
    downloaded = cache / "registry" / "yoloq-yolov5n-v2" / engine.name
    downloaded.write_bytes(b"built for another GPU")  # TensorRT cannot deserialize it
    with pytest.raises(InputError, match="implicit INT8 calibrates in TensorRT"):  # int8 from a float ONNX
        load_detector("models:/yoloq-yolov5n/2", tracking_uri=uri, cache_dir=cache)
    fp16 = VariantResult("fp16", "fp16", "tensorrt", 0.33, 0.5, 1.0, 950.0, 32, 3.0, engine)
    register_champion(client, params, ShipDecision("fp16", "fastest"), [fp16], {"fp16": engine_run})
    with load_detector("models:/yoloq-yolov5n@champion", tracking_uri=uri, cache_dir=cache) as detector:
        assert detector.backend == "tensorrt" and detector.model_path.parent.name == "yoloq-yolov5n-v3"
    (cache / "registry" / "yoloq-yolov5n-v3" / engine.name).write_bytes(b"built for another GPU")
    rebuilt = fake_engine(tmp_path, list(COCO80_NAMES), "yolov5")
    built: list[tuple[Path, str]] = []
    monkeypatch.setattr(
        "yoloq.detector.build_engine", lambda onnx, precision, *rest: built.append((onnx, precision)) or rebuilt
    )
    messages.clear()
    with load_detector(
        "models:/yoloq-yolov5n@champion", tracking_uri=uri, cache_dir=cache, progress=messages.append
    ) as detector:
        assert detector.backend == "tensorrt" and detector.model_path == rebuilt
    assert [(p.name, precision) for p, precision in built] == [(onnx_path.name, "fp16")]
    assert "building one from" in messages[-1]


def test_previews_draw_every_variants_validation_detections_side_by_side(exported, simplified, tmp_path):
    from flows.results import preview_images
    from yoloq.backends import BuiltModel
    from yoloq.config import VariantConfig, load_params
    from yoloq.validate import load_validation_set

    params = load_params(PROJECT / "params.yaml", [f"output_dir={tmp_path}", "validation.num_images=3"])
    builds = {name: BuiltModel(VariantConfig(name=name), simplified.onnx_path, 1.0, 0.0) for name in ("fp32", "int8")}
    dataset = load_validation_set(params.validation, 80)
    paths = preview_images(params, builds, ["fp32", "int8"], dataset, exported.facts, tmp_path / "previews")
    assert [p.name for p in paths] == [t.path.with_suffix(".jpg").name for t in dataset.truths[:3]]
    picture = cv2.imread(str(paths[0]))
    original = cv2.imread(str(dataset.truths[0].path))
    assert picture.shape[1] > 2 * picture.shape[0] * original.shape[1] / original.shape[0] * 0.9  # two panels
    params.validation.preview_images = 0
    assert preview_images(params, builds, ["fp32"], dataset, exported.facts, tmp_path / "none") == []


def test_the_end_to_end_benchmark_prints_its_table(simplified, tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    out = tmp_path / "e2e.json"
    argv = ["predict_e2e.py", "--model", str(simplified.onnx_path), "--num-images", "3", "--batches", "1", "2"]
    argv += ["--workers", "0", "2", "--rounds", "1", "--repeats", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(PROJECT / "benchmarks" / "predict_e2e.py"), run_name="__main__")
    assert done.value.code == 0
    assert (
        "| backend | decode | batch | workers | engine ms/img | end-to-end ms/img | ratio | infer in e2e ms/img "
        in capsys.readouterr().out
    )
    rows = json.loads(out.read_text())
    assert [(r["batch"], r["workers"]) for r in rows] == [(1, 0), (1, 2), (2, 0), (2, 2)]
    assert all(r["engine_ms_per_image"] > 0 and r["e2e_images_per_s"] > 0 and r["images"] == 3 for r in rows)
    assert all(0 < r["infer_ms_per_image"] <= r["e2e_ms_per_image"] for r in rows)


NO_MLFLOW = """
import sys
class Block:  # the GPU kit's Python: no MLflow, no Prefect
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "prefect"):
            raise ImportError(f"no module {name} here")
sys.meta_path.insert(0, Block())
import flows.cli
sys.exit(flows.cli.main(["predict", "--no-progress", "--model", sys.argv[1], "--source", sys.argv[2]]))
"""


def test_yoloq_predict_on_a_file_model_needs_no_mlflow_or_prefect(simplified):
    image = str(list_images(VAL_IMAGES)[0])
    done = subprocess.run(
        [sys.executable, "-c", NO_MLFLOW, str(simplified.onnx_path), image],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "predict: 1 image" in done.stdout
