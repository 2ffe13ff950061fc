"""The integer-exact simulation of Q/DQ models (yoloq.quant.simulate): the same numbers whatever kernels run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import yoloq.quant.simulate as simulate
from tests.test_quantize import CALIB_IMAGES, _calibration_loader, quantize, yolov5_like, yolov8_like
from yoloq.backends.onnxruntime import EXACT_DISABLED_OPTIMIZERS, OnnxRuntimeRunner
from yoloq.quant.simulate import integer_exact

LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def _run(model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(
        model.SerializeToString(), options, ["CPUExecutionProvider"], disabled_optimizers=EXACT_DISABLED_OPTIMIZERS
    )
    return session.run(None, {"images": x})[0]


def _images(count: int = 3) -> np.ndarray:
    return next(iter(_calibration_loader(CALIB_IMAGES, count)))["images"]


def test_quantized_and_float_convs_are_rewritten(tmp_path: Path) -> None:
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    written = quantize(fp32, _calibration_loader(CALIB_IMAGES, 5), "minmax", tmp_path / "v5.int8.onnx")
    rewrite = integer_exact(onnx.load(str(written.path)))
    onnx.checker.check_model(rewrite.model)
    assert rewrite.exact == ("block",)  # the INT8 conv
    assert rewrite.fixed_point == ("stem",)  # float, and its output is quantized for the block conv
    assert rewrite.inexact == ()  # the head conv feeds no quantizer: it stays as it is
    assert not any(n.name == "block" for n in rewrite.model.graph.node)
    assert any(n.name == "head" for n in rewrite.model.graph.node)


def test_the_same_outputs_with_every_kernel_choice_and_close_to_the_model_as_written(tmp_path: Path) -> None:
    for name, model, floats in (("v5", yolov5_like(), None), ("v8", yolov8_like(), [])):
        fp32 = tmp_path / f"{name}.onnx"
        onnx.save(model, fp32)
        written = quantize(fp32, _calibration_loader(CALIB_IMAGES, 5), "minmax", tmp_path / f"{name}.q.onnx", floats)
        qdq = onnx.load(str(written.path))
        exact = integer_exact(qdq).model
        x = _images()
        outputs = [_run(exact, x, level) for level in LEVELS]
        # equal up to the last bits of the float head convs, which feed no quantizer (nothing can flip after them)
        assert np.abs(outputs[0] - outputs[1]).max() <= 1e-6 * np.abs(outputs[0]).max(), name
        as_written = _run(qdq, x, LEVELS[0])
        assert np.abs(outputs[0] - as_written).max() <= 0.02 * np.abs(as_written).max() + 1e-6


def test_an_int8_conv_is_an_exact_integer_sum_scaled_once(tmp_path: Path) -> None:
    fp32 = tmp_path / "v8.onnx"
    onnx.save(yolov8_like(), fp32)
    written = quantize(fp32, _calibration_loader(CALIB_IMAGES, 5), "minmax", tmp_path / "v8.q.onnx", [])
    rewrite = integer_exact(onnx.load(str(written.path)))
    assert "stem" in rewrite.exact  # the image input is quantized too: every conv is an integer sum
    inits = {i.name: numpy_helper.to_array(i) for i in rewrite.model.graph.initializer}
    weights = inits["stem_exact_weights"]
    assert np.array_equal(weights, np.round(weights)) and np.abs(weights).max() <= 127


def test_a_conv_whose_sum_could_exceed_2_24_keeps_the_float_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    written = quantize(fp32, _calibration_loader(CALIB_IMAGES, 5), "minmax", tmp_path / "v5.q.onnx", [])
    qdq = onnx.load(str(written.path))
    for init in qdq.graph.initializer:
        if init.name.startswith("block.w") and init.name.endswith("_quantized"):
            # 8 x 3 x 3 = 72 terms per output: 128 * 127 * 72 < 2^24, still exact
            big = np.full(numpy_helper.to_array(init).shape, 127, np.int8)
            init.CopyFrom(numpy_helper.from_array(big, init.name))
    assert "block" in integer_exact(qdq).exact
    monkeypatch.setattr(simulate, "EXACT_LIMIT", 128.0 * 127 * 72)  # a limit this conv's worst case reaches
    assert "block" in integer_exact(qdq).inexact


def test_the_runner_evaluates_the_exact_simulation(tmp_path: Path) -> None:
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    written = quantize(fp32, _calibration_loader(CALIB_IMAGES, 5), "minmax", tmp_path / "v5.q.onnx")
    x = _images()
    with OnnxRuntimeRunner(written.path) as runner:
        got = runner.infer(x)
    reference = _run(integer_exact(onnx.load(str(written.path))).model, x, LEVELS[1])
    assert np.abs(got - reference).max() <= 1e-6 * np.abs(reference).max()


def test_an_all_int8_model_is_bit_identical_with_every_kernel_choice(tmp_path: Path) -> None:
    fp32 = tmp_path / "v5.onnx"
    onnx.save(yolov5_like(), fp32)
    written = quantize(fp32, _calibration_loader(CALIB_IMAGES, 5), "minmax", tmp_path / "v5.q.onnx", [])
    exact = integer_exact(onnx.load(str(written.path)))
    assert set(exact.exact) == {"stem", "block", "head"}
    x = _images()
    first, second = (_run(exact.model, x, level) for level in LEVELS)
    assert np.array_equal(first, second)
