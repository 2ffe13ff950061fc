"""Run a model on images, for a service or `yoloq predict`: `Detector.load(path)`, then `detector(images)`.

    with Detector.load("model.onnx") as detector:            # or an engine built by yoloq (TensorRT)
        for found in detector(["a.jpg", frame_bgr]):           # paths or BGR uint8 arrays, batched
            print(found.boxes_xyxy, found.scores, found.class_names)

Preprocessing and decoding are validation's own (`yoloq.preprocess.letterbox`, then `yoloq.validate.decode_frames`:
the head's decoder, class-aware NMS), so a model predicts exactly the detections it was validated with. Model facts
(head format, class names, input size) come from the ONNX metadata the export stage writes, or for an engine from its
build record (`<engine>.json`, written by the TensorRT backend). An engine with a uint8 input (`tensorrt.input:
uint8`) gets `letterbox_rgb`'s frames, letterboxed straight into the runner's pinned input buffers: the same
pixels without the host's float conversion. The detector is a context manager: leaving it frees the runner (a
TensorRT runner's GPU memory). `models:/NAME@champion` URIs are resolved by
`flows.model_uri.load_detector` (the core package does not import MLflow).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from yoloq.artifacts import read_json
from yoloq.backends.base import Runner
from yoloq.config import TensorRTConfig, VariantConfig
from yoloq.errors import InputError
from yoloq.export import ModelFacts, facts_for_onnx
from yoloq.heads import DecodeSettings, Detections, HeadFormat
from yoloq.labels import COCO80_NAMES, COCO80_TO_COCO91
from yoloq.preprocess import Letterbox, letterbox, letterbox_rgb, read_image
from yoloq.validate import decode_frames

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
PredictBackend = Literal["auto", "onnxruntime", "tensorrt"]
ImageSource = Path | str | np.ndarray
"""An image file, or a decoded image: BGR uint8 H x W x 3 (OpenCV's layout) or H x W grayscale."""


@dataclass(frozen=True)
class ImageDetections:
    """Detections of one image, in its original pixels: boxes (n, 4) float32 x1 y1 x2 y2, scores (n,) float32,
    class ids (n,) int64 and their names, best score first."""

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: list[str]
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.scores)

    def as_detections(self) -> Detections:
        """The same detections as yoloq.heads.Detections (what validation scores)."""
        return Detections(self.boxes_xyxy, self.scores, self.class_ids)

    def to_json(self) -> list[dict[str, Any]]:
        """One dict per detection: box [x1, y1, x2, y2] (pixels), score, class_id, class_name. Box and score are
        not rounded: rounding boxes to 0.01 px moved yolov5n's mAP50-95 on data/coco/val by 0.0004."""
        return [
            {"box": [float(v) for v in box], "score": float(score), "class_id": int(cls)} | {"class_name": name}
            for box, score, cls, name in zip(
                self.boxes_xyxy, self.scores, self.class_ids, self.class_names, strict=True
            )
        ]


@dataclass(frozen=True)
class Prediction:
    """One input of `Detector.stream`: what it was (`key`), its decoded image when asked for (BGR), and its
    detections; detections None: the image could not be read (skipped)."""

    key: Any
    image: np.ndarray | None
    detections: ImageDetections | None


@dataclass(frozen=True)
class _Prepared:
    image: np.ndarray | None  # None: decoded on the GPU (`decode="gpu"`)
    frame: np.ndarray | None  # what the runner takes: C x H x W float32, or H x W x 3 RGB uint8 (uint8 input)
    box: Letterbox


class Detector:
    """A loaded model plus validation's preprocessing and decoding. Build it with `Detector.load`."""

    def __init__(
        self,
        runner: Runner,
        facts: ModelFacts,
        model_path: Path,
        backend: str,
        decoding: DecodeSettings | None = None,
        batch_size: int = 8,
        head_format: HeadFormat | None = None,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch size {batch_size}: it must be at least 1")
        self.runner = runner
        self.facts = facts
        self.model_path = model_path
        self.backend = backend
        self.decoding = decoding or DecodeSettings()
        self.batch_size = batch_size
        self.head_format: HeadFormat = head_format or facts.head_format
        self.uint8_frames = getattr(runner, "input_layout", "nchw-float") == "nhwc-uint8"
        self.gpu_letterbox: Any = None  # `load(decode="gpu")`: a gpu_letterbox.GpuLetterbox on the runner's stream

    @classmethod
    def load(
        cls,
        model: Path | str,
        backend: PredictBackend = "auto",
        *,
        decoding: DecodeSettings | None = None,
        batch_size: int = 8,
        imgsz: int = 640,
        precision: Literal["fp32", "fp16"] = "fp32",
        build_dir: Path = Path("runs/cache/build"),
        tensorrt: TensorRTConfig | None = None,
        decode: Literal["cpu", "gpu"] = "cpu",
    ) -> Detector:
        """Load an ONNX model (ONNX Runtime; `backend="tensorrt"` builds an engine from it on this GPU, in
        `precision` unless it is a Q/DQ INT8 model, reused from `build_dir`) or an engine built by yoloq (TensorRT).
        `auto`: an engine runs on TensorRT, an ONNX model on ONNX Runtime. `tensorrt`: the settings of
        such builds (default: TensorRTConfig's defaults). Missing or unusable models raise InputError,
        a backend that cannot run here BackendUnavailable (both say what to do). `decode="gpu"`: JPEGs are decoded
        and letterboxed on the GPU (nvJPEG, `yoloq.backends.tensorrt.gpu_letterbox`), for an engine with a uint8
        input (`tensorrt.input: uint8`). Measured on the H200: nvJPEG gave OpenCV's pixels for 4:4:4 JPEGs (all of
        COCO's) and slightly different chroma for 4:2:0 ones; the resize is OpenCV's within 1 level."""
        if decode not in ("cpu", "gpu"):
            raise InputError(f"decode {decode!r}: use cpu or gpu")
        if str(model).startswith("models:/"):
            raise InputError(
                f"{model}: registry URIs are resolved by flows.model_uri.load_detector (it needs MLflow) or by "
                "`yoloq predict`; Detector.load takes a file"
            )
        path = Path(model)
        if not path.is_file():
            raise InputError(f"model {path} not found: give an .onnx model, an engine built by yoloq, or a path")
        is_engine = path.suffix.lower() in ENGINE_SUFFIXES
        if not is_engine and path.suffix.lower() != ".onnx":
            raise InputError(f"model {path}: predict takes an .onnx model or a TensorRT engine built by yoloq")
        chosen = backend if backend != "auto" else ("tensorrt" if is_engine else "onnxruntime")
        if is_engine and chosen != "tensorrt":
            raise InputError(f"{path} is a TensorRT engine: it runs on backend tensorrt only; use its ONNX model")
        if decode == "gpu" and chosen != "tensorrt":
            raise InputError("decode gpu runs on the TensorRT backend only: give an engine or --backend tensorrt")
        if chosen == "onnxruntime":
            from yoloq.backends.onnxruntime import OnnxRuntimeRunner

            facts = facts_for_onnx(path, imgsz)  # may raise: before the runner exists
            return cls(OnnxRuntimeRunner(path), facts, path, "onnxruntime", decoding, batch_size)
        require_tensorrt()
        engine = path if is_engine else build_engine(path, precision, build_dir, tensorrt, decoding)
        facts = engine_facts(engine, imgsz)
        runner = tensorrt_runner(engine)
        head_format: HeadFormat = "end2end" if getattr(runner, "has_nms", False) else facts.head_format
        detector = cls(runner, facts, engine, "tensorrt", decoding, batch_size, head_format)
        if decode == "gpu":
            try:
                detector.gpu_letterbox = gpu_letterbox_for(runner, facts.imgsz)
            except BaseException:
                detector.close()
                raise
        return detector

    # -- the context manager -------------------------------------------------------------------------------------

    def __enter__(self) -> Detector:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Free the GPU letterbox (`decode="gpu"`), then the runner (a TensorRT runner's device memory). Safe to
        call twice."""
        gpu, self.gpu_letterbox = self.gpu_letterbox, None
        if gpu is not None:
            gpu.close()  # before the runner: its stream and context
        runner, self.runner = self.runner, None  # type: ignore[assignment]
        close = getattr(runner, "close", None)
        if close is not None:
            close()

    # -- detection -----------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return self.facts.names

    @property
    def imgsz(self) -> int:
        return self.facts.imgsz

    def __call__(self, images: Sequence[ImageSource]) -> list[ImageDetections]:
        """Detections of each image, in order, in batches of `batch_size`. An unreadable image raises InputError
        (`stream` skips it instead)."""
        results = []
        for index, found in enumerate(self.stream(images)):
            if found.detections is None:
                raise InputError(f"image {index} ({_describe(images[index])}) is unreadable: remove or replace it")
            results.append(found.detections)
        return results

    def stream(
        self,
        images: Iterable[ImageSource],
        keys: Iterable[Any] | None = None,
        workers: int = 0,
        keep_images: bool = False,
    ) -> Iterator[Prediction]:
        """Detections of each image as it comes (batched), for folders and videos: an unreadable image yields a
        Prediction without detections. With `workers` > 0, that many threads read and letterbox the next batch and
        decode (+ NMS) the previous one while this thread runs inference (OpenCV releases the GIL), so the CPU
        work does not starve a GPU; the detections are the same either way. With `decode="gpu"` the files are
        decoded and letterboxed on the GPU (`_stream_gpu`), except with `keep_images`, which needs them on the host."""
        keyed = zip(keys, images, strict=False) if keys is not None else enumerate(images)
        if self.gpu_letterbox is not None and not keep_images:
            yield from self._stream_gpu(keyed, workers)
            return
        if workers <= 0:
            for chunk in _chunks(keyed, self.batch_size):
                slots = self._slots(len(chunk), 1)  # not the runner's staging buffer 0: _infer may stack into it
                prepared = [self._prepare(image, slots, i) for i, (_, image) in enumerate(chunk)]
                readable = [p for p in prepared if p is not None]
                output = self._infer(readable, slots) if readable else None
                yield from _emit(chunk, prepared, self._decode(output, readable) if readable else [], keep_images)
            return
        # Three stages: threads read + letterbox batch k+1 and decode + NMS batch k-1 while batch k is inferred here
        # (the runner is only ever called from this thread). A uint8-input engine's frames are letterboxed straight
        # into pinned buffers 1 and 2, one per batch in flight, which the runner copies to the GPU as they are.
        with single_threaded_opencv(), ThreadPoolExecutor(workers, thread_name_prefix="yoloq-predict") as pool:
            turn = itertools.count()

            def submit(chunk: list[tuple[Any, ImageSource]] | None) -> Any:
                if chunk is None:
                    return None
                slots = self._slots(len(chunk), 1 + next(turn) % 2)
                return chunk, slots, [pool.submit(self._prepare, image, slots, i) for i, (_, image) in enumerate(chunk)]

            chunks = _chunks(keyed, self.batch_size)
            pending = submit(next(chunks, None))
            decoding: tuple[Any, list[_Prepared | None], Future[list[ImageDetections]] | None] | None = None
            while pending is not None:
                chunk, slots, futures = pending
                pending = submit(next(chunks, None))  # one batch ahead
                prepared = [future.result() for future in futures]
                readable = [p for p in prepared if p is not None]
                output = self._infer(readable, slots) if readable else None
                if decoding is not None:
                    yield from _emit(decoding[0], decoding[1], _result(decoding[2]), keep_images)
                decoded = pool.submit(self._decode, output, readable) if output is not None else None
                decoding = (chunk, prepared, decoded)
            if decoding is not None:
                yield from _emit(decoding[0], decoding[1], _result(decoding[2]), keep_images)

    def _stream_gpu(self, keyed: Iterable[tuple[Any, ImageSource]], workers: int) -> Iterator[Prediction]:
        """`stream` with decoding and letterboxing on the GPU, three batches in flight: threads read batch k+2's
        files (JPEG bytes; other files are decoded on the CPU), one thread queues nvJPEG and the letterbox kernel for
        batch k+1 on their own stream, and this thread runs the engine on batch k on its stream, which waits only
        for batch k's frames; threads then decode + NMS its output."""
        from yoloq.backends.tensorrt.gpu_letterbox import (
            EncodedImage,
            JpegBatchRejected,
            decoded_on_cpu,
            encoded_image,
            from_bgr,
        )

        def read(image: ImageSource) -> EncodedImage | None:
            if isinstance(image, str | Path):
                return encoded_image(Path(image)) if Path(image).is_file() else None
            decoded = as_bgr(image)
            return from_bgr(decoded) if decoded is not None else None

        gpu = self.gpu_letterbox
        size = min(self.batch_size, gpu.max_batch)
        turn = itertools.count()
        with (
            ThreadPoolExecutor(max(workers, 1), thread_name_prefix="yoloq-predict") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="yoloq-nvjpeg") as gpu_thread,
        ):
            chunks = _chunks(keyed, size)

            def read_ahead() -> Any:
                chunk = next(chunks, None)
                return None if chunk is None else (chunk, [pool.submit(read, image) for _, image in chunk])

            def letterbox(reading: Any) -> Any:
                """Queue one read batch on the GPU: (chunk, prepared, readable count, slot)."""
                if reading is None:
                    return None
                chunk, futures = reading
                encoded = [future.result() for future in futures]
                slot = next(turn) % 2
                try:
                    boxes = iter(gpu.letterbox([e for e in encoded if e is not None], slot))
                except JpegBatchRejected:  # a broken file in the batch: OpenCV decodes it (or skips it, unreadable)
                    encoded = [decoded_on_cpu(e) if e is not None else None for e in encoded]
                    boxes = iter(gpu.letterbox([e for e in encoded if e is not None], slot))
                readable = [e for e in encoded if e is not None]
                prepared = [_Prepared(None, None, next(boxes)) if e is not None else None for e in encoded]
                return chunk, prepared, len(readable), slot

            reading = read_ahead()
            following = gpu_thread.submit(letterbox, reading)
            reading = read_ahead()
            decoding: tuple[Any, list[_Prepared | None], Future[list[ImageDetections]] | None] | None = None
            while (queued := following.result()) is not None:
                chunk, prepared, count, slot = queued
                following = gpu_thread.submit(letterbox, reading)  # batch k+1 is decoded while batch k is inferred
                reading = read_ahead()
                decoded = None
                if count:
                    if self.runner is None:
                        raise RuntimeError("the detector is closed")
                    gpu.wait(slot, self.runner.stream_ptr)  # type: ignore[attr-defined]
                    output = self.runner.infer_device(count, gpu.frames(slot))  # type: ignore[attr-defined]
                    decoded = pool.submit(self._decode, output, [p for p in prepared if p is not None])
                if decoding is not None:
                    yield from _emit(decoding[0], decoding[1], _result(decoding[2]), False)
                decoding = (chunk, prepared, decoded)
            if decoding is not None:
                yield from _emit(decoding[0], decoding[1], _result(decoding[2]), False)

    def _slots(self, count: int, index: int) -> np.ndarray | None:
        """Pinned input buffer `index` of the runner for `count` uint8 frames, or None (float frames, no pinned
        memory, a batch above the engine's max)."""
        input_buffer = getattr(self.runner, "input_buffer", None)
        if not self.uint8_frames or input_buffer is None:
            return None
        slots = input_buffer(count, index)
        return slots if slots is not None and slots.shape[1:] == (self.imgsz, self.imgsz, 3) else None

    def _prepare(self, image: ImageSource, slots: np.ndarray | None, index: int) -> _Prepared | None:
        return _prepare(image, self.imgsz, self.uint8_frames, slots[index] if slots is not None else None)

    def _infer(self, prepared: list[_Prepared], slots: np.ndarray | None = None) -> np.ndarray:
        """One batch through the runner: the pinned `slots` the frames were letterboxed into when every image of the
        batch was readable, else the frames stacked (into the runner's pinned staging buffer when it has one)."""
        if self.runner is None:
            raise RuntimeError("the detector is closed")
        if slots is not None and len(prepared) == len(slots):
            return self.runner.infer(slots)
        frames = [p.frame for p in prepared if p.frame is not None]
        input_buffer = getattr(self.runner, "input_buffer", None)
        staging = input_buffer(len(frames)) if input_buffer is not None else None
        if staging is not None and staging.shape[1:] == frames[0].shape and staging.dtype == frames[0].dtype:
            return self.runner.infer(np.stack(frames, out=staging))
        return self.runner.infer(np.stack(frames))

    def _decode(self, output: np.ndarray, prepared: list[_Prepared]) -> list[ImageDetections]:
        detections = decode_frames(output, [p.box for p in prepared], self.head_format, self.decoding)
        return [self._typed(d, p.box) for d, p in zip(detections, prepared, strict=True)]

    def _typed(self, found: Detections, box: Letterbox) -> ImageDetections:
        names = self.facts.names
        class_names = [names[c] if 0 <= c < len(names) else str(c) for c in found.classes.tolist()]
        return ImageDetections(
            found.boxes_xyxy, found.scores, found.classes, class_names, box.original_width, box.original_height
        )


@contextlib.contextmanager
def single_threaded_opencv() -> Iterator[None]:
    """OpenCV's own thread pool off while the pipeline's threads letterbox (restored after): each resize and colour
    swap would otherwise fan out over every core from every worker at once."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _emit(
    chunk: list[tuple[Any, ImageSource]],
    prepared: list[_Prepared | None],
    detections: list[ImageDetections],
    keep_images: bool,
) -> Iterator[Prediction]:
    """One Prediction per input of `chunk`, in order; `detections` are those of its readable images."""
    found = iter(detections)
    for (key, _), item in zip(chunk, prepared, strict=True):
        if item is None:
            yield Prediction(key, None, None)
        else:
            yield Prediction(key, item.image if keep_images else None, next(found))


def _result(future: Future[list[ImageDetections]] | None) -> list[ImageDetections]:
    return future.result() if future is not None else []


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _describe(image: ImageSource) -> str:
    return str(image) if isinstance(image, str | Path) else f"array {getattr(image, 'shape', '?')}"


def _prepare(
    image: ImageSource, imgsz: int, uint8_frame: bool = False, out: np.ndarray | None = None
) -> _Prepared | None:
    """Decode (paths) and letterbox one image (to RGB uint8 with `uint8_frame`, into `out` when given, else to
    validation's float frame); None when it cannot be read or is not an image array."""
    if isinstance(image, str | Path):
        decoded = read_image(Path(image)) if Path(image).is_file() else None
    else:
        decoded = as_bgr(image)
    if decoded is None:
        return None
    frame, box = letterbox_rgb(decoded, imgsz, out) if uint8_frame else letterbox(decoded, imgsz)
    return _Prepared(decoded, frame, box)


def as_bgr(image: np.ndarray) -> np.ndarray | None:
    """A decoded image as BGR uint8 H x W x 3 (grayscale is replicated); None for anything else."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
        return None
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    return None


# -- models --------------------------------------------------------------------------------------------------------


def engine_facts(engine: Path, imgsz: int = 640) -> ModelFacts:
    """The model facts of an engine built by yoloq: from its build record (`<engine>.json`: `facts`, written at
    build time), else from the source ONNX the record names."""
    record_path = engine.with_suffix(".json")
    if not record_path.is_file():
        raise InputError(
            f"engine {engine}: its build record {record_path.name} is missing (yoloq writes it beside every engine "
            "it builds): copy it beside the engine, or predict with the source ONNX model"
        )
    try:
        record = read_json(record_path)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"engine {engine}: its build record {record_path.name} is unreadable ({exc})") from exc
    facts = record.get("facts")
    if facts:
        return ModelFacts(**facts)
    source = Path(record.get("details", {}).get("source_onnx", ""))
    if not source.is_file():
        raise InputError(f"engine {engine}: its source ONNX {source} is gone; predict with that ONNX model instead")
    found = facts_for_onnx(source, imgsz)
    if record.get("details", {}).get("nms", "none") != "none":
        found = dataclasses.replace(found, head_format="end2end")
    return found


def gpu_letterbox_for(runner: Runner, imgsz: int) -> Any:
    """A GPU letterbox feeding `runner`'s input buffer on its stream (`decode="gpu"`); InputError for an engine without
    a uint8 input, GpuDecodeUnavailable (a BackendUnavailable) without nvJPEG or NVRTC."""
    if getattr(runner, "input_layout", "") != "nhwc-uint8":
        raise InputError(
            "decode gpu needs an engine with a uint8 input: build it with tensorrt.input=uint8 "
            "(--set tensorrt.input=uint8, or -p params.yaml with that setting)"
        )
    from yoloq.backends.tensorrt.cuda import cuda_devices
    from yoloq.backends.tensorrt.gpu_letterbox import GpuLetterbox

    capability = cuda_devices()[0].compute_capability
    return GpuLetterbox(runner.cudart, imgsz, runner.max_batch, capability)  # type: ignore[attr-defined]


def require_tensorrt() -> None:
    """BackendUnavailable (with the reason and the hint) without TensorRT or a GPU."""
    from yoloq.backends import get_backend

    get_backend("tensorrt")


def tensorrt_runner(engine: Path) -> Runner:
    """A TensorRT runner for `engine`; BackendUnavailable (with the reason and the hint) without TensorRT or a GPU."""
    require_tensorrt()
    from yoloq.backends.tensorrt.runner import TensorRTRunner

    return TensorRTRunner(engine)


def build_engine(
    onnx_path: Path, precision: str, build_dir: Path, settings: TensorRTConfig | None, decoding: DecodeSettings | None
) -> Path:
    """An engine for `onnx_path` on this GPU (reused when built before): INT8 for a Q/DQ model, else `precision`."""
    from yoloq.backends.onnxruntime import has_qdq

    require_tensorrt()
    from yoloq.backends.tensorrt.build import TensorRTBackend

    qdq = has_qdq(onnx_path)
    variant = VariantConfig(
        name="predict",
        precision="int8" if qdq else precision,
        quantization="qdq" if qdq else "none",
        backend="tensorrt",
    )
    backend = TensorRTBackend(settings, progress=lambda message: print(message, flush=True), decoding=decoding)
    built = backend.build(variant, onnx_path, onnx_path if qdq else None, build_dir)
    return built.path


def coco_category_id(class_id: int, names: list[str]) -> int:
    """The COCO category id of a class: the official COCO-91 id for models of the 80 COCO classes, else index + 1
    (yoloq's own evaluation convention)."""
    if tuple(names) == COCO80_NAMES:
        return COCO80_TO_COCO91[class_id]
    return class_id + 1
