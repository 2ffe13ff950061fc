"""A uint8 input inside the engine (tensorrt.input: uint8) and pinned host buffers in the runner.

The graph surgery runs in ONNX Runtime here: the uint8 model on `letterbox_rgb` frames must give exactly what the
float model gives on validation's float frames. The runner and the detector run on the fake TensorRT."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import VAL_IMAGES
from tests.fake_tensorrt import OUTPUT, FakeDevice, install
from yoloq.backends.tensorrt.build import TensorRTBackend
from yoloq.backends.tensorrt.inputs import onnx_input
from yoloq.backends.tensorrt.nms import has_nms_outputs
from yoloq.backends.tensorrt.runner import TensorRTRunner
from yoloq.backends.tensorrt.uint8_input import add_uint8_input, uint8_input_onnx
from yoloq.backends.tensorrt.versions import BuildPlan
from yoloq.config import TensorRTConfig, VariantConfig
from yoloq.detector import Detector
from yoloq.errors import InputError
from yoloq.export import ModelFacts
from yoloq.heads import DecodeSettings
from yoloq.preprocess import letterbox_rgb, list_images, load_preprocessed, read_image, to_chw_float, to_hwc_uint8


def conv_model() -> onnx.ModelProto:
    """images (batch, 3, 8, 8) -> a 3x3 conv -> output0: channels are told apart, so a wrong order shows."""
    weights = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["output0"], pads=[1, 1, 1, 1])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 2, 8, 8])],
        [numpy_helper.from_array(weights, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def frame_model(elem_type: int) -> onnx.ModelProto:
    """images (batch, 3, 8, 8) -> output0: the frame the model sees."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["output0"])],
        "frame",
        [helper.make_tensor_value_info("images", elem_type, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output0", elem_type, ["batch", 3, 8, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_the_uint8_model_takes_nhwc_rgb_and_computes_the_float_frame_itself():
    model = add_uint8_input(conv_model())
    onnx.checker.check_model(model)
    (image,) = model.graph.input
    assert image.name == "images" and image.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 8, 8, 3]
    assert [n.op_type for n in model.graph.node[:3]] == ["Cast", "Transpose", "Div"]  # TensorRT: a Cast first
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    frames = np.stack([to_chw_float(p) for p in pixels])
    np.testing.assert_array_equal(run(model, pixels), run(conv_model(), frames))
    half = add_uint8_input(frame_model(TensorProto.FLOAT16))  # an FP16-typed model: the host's float16 frame
    assert [n.op_type for n in half.graph.node[:4]] == ["Cast", "Transpose", "Div", "Cast"]
    np.testing.assert_array_equal(run(half, pixels), frames.astype(np.float16))
    np.testing.assert_array_equal(run(add_uint8_input(frame_model(TensorProto.FLOAT)), pixels), frames)


def test_models_the_surgery_cannot_take_are_refused_with_the_reason():
    with pytest.raises(InputError, match="already uint8"):
        add_uint8_input(add_uint8_input(conv_model()))
    two = conv_model()
    two.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    with pytest.raises(InputError, match="one image input"):
        add_uint8_input(two)
    flat = conv_model()
    flat.graph.input[0].type.tensor_type.shape.dim.pop()
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        add_uint8_input(flat)


def test_the_build_input_of_a_uint8_model_is_nhwc(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(add_uint8_input(conv_model()), str(path))
    found = onnx_input(path)
    assert (found.layout, found.channels, found.height, found.width) == ("nhwc", 3, 8, 8)
    assert found.shape(4) == (4, 8, 8, 3)


def test_on_yolov5n_the_uint8_model_gives_exactly_the_float_models_output(simplified, tmp_path):
    paths = list_images(VAL_IMAGES)[:2]
    pixels = np.stack([letterbox_rgb(read_image(p), 640)[0] for p in paths])
    frames = np.stack([load_preprocessed(p, 640)[0] for p in paths])
    np.testing.assert_array_equal(to_hwc_uint8(frames), pixels)  # the two frames hold the same pixels
    uint8_path = uint8_input_onnx(simplified.onnx_path, tmp_path)
    assert uint8_input_onnx(simplified.onnx_path, tmp_path) == uint8_path  # reused by content
    np.testing.assert_array_equal(run(str(uint8_path), pixels), run(str(simplified.onnx_path), frames))


def test_the_build_adds_the_uint8_input_unless_tensorrt_calibrates(simplified, tmp_path):
    backend = TensorRTBackend(TensorRTConfig(input="uint8"), progress=(messages := []).append)
    explicit = BuildPlan(onnx="fp32", fp16_flag=True, int8_flag=False, calibrator=None, strongly_typed=False)
    variant = VariantConfig(name="fp16", precision="fp16", backend="tensorrt")
    source = backend._source_onnx(variant, explicit, simplified.onnx_path, None, tmp_path)
    assert source.name.endswith(".uint8.onnx") and onnx_input(source).layout == "nhwc"
    implicit = BuildPlan(onnx="fp32", fp16_flag=True, int8_flag=True, calibrator="minmax", strongly_typed=False)
    int8 = VariantConfig(name="int8", precision="int8", quantization="implicit", backend="tensorrt")
    assert backend._source_onnx(int8, implicit, simplified.onnx_path, None, tmp_path) == simplified.onnx_path
    assert any("implicit INT8 keeps the float input" in m for m in messages)
    plain = TensorRTBackend(TensorRTConfig())._source_onnx(variant, explicit, simplified.onnx_path, None, tmp_path)
    assert plain == simplified.onnx_path


# -- the runner and the detector on the fake TensorRT ----------------------------------------------------------------


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(b"engine bytes")
    return path


def mean_per_channel(batch: np.ndarray) -> dict[str, np.ndarray]:
    """A fake engine output that depends on every pixel and the channel order: (N, 84, 10) filled per image."""
    means = batch.reshape(batch.shape[0], -1, 3).mean(axis=1)  # NHWC uint8: per-channel means
    out = np.zeros((batch.shape[0], 84, 10), np.float32)
    out[:, :3, 0] = means
    return {OUTPUT: out}


def test_a_uint8_engine_takes_pixels_and_converts_validations_float_frames_exactly(monkeypatch, engine):
    install(monkeypatch, FakeDevice(uint8_input=True, compute=mean_per_channel))
    pixels = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with TensorRTRunner(engine) as runner:
        assert runner.input_layout == "nhwc-uint8" and runner.sample_shape == (64, 64, 3)
        direct = runner.infer(pixels)
        converted = runner.infer(np.stack([to_chw_float(p) for p in pixels]))
        np.testing.assert_array_equal(direct, converted)
        np.testing.assert_allclose(direct[:, :3, 0], pixels.reshape(2, -1, 3).mean(axis=1), rtol=1e-6)
        with pytest.raises(InputError, match=r"uint8 NHWC \(N, 64, 64, 3\)"):
            runner.infer(np.zeros((2, 32, 32, 3), np.uint8))


def test_copies_go_through_pinned_buffers_that_are_freed_and_never_handed_out(monkeypatch, engine):
    device = install(monkeypatch, FakeDevice(uint8_input=True, pinned=True, compute=mean_per_channel))
    pixels = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with TensorRTRunner(engine) as runner:
        assert runner.pinned and len(device.pinned_live) == 2  # input and output, max-batch sized
        staging = runner.input_buffer(3)
        assert staging is not None and staging.shape == (3, 64, 64, 3) and staging.dtype == np.uint8
        np.copyto(staging, pixels)
        filled = runner.infer(staging)  # filled in place: no copy of its own
        again = runner.infer(pixels)
        np.testing.assert_array_equal(filled, again)
        assert not np.shares_memory(filled, again)  # outputs are the caller's, not views of the pinned buffer
        assert runner.input_buffer(runner.max_batch + 1) is None
        second = runner.input_buffer(3, 1)  # one more pinned buffer, for a pipeline's next batch
        assert second is not None and not np.shares_memory(second, staging) and len(device.pinned_live) == 3
        np.copyto(second, pixels)
        np.testing.assert_array_equal(runner.infer(second), filled)
    gc.collect()
    assert device.pinned_live == {} and device.pinned_freed == 3 and device.allocated == {}


def test_without_pinned_memory_the_runner_copies_from_pageable_memory(monkeypatch, engine):
    install(monkeypatch, FakeDevice(compute=lambda b: {OUTPUT: np.full((b.shape[0], 84, 10), 1.0, np.float32)}))
    with TensorRTRunner(engine) as runner:
        assert not runner.pinned and runner.input_buffer(2) is None and runner.input_layout == "nchw-float"
        assert runner.infer(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, 84, 10)


def test_the_detector_sends_uint8_frames_and_finds_what_the_float_path_finds(monkeypatch, engine, tmp_path):
    def head(batch: np.ndarray) -> dict[str, np.ndarray]:  # one box per image, its score from the pixels
        images = batch.astype(np.float32) / 255.0 if batch.dtype == np.uint8 else batch.transpose(0, 2, 3, 1)
        out = np.zeros((batch.shape[0], 84, 10), np.float32)
        out[:, :4, 0] = [32, 32, 16, 16]
        out[:, 4, 0] = 0.3 + 0.5 * images[:, :, :, 0].mean(axis=(1, 2))  # red channel: the order counts
        return {OUTPUT: out}

    facts = ModelFacts("yolov8", "yolov8", [str(i) for i in range(80)], 32, 64, "test")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    images = [*list_images(VAL_IMAGES)[:3], broken, *list_images(VAL_IMAGES)[3:6]]  # batches of 2: one has a gap
    found = {}
    for uint8 in (False, True):
        device = install(monkeypatch, FakeDevice(uint8_input=uint8, pinned=uint8, compute=head, profile=(1, 2, 4)))
        runner = TensorRTRunner(engine)
        with Detector(runner, facts, engine, "tensorrt", DecodeSettings(0.25, 0.6, 300), batch_size=2) as detector:
            assert detector.uint8_frames is uint8
            for workers in (0, 2):
                streamed = [p.detections for p in detector.stream(images, workers=workers)]
                assert streamed[3] is None  # the unreadable image, skipped
                found[uint8, workers] = [(d.boxes_xyxy.tolist(), d.scores.tolist()) for d in streamed if d]
            if uint8:  # letterboxed into pinned buffers 1 and 2 (beside the runner's own input and output)
                assert len(device.pinned_live) == 4
    assert found[True, 0] == found[True, 2] == found[False, 0] == found[False, 2]
    assert len(found[True, 0]) == 6 and all(scores for _, scores in found[True, 0])


def test_letterboxing_into_a_given_buffer_gives_the_same_frame_and_leaves_the_image_alone():
    for path in list_images(VAL_IMAGES)[:4]:
        image = read_image(path)
        before = image.copy()
        expected, box = letterbox_rgb(image, 320)
        slots = np.zeros((2, 320, 320, 3), np.uint8)
        frame, same_box = letterbox_rgb(image, 320, out=slots[1])
        assert frame.ctypes.data == slots[1].ctypes.data and box == same_box
        np.testing.assert_array_equal(slots[1], expected)
        np.testing.assert_array_equal(image, before)
        assert not slots[0].any()


def test_the_pipeline_turns_opencvs_own_threads_off_only_while_it_runs():
    import cv2

    from yoloq.detector import single_threaded_opencv

    before = cv2.getNumThreads()
    with single_threaded_opencv():
        assert cv2.getNumThreads() == 1
    assert cv2.getNumThreads() == before


def test_a_logged_source_that_has_the_surgery_already_is_built_as_it_is(simplified, tmp_path):
    """Rebuilding a registered engine from the ONNX TensorRT parsed (NMS plugin and uint8 input in it) adds
    neither twice; the model before the surgery is what `_model_onnx` names."""
    settings = TensorRTConfig(input="uint8", nms="efficient_nms")
    backend = TensorRTBackend(settings, decoding=DecodeSettings(0.25, 0.6, 100))
    plan = BuildPlan(onnx="fp32", fp16_flag=True, int8_flag=False, calibrator=None, strongly_typed=False)
    variant = VariantConfig(name="fp16", precision="fp16", backend="tensorrt")
    parsed = backend._source_onnx(variant, plan, simplified.onnx_path, None, tmp_path)
    assert parsed.name.endswith(".uint8.onnx") and has_nms_outputs(
        [o.name for o in onnx.load(str(parsed)).graph.output]
    )
    assert backend._model_onnx(variant, plan, simplified.onnx_path, None, tmp_path) == simplified.onnx_path
    assert backend._engine_onnx(variant, plan, parsed, simplified.onnx_path, tmp_path) == parsed


def test_onnx_runtime_runs_a_uint8_model_on_pixels_or_float_frames_alike(simplified, tmp_path):
    uint8_path = uint8_input_onnx(simplified.onnx_path, tmp_path)
    images = list_images(VAL_IMAGES)[:3]
    decoding = DecodeSettings(0.25, 0.6, 300)
    with Detector.load(uint8_path, decoding=decoding, batch_size=2) as pixels:
        assert pixels.uint8_frames and pixels.runner.input_layout == "nhwc-uint8"
        frames = np.stack([load_preprocessed(p, 640)[0] for p in images[:2]])
        np.testing.assert_array_equal(pixels.runner.infer(frames), run(str(simplified.onnx_path), frames))
        found = [(d.boxes_xyxy.tolist(), d.scores.tolist()) for d in pixels(images)]
    with Detector.load(simplified.onnx_path, decoding=decoding, batch_size=2) as floats:
        assert not floats.uint8_frames
        assert [(d.boxes_xyxy.tolist(), d.scores.tolist()) for d in floats(images)] == found
