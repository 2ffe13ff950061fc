"""GPU decoding + letterboxing (`decode="gpu"`): what runs on the CPU here. The nvJPEG decode and the CUDA kernel
itself ran on the H200 (`benchmarks/gpu_letterbox_check.py`, README): here the file triage, the kernel's arithmetic
(its NumPy mirror against OpenCV), the library lookup's message, and the three-stage pipeline of `Detector.stream`
with a fake GPU letterbox on the fake TensorRT runner."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.fake_tensorrt import FakeDevice, install
from tests.test_predict import fake_engine
from yoloq.backends import Availability
from yoloq.backends.tensorrt.gpu_letterbox import (
    EncodedImage,
    GpuDecodeUnavailable,
    JpegBatchRejected,
    encoded_image,
    jpeg_header,
    load_cuda_library,
    reference_letterbox,
)
from yoloq.detector import Detector, gpu_letterbox_for
from yoloq.errors import InputError
from yoloq.heads import DecodeSettings
from yoloq.preprocess import Letterbox, letterbox_fit, letterbox_rgb, list_images, read_image

VAL_IMAGES = Path(__file__).resolve().parents[1] / "data/coco/val/images"


def jpeg(image: np.ndarray, *flags: int) -> bytes:
    ok, data = cv2.imencode(".jpg", image, list(flags))
    assert ok
    return data.tobytes()


def with_orientation(data: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF APP1 segment (little-endian TIFF, IFD0 holding Orientation) right after SOI."""
    tiff = b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little")
    tiff += (0x0112).to_bytes(2, "little") + (3).to_bytes(2, "little") + (1).to_bytes(4, "little")
    tiff += orientation.to_bytes(2, "little") + b"\x00\x00" + (0).to_bytes(4, "little")
    body = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body + data[2:]


def test_only_baseline_colour_jpegs_without_rotation_go_to_nvjpeg(tmp_path):
    colour = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    baseline = jpeg_header(jpeg(colour))
    assert baseline is not None and (baseline.frame, baseline.width, baseline.height) == (0xC0, 80, 48)
    assert baseline.on_gpu
    subsampled = jpeg_header(jpeg(colour, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420))
    assert subsampled is not None and subsampled.sampling[0] == (2, 2) and subsampled.on_gpu
    progressive = jpeg_header(jpeg(colour, cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    assert progressive is not None and progressive.frame == 0xC2 and not progressive.on_gpu
    gray = jpeg_header(jpeg(colour[:, :, 0]))
    assert gray is not None and len(gray.sampling) == 1 and not gray.on_gpu
    rotated = jpeg_header(with_orientation(jpeg(colour), 6))
    assert rotated is not None and rotated.orientation == 6 and not rotated.on_gpu
    upright = jpeg_header(with_orientation(jpeg(colour), 1))
    assert upright is not None and upright.on_gpu
    plain = jpeg(colour)
    adobe = b"Adobe" + b"\x00\x64" + b"\x00\x00" * 2 + b"\x00"  # colour transform 0: RGB as it is
    untransformed = jpeg_header(plain[:2] + b"\xff\xee" + (len(adobe) + 2).to_bytes(2, "big") + adobe + plain[2:])
    assert untransformed is not None and not untransformed.ycbcr and not untransformed.on_gpu
    ok, png = cv2.imencode(".png", colour)
    assert jpeg_header(png.tobytes()) is None and jpeg_header(b"\xff\xd8\xff\xe0\x00") is None
    for image in list_images(VAL_IMAGES):  # the shipped COCO images all take the GPU path
        header = jpeg_header(image.read_bytes())
        assert header is not None and header.on_gpu, image.name

    # what the pipeline's threads hand over: bytes for nvJPEG, else pixels decoded here
    (tmp_path / "a.jpg").write_bytes(jpeg(colour))
    (tmp_path / "b.jpg").write_bytes(jpeg(colour, cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    (tmp_path / "c.png").write_bytes(png.tobytes())
    (tmp_path / "d.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (tmp_path / "e.jpg").write_bytes(jpeg(colour)[:-40])  # no end marker: nvJPEG would decode it, OpenCV does not
    a, b, c = (encoded_image(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.png"))
    assert a is not None and a.data is not None and a.rgb is None and (a.width, a.height) == (80, 48)
    for other in (b, c):
        assert other is not None and other.data is None and other.rgb is not None and other.rgb.shape == (48, 80, 3)
    assert encoded_image(tmp_path / "d.jpg") is None and encoded_image(tmp_path / "missing.jpg") is None
    assert (encoded_image(tmp_path / "e.jpg") is None) == (read_image(tmp_path / "e.jpg") is None)


@pytest.mark.parametrize("size", [640, 512, 333, 64])
def test_the_kernels_arithmetic_is_opencvs_letterbox_within_one_level(size):
    rng = np.random.default_rng(1)
    images = [read_image(p) for p in list_images(VAL_IMAGES)[:6]]
    images += [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(720, 1280, 3), (37, 100, 3), (5, 3, 3)]]
    for bgr in images:
        assert bgr is not None
        expected, mapping = letterbox_rgb(bgr, size)
        frame, box = reference_letterbox(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)
        assert box == mapping and frame.shape == expected.shape
        difference = np.abs(frame.astype(int) - expected.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.02
        if letterbox_fit(bgr.shape[1], bgr.shape[0], size).new_width == bgr.shape[1]:
            assert difference.max() == 0  # no resize: a copy plus the pad


def test_a_machine_without_nvjpeg_gets_one_line_that_says_what_to_do():
    def load(name: str) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    with pytest.raises(GpuDecodeUnavailable, match="--decode cpu"):
        load_cuda_library("nvjpeg", load=load)
    assert load_cuda_library("nvrtc", load=lambda name: name) == "libnvrtc.so.13"


class FakeGpuLetterbox:
    """GpuLetterbox on the fake device: the kernel's arithmetic in NumPy, written into two fake device slots."""

    backend = "fake"

    def __init__(self, imgsz: int, max_batch: int) -> None:
        cuda = sys.modules["polygraphy.cuda"].wrapper()
        self.size, self.max_batch, self._cuda = imgsz, max_batch, cuda
        self.slots = [cuda.malloc(max_batch * imgsz * imgsz * 3) for _ in range(2)]
        self.waits: list[int] = []
        self.closed = False
        self.rejected = 0

    def letterbox(self, images: list[EncodedImage], slot: int) -> list[Letterbox]:
        if not images:
            return []
        if any(image.data is not None and b"corrupt" in image.data for image in images):
            self.rejected += 1
            raise JpegBatchRejected("nvjpegDecodeBatched failed with status 6 on a batch of 3")
        frames, boxes = [], []
        for image in images:
            rgb = (
                image.rgb if image.rgb is not None else cv2.imdecode(np.frombuffer(image.data, np.uint8), 1)[..., ::-1]
            )
            frame, box = reference_letterbox(np.ascontiguousarray(rgb), self.size)
            frames.append(frame)
            boxes.append(box)
        batch = np.ascontiguousarray(np.stack(frames))
        self._cuda.memcpy(self.slots[slot], batch.ctypes.data, batch.nbytes, "h2d")
        return boxes

    def frames(self, slot: int) -> int:
        return self.slots[slot]

    def wait(self, slot: int, stream: int) -> None:
        self.waits.append(slot)

    def close(self) -> None:
        for pointer in self.slots:
            self._cuda.free(pointer)
        self.closed = True


def brightness_head(batch: np.ndarray) -> dict[str, np.ndarray]:
    """One centred box per image whose score is the frame's mean brightness: detections follow the pixels."""
    out = np.zeros((batch.shape[0], 84, 10), np.float32)
    out[:, 0:4, 0] = [32, 32, 16, 16]
    out[:, 4 + 3, 0] = batch.reshape(batch.shape[0], -1).mean(axis=1) / 255.0
    return {"output0": out}


def test_the_gpu_pipeline_gives_the_cpus_detections_in_order_and_skips_unreadable_images(monkeypatch, tmp_path):
    device = install(monkeypatch, FakeDevice(compute=brightness_head, profile=(1, 2, 4), uint8_input=True))
    monkeypatch.setattr("yoloq.backends.tensorrt_availability", lambda: Availability(()))
    made: list[FakeGpuLetterbox] = []

    def fake_gpu(runner: object, imgsz: int) -> FakeGpuLetterbox:
        made.append(FakeGpuLetterbox(imgsz, runner.max_batch))  # type: ignore[attr-defined]
        return made[-1]

    monkeypatch.setattr("yoloq.detector.gpu_letterbox_for", fake_gpu)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff truncated")
    paths = list_images(VAL_IMAGES)[:7]
    truncated = tmp_path / "corrupt.jpg"  # header and end marker fine, data not: nvJPEG rejects the batch
    truncated.write_bytes(paths[0].read_bytes()[:20000] + b"corrupt\xff\xd9")
    sources = [*paths[:3], broken, np.full((30, 50, 3), 200, np.uint8), *paths[3:], truncated]
    engine = fake_engine(tmp_path, [f"c{i}" for i in range(80)], "yolov8")
    decoding = DecodeSettings(0.01, 0.6, 10)
    found = {}
    for decode in ("cpu", "gpu"):
        with Detector.load(engine, decoding=decoding, batch_size=3, decode=decode) as detector:  # type: ignore[arg-type]
            found[decode] = list(detector.stream(sources, keys=range(len(sources)), workers=2))
            if decode == "gpu":  # keep_images decodes on the CPU: the runner binds its own input buffer again
                found["gpu-host"] = list(detector.stream(sources, keys=range(len(sources)), keep_images=True))
    assert made and made[0].closed and device.allocated == {}
    assert [p.key for p in found["gpu"]] == list(range(len(sources)))
    assert found["gpu"][3].detections is None and found["cpu"][3].detections is None
    for cpu, gpu in zip(found["cpu"], found["gpu"], strict=True):
        if cpu.detections is None:
            continue
        assert gpu.detections is not None and (gpu.detections.width, gpu.detections.height) == (
            cpu.detections.width,
            cpu.detections.height,
        )
        np.testing.assert_allclose(gpu.detections.boxes_xyxy, cpu.detections.boxes_xyxy)
        np.testing.assert_allclose(gpu.detections.scores, cpu.detections.scores, atol=2e-3)
    assert sorted(set(made[0].waits)) == [0, 1]  # batches alternate between the two slots
    for cpu, host in zip(found["cpu"], found["gpu-host"], strict=True):
        assert (cpu.detections is None) == (host.detections is None)
        if cpu.detections is not None and host.detections is not None:
            np.testing.assert_array_equal(host.detections.scores, cpu.detections.scores)
    assert made[0].rejected == 1  # the truncated file's batch went to OpenCV, as on the CPU path
    assert (found["gpu"][-1].detections is None) == (found["cpu"][-1].detections is None)


def test_decode_gpu_needs_tensorrt_and_a_uint8_engine(monkeypatch, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    with pytest.raises(InputError, match="TensorRT backend only"):
        Detector.load(model, "onnxruntime", decode="gpu")
    with pytest.raises(InputError, match="cpu or gpu"):
        Detector.load(model, decode="fast")  # type: ignore[arg-type]

    class FloatRunner:
        input_layout = "nchw-float"

    with pytest.raises(InputError, match="tensorrt.input=uint8"):
        gpu_letterbox_for(FloatRunner(), 640)  # type: ignore[arg-type]
