"""Sensitivity analysis, calibration statistics and the MSE range, on the hand-built YOLO-like graphs and real
calibration images; and the candidate Q/DQ models written from one set of statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.test_quantize import CALIB_IMAGES, SIZE, _calibration_loader, yolov5_like, yolov8_like
from yoloq.calibrate import calibration_statistics, write_qdq_model
from yoloq.config import CalibrationConfig
from yoloq.errors import InputError
from yoloq.quant.graph import analyze_head, quantizable_convs
from yoloq.quant.placement import calibration_tensors
from yoloq.quant.ranges import amax_for, mse_amax
from yoloq.quant.statistics import TensorStats, collect_stats
from yoloq.sensitivity import (
    analyze_sensitivity,
    detection_error,
    head_output_names,
    layer_sensitivity,
    relative_error,
    sensitivity_plot,
    sensitivity_table,
)


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model)


def test_mse_amax_clips_a_long_tail_but_keeps_a_uniform_range() -> None:
    uniform = np.full(2048, 100, np.int64)
    assert mse_amax(uniform, 4.0) == pytest.approx(4.0, rel=0.01)  # nothing to gain by clipping
    tail = np.zeros(2048, np.int64)
    tail[:100] = 10_000  # almost everything below 5% of the max ...
    tail[-1] = 1  # ... and one outlier at the max
    assert mse_amax(tail, 10.0) < 2.0
    assert mse_amax(np.zeros(2048, np.int64), 3.0) == 3.0


def test_statistics_serve_every_algorithm_and_round_trip(tmp_path: Path) -> None:
    model = _prepared(yolov5_like())
    head = analyze_head(model)
    tensors = calibration_tensors(model, head)
    assert "images" in tensors  # the stem's input: calibrated even though the default keeps the stem float
    stats = collect_stats(model, tensors, _calibration_loader(CALIB_IMAGES, 4), "images")
    assert stats.images == 4
    loaded = TensorStats.load(stats.save(tmp_path / "stats.npz"))
    assert loaded.amax == stats.amax and loaded.images == 4
    for name, hist in stats.hists.items():
        assert np.array_equal(loaded.hists[name], hist)
    ranges = {algorithm: amax_for(loaded, algorithm, 99.9) for algorithm in ("minmax", "percentile", "mse", "entropy")}
    for algorithm, amax in ranges.items():
        for name in tensors:
            assert 0 < amax[name] <= stats.amax[name] * (1 + 1e-6), (algorithm, name)
    with pytest.raises(InputError, match="unknown"):
        amax_for(loaded, "kl", 99.9)


def test_layer_sensitivity_ranks_every_quantizable_conv() -> None:
    model = _prepared(yolov8_like())
    head = analyze_head(model)
    stats = collect_stats(model, calibration_tensors(model, head), _calibration_loader(CALIB_IMAGES, 2), "images")
    images = next(iter(_calibration_loader(CALIB_IMAGES, 2)))["images"]
    ranking = layer_sensitivity(model, head, stats.amax, images, "images", "end2end")  # no decoded boxes here
    assert sorted(r.node for r in ranking) == sorted(quantizable_convs(model, head))
    assert "dfl/conv" not in {r.node for r in ranking}  # part of the decoding tail, never quantized
    gains = [r.gain for r in ranking]
    assert gains == sorted(gains, reverse=True) and gains[0] > 0 and all(g <= 1.0 for g in gains)
    assert head_output_names(model, head) == ["head/box_out0", "head/cls_out0"]
    table = sensitivity_table(ranking, [ranking[0].node], limit=3)
    assert table.count("\n") == 5 and "| yes |" in table


def test_relative_error_is_zero_for_equal_outputs() -> None:
    a = [np.linspace(-5, 5, 50, dtype=np.float32)]
    assert relative_error(a, a) == 0.0
    assert relative_error([a[0] + 0.1], a) > 0


def test_detection_error_weighs_confident_boxes_relative_to_their_size() -> None:
    rng = np.random.default_rng(0)
    v5 = np.zeros((1, 100, 7), np.float32)  # cx, cy, w, h, objectness, 2 classes
    v5[0, :, :2] = rng.uniform(0, 640, (100, 2))
    v5[0, :, 2:4] = rng.uniform(10, 100, (100, 2))
    v5[0, :30, 4:] = 0.9  # 30 confident predictions (score 0.81)
    assert detection_error(v5, v5, "yolov5") == 0.0
    shifted = v5.copy()
    shifted[0, :, 0] += shifted[0, :, 2] * 0.1  # every centre moved by 10 % of the width
    assert detection_error(shifted, v5, "yolov5") > 0.01
    background = v5.copy()
    background[0, 30:, :4] += 50.0  # unconfident predictions do not count
    assert detection_error(background, v5, "yolov5") == 0.0
    v8 = np.swapaxes(v5[..., [0, 1, 2, 3, 5, 6]], 1, 2)  # (N, 4 + nc, A)
    assert detection_error(np.swapaxes(shifted[..., [0, 1, 2, 3, 5, 6]], 1, 2), v8, "yolov8") > 0.01


def test_candidates_from_one_set_of_statistics(tmp_path: Path) -> None:
    """Statistics are collected once; each (algorithm, float convs) candidate is its own cached Q/DQ model."""
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    config = CalibrationConfig(images=CALIB_IMAGES, num_images=6, min_images=2, batch_size=2)
    stats = calibration_statistics(fp32, "images", SIZE, config, [], tmp_path / "cal", num_images=3)
    assert not stats.reused and len(stats.images.images) == 3
    again = calibration_statistics(fp32, "images", SIZE, config, [], tmp_path / "cal", num_images=3)
    assert again.reused and again.key == stats.key
    default = write_qdq_model(fp32, stats, "minmax", 99.9, None, tmp_path / "cal", SIZE)
    assert default.float_nodes == ["stem", "head"] and not default.reused
    all_int8 = write_qdq_model(fp32, stats, "mse", 99.9, [], tmp_path / "cal", SIZE)
    assert all_int8.float_nodes == [] and all_int8.path != default.path
    assert write_qdq_model(fp32, stats, "mse", 99.9, [], tmp_path / "cal", SIZE).reused
    x = next(iter(_calibration_loader(CALIB_IMAGES, 1)))["images"]
    for model in (default, all_int8):
        out = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
        assert out.shape[-1] == 7
    with pytest.raises(InputError, match="not quantizable"):
        write_qdq_model(fp32, stats, "minmax", 99.9, ["decode/sigmoid"], tmp_path / "cal", SIZE)
    report = analyze_sensitivity(fp32, stats, "minmax", 99.9, 2, SIZE, "yolov5", tmp_path / "cal")
    assert {r.node for r in report.layers} == {"stem", "block", "head"} and not report.reused
    assert analyze_sensitivity(fp32, stats, "minmax", 99.9, 2, SIZE, "yolov5", tmp_path / "cal").reused
    plot = sensitivity_plot(report.layers, tmp_path / "s.png", "test", ["head"])
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_two_runs_in_fresh_folders_write_identical_qdq_models(tmp_path: Path) -> None:
    """Same model, images and settings: the same statistics, scales and Q/DQ bytes, wherever they are written."""
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    config = CalibrationConfig(images=CALIB_IMAGES, num_images=4, min_images=2, batch_size=2)
    written = []
    for run in ("first", "second"):
        stats = calibration_statistics(fp32, "images", SIZE, config, [], tmp_path / run, num_images=4)
        assert not stats.reused
        written.append(write_qdq_model(fp32, stats, "mse", 99.99, [], tmp_path / run, SIZE))
    assert written[0].path.name == written[1].path.name
    assert written[0].path.read_bytes() == written[1].path.read_bytes()
    assert written[0].manifest_path.read_bytes() == written[1].manifest_path.read_bytes()


def _region_matches_the_whole_model(model: onnx.ModelProto, names: list[str], size: int) -> dict[str, float]:
    """Each leave-one-out model of `names` run from its changed region on gives the whole model's output; returns
    each region's share of the model's nodes."""
    from yoloq.backends.onnxruntime import qdq_session, session_options
    from yoloq.quant.placement import place_qdq
    from yoloq.quant.qdq import insert_qdq
    from yoloq.sensitivity import _session, changed_region, region_base, with_value_info

    head = analyze_head(model)
    loader = _calibration_loader(CALIB_IMAGES, 2, size=size)
    amax = collect_stats(model, calibration_tensors(model, head), loader, "images").amax
    images = next(iter(loader))["images"]
    output = model.graph.output[0].name
    base = region_base(insert_qdq(model, place_qdq(model, head, []), amax))
    shares = {}
    for name in names:
        variant = insert_qdq(model, place_qdq(model, head, [name]), amax)
        region = changed_region(base, variant, [output])
        assert region.outputs == [output]
        shares[name] = len(region.model.graph.node) / len(variant.graph.node)
        fed = [t for t in region.inputs if t != "images"]
        values = {"images": images}
        if fed:
            base_session = _session(with_value_info(base, fed), fed)
            values |= dict(zip(fed, base_session.run(fed, {"images": images}), strict=True))
        partial = qdq_session(region.model, session_options()).run([output], {t: values[t] for t in region.inputs})
        whole = qdq_session(variant, session_options()).run([output], {"images": images})
        np.testing.assert_allclose(partial[0], whole[0], rtol=1e-5, atol=1e-4)
    return shares


def test_a_leave_one_out_model_runs_from_its_float_conv_on_with_the_same_outputs() -> None:
    model = _prepared(yolov5_like())
    convs = quantizable_convs(model, analyze_head(model))
    shares = _region_matches_the_whole_model(model, convs, SIZE)
    assert shares[convs[0]] == 1.0 and shares[convs[-1]] < 0.5  # the stem: all of it; a head conv: its tail


def test_on_yolov5n_the_regions_give_the_whole_models_outputs(exported) -> None:
    from yoloq.quant.graph import prepare_model

    model = prepare_model(exported.onnx_path)
    convs = quantizable_convs(model, analyze_head(model))
    # the stem, a conv in a residual bottleneck, one that feeds a Concat, a head conv
    names = [convs[0], "/model.2/m/m.0/cv1/conv/Conv", "/model.2/cv2/conv/Conv", convs[-1]]
    shares = _region_matches_the_whole_model(model, names, 640)
    assert shares[convs[0]] == 1.0 and shares[convs[-1]] < 0.2


def test_a_variant_that_changes_nothing_has_no_region() -> None:
    from yoloq.sensitivity import changed_region, region_base

    model = _prepared(yolov5_like())
    region = changed_region(region_base(model), model, [model.graph.output[0].name])
    assert region.outputs == [] and len(region.model.graph.node) == 0
