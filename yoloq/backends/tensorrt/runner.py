"""`TensorRTRunner`: runs an engine on the TensorRT execution API directly, on one CUDA stream.

`deserialize_cuda_engine`, name-based tensors, `set_input_shape`, `set_tensor_address`, `execute_async_v3`; device
buffers and the stream come from `polygraphy.cuda`, sized once for the profile's max batch, and copies go through
pinned host buffers of the same size (`cuda.pinned_array`; pageable memory where the runtime gives none). Polygraphy's
`TrtRunner` is not used (it segfaults with the 8.6 kit: ../shared/gpu/README.md).

An engine with a uint8 input (`tensorrt.input: uint8`) takes (N, H, W, 3) RGB uint8 frames
(`yoloq.preprocess.letterbox_rgb`); given validation's float (N, 3, H, W) frames it converts them back first, exactly
(`to_hwc_uint8`), so every stage can run it unchanged.

`infer_device(batch, frames)` runs frames that are already on the GPU (`gpu_letterbox.GpuLetterbox`'s buffers,
`decode="gpu"`): the input tensor is bound to them, and to the runner's own buffer again for host batches.

The runner is a context manager: `close()` (or leaving the `with` block) drops the execution context, engine and
runtime, in that order, and frees the device buffers and the stream. A constructor that fails half-way frees what it
had already allocated before raising.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from yoloq.backends.tensorrt.cuda import PinnedArray, pinned_array
from yoloq.backends.tensorrt.nms import has_nms_outputs, pack_nms_outputs
from yoloq.errors import InputError
from yoloq.preprocess import to_hwc_uint8

_NUMPY_DTYPES: dict[str, type] = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


class TensorRTRunner:
    """Runs an engine on one CUDA stream; buffers are allocated once for the profile's max batch."""

    def __init__(self, engine_path: Path) -> None:
        trt = importlib.import_module("tensorrt")
        cuda = importlib.import_module("polygraphy.cuda")
        logger = importlib.import_module("polygraphy.backend.trt.util").get_trt_logger()
        self._trt = trt
        self._cuda = cuda.wrapper()
        self._memcpy_kind = cuda.MemcpyKind
        self._buffers: dict[str, int] = {}
        self._host: dict[str, PinnedArray] = {}  # pinned staging per tensor, max-batch shape (absent: pageable)
        self._more_inputs: dict[int, PinnedArray] = {}  # input_buffer(batch, index >= 1), allocated when asked
        self._stream: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._profiler: Any = None
        self._input_address = 0  # where the input tensor is bound: its own buffer, or a caller's (`infer_device`)
        try:
            self._open(engine_path, cuda, logger)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.close()
            raise

    def _open(self, engine_path: Path, cuda: Any, logger: Any) -> None:
        trt = self._trt
        try:
            data = engine_path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the engine {engine_path}: {exc}") from exc
        self._stream = cuda.Stream()
        load_plugins(trt, logger)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise InputError(
                f"TensorRT cannot load {engine_path}: it is not an engine, or it was built by another TensorRT "
                "version or for another GPU; delete it and build again"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {engine_path} (GPU memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise InputError(f"{engine_path}: expected one input tensor, found {inputs}")
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n != self.input_name]
        low, opt, high = (tuple(s) for s in self._engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.opt_batch, self.max_batch = int(low[0]), int(opt[0]), int(high[0])
        self.sample_shape = tuple(int(d) for d in high[1:])
        self._dtypes = {n: numpy_dtype(self._engine.get_tensor_dtype(n)) for n in names}
        self._context.set_input_shape(self.input_name, tuple(high))
        for name in names:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * np.dtype(self._dtypes[name]).itemsize
            self._buffers[name] = self._cuda.malloc(nbytes)
            if not self._context.set_tensor_address(name, self._buffers[name]):
                raise RuntimeError(f"TensorRT rejected the device buffer of tensor {name!r} of {engine_path}")
            pinned = pinned_array(self._cuda.handle, shape, self._dtypes[name])
            if pinned is not None:
                self._host[name] = pinned
        self._input_address = self._buffers[self.input_name]

    # -- the context manager -------------------------------------------------------------------------------------

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop the execution context, engine and runtime (in that order), then free the device buffers and the stream.

        Every handle is released even when one fails (the first failure is raised after). Safe to call twice, and on
        a runner whose constructor failed half-way."""
        buffers, self._buffers = self._buffers, {}
        host, self._host = self._host, {}
        more, self._more_inputs = self._more_inputs, {}
        stream, self._stream = self._stream, None
        self._context = None  # context before engine before runtime
        self._profiler = None  # after the context that calls it
        self._engine = None
        self._runtime = None
        errors: list[Exception] = []
        frees: list[tuple[Any, Any]] = [(self._cuda.free, pointer) for pointer in buffers.values()]
        frees += [(PinnedArray.free, pinned) for pinned in [*host.values(), *more.values()]]
        for free, handle in [*frees, (_free_stream, stream)]:
            try:
                free(handle)
            except Exception as exc:  # free the rest, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- running -------------------------------------------------------------------------------------------------

    @property
    def trt(self) -> Any:
        """The tensorrt module this runner uses."""
        return self._trt

    @property
    def engine(self) -> Any:
        return self._require(self._engine)

    @property
    def context(self) -> Any:
        return self._require(self._context)

    @property
    def stream_ptr(self) -> int:
        """The CUDA stream the engine runs on."""
        return int(self._require(self._stream).ptr)

    @property
    def cudart(self) -> Any:
        """The CUDA runtime library Polygraphy loaded (ctypes), for CUDA events on the same runtime."""
        return self._cuda.handle

    def set_profiler(self, profiler: Any) -> None:
        """Attach a `tensorrt.IProfiler` to the execution context; the runner keeps it alive until `close()`."""
        self.context.profiler = profiler
        self._profiler = profiler

    @property
    def input_layout(self) -> str:
        """ "nhwc-uint8" for an engine with a uint8 input (`tensorrt.input: uint8`), else "nchw-float"."""
        return "nhwc-uint8" if self._dtypes[self.input_name] is np.uint8 else "nchw-float"

    @property
    def pinned(self) -> bool:
        """Whether copies go through pinned host buffers."""
        return self.input_name in self._host

    def input_buffer(self, batch: int, index: int = 0) -> np.ndarray | None:
        """A pinned host buffer of the input for `batch` images, for a caller to fill in place: `infer` of it copies
        it to the GPU directly. Index 0 is the runner's own staging buffer (overwritten by every `infer` of another
        array); further indexes are more buffers, so a pipeline can fill one while another is inferred. None
        without pinned memory or above the profile's max batch. The arrays are valid until `close()`."""
        staging = self._host.get(self.input_name)
        if staging is None or not 1 <= batch <= self.max_batch or index < 0:
            return None
        if index == 0:
            return staging.array[:batch]
        if index not in self._more_inputs:
            pinned = pinned_array(self._cuda.handle, staging.array.shape, self._dtypes[self.input_name])
            if pinned is None:
                return None
            self._more_inputs[index] = pinned
        return self._more_inputs[index].array[:batch]

    def _pinned_input(self, batch: np.ndarray) -> bool:
        """Whether `batch` is the start of one of the runner's pinned input buffers (then it is copied as it is)."""
        start = batch.ctypes.data
        buffers = [self._host[self.input_name], *self._more_inputs.values()] if self.pinned else []
        return batch.flags.c_contiguous and any(start == b.array.ctypes.data for b in buffers)

    @property
    def has_nms(self) -> bool:
        """Whether the engine ends in EfficientNMS_TRT (`tensorrt.nms: efficient_nms`)."""
        return has_nms_outputs(self.output_names)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The engine's detection output for a batch (NCHW float, or NHWC uint8 for a uint8 input), float32: its
        (first) output, or for an engine that ends in EfficientNMS_TRT its four outputs packed as end2end rows
        (yoloq.backends.tensorrt.nms). Batches above the profile's max run in pieces."""
        return self._detection_output(lambda names: self.infer_outputs(batch, names))

    def infer_outputs(self, batch: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The engine's outputs `names` (default: all) for a batch, in their own dtypes."""
        names = names or self.output_names
        batch = self._as_input(batch)
        if batch.shape[0] > self.max_batch:
            steps = range(0, batch.shape[0], self.max_batch)
            pieces = [self.infer_outputs(batch[i : i + self.max_batch], names) for i in steps]
            return {name: np.concatenate([piece[name] for piece in pieces]) for name in names}
        if batch.shape[0] < self.min_batch:
            raise InputError(f"batch {batch.shape[0]} is below the engine profile's min batch {self.min_batch}")
        self.set_input(batch)
        return self._execute_and_fetch(names)

    def infer_device(self, batch: int, frames: int) -> np.ndarray:
        """`infer` of `batch` frames already on the GPU at device address `frames` (laid out as the input tensor, e.g.
        a `gpu_letterbox.GpuLetterbox` slot; the caller has ordered this runner's stream after the work that wrote
        them). The engine reads them there; the runner's own input buffer is bound again for host batches."""
        if not self.min_batch <= batch <= self.max_batch:
            raise InputError(f"batch {batch} is outside the engine profile's {self.min_batch}..{self.max_batch}")
        shape = (batch, *self.sample_shape)
        if not self.context.set_input_shape(self.input_name, shape):
            raise InputError(f"TensorRT rejected input shape {shape} for {self.input_name!r}")
        self._bind_input(frames)
        return self._detection_output(self._execute_and_fetch)

    def _detection_output(self, outputs: Callable[[list[str]], dict[str, np.ndarray]]) -> np.ndarray:
        """`infer`'s result from `outputs(names)`: EfficientNMS_TRT's four outputs packed, else the first as float32."""
        if self.has_nms:
            return pack_nms_outputs(outputs(self.output_names))
        return outputs(self.output_names[:1])[self.output_names[0]].astype(np.float32, copy=False)

    def _bind_input(self, address: int) -> None:
        if address != self._input_address:
            if not self.context.set_tensor_address(self.input_name, address):
                raise RuntimeError(f"TensorRT rejected the input address for {self.input_name!r}")
            self._input_address = address

    def _execute_and_fetch(self, names: list[str]) -> dict[str, np.ndarray]:
        """Run the engine on its current input and copy the outputs `names` back (waits for the stream)."""
        self.execute()
        outputs = {}
        for name in names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            pinned = self._host.get(name)
            output = pinned.array[: shape[0]] if pinned is not None else np.empty(shape, dtype=self._dtypes[name])
            self._cuda.memcpy(
                dst=output.ctypes.data,
                src=self._buffers[name],
                nbytes=output.nbytes,
                kind=self._memcpy_kind.DeviceToHost,
                stream_ptr=self.stream_ptr,
            )
            outputs[name] = output
        self.synchronize()
        # pinned buffers are overwritten by the next batch: callers get their own copies
        return {name: output.copy() if name in self._host else output for name, output in outputs.items()}

    def _as_input(self, batch: np.ndarray) -> np.ndarray:
        """`batch` in the engine's layout: validation's float NCHW frames become uint8 NHWC for a uint8 input."""
        if self.input_layout == "nhwc-uint8" and batch.ndim == 4 and batch.dtype != np.uint8:
            height, width, channels = self.sample_shape
            if tuple(batch.shape[1:]) == (channels, height, width):
                batch = to_hwc_uint8(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.sample_shape:
            layout = "uint8 NHWC" if self.input_layout == "nhwc-uint8" else "NCHW"
            expected = ", ".join(map(str, self.sample_shape))
            raise InputError(f"TensorRT engine takes {layout} (N, {expected}) batches, got {batch.shape}")
        return batch

    def set_input(self, batch: np.ndarray) -> None:
        """Copy `batch` (N within the profile; float NCHW frames are converted for a uint8 input) to the input
        buffer and set the input shape."""
        batch = self._as_input(batch)
        staging = self.input_buffer(batch.shape[0])
        if staging is None:
            host = np.ascontiguousarray(batch, dtype=self._dtypes[self.input_name])
        elif batch.dtype == staging.dtype and self._pinned_input(batch):
            host = batch  # the caller filled one of the pinned buffers (`input_buffer`)
        else:  # through the pinned staging buffer
            np.copyto(staging, batch, casting="unsafe")
            host = staging
        if not self.context.set_input_shape(self.input_name, host.shape):
            raise InputError(f"TensorRT rejected input shape {host.shape} for {self.input_name!r}")
        self._bind_input(self._buffers[self.input_name])
        self._cuda.memcpy(
            dst=self._buffers[self.input_name],
            src=host.ctypes.data,
            nbytes=host.nbytes,
            kind=self._memcpy_kind.HostToDevice,
            stream_ptr=self.stream_ptr,
        )
        self.synchronize()  # `host` may be a temporary: the copy must finish before it is freed

    def execute(self) -> None:
        """One `execute_async_v3` on the runner's stream (not synchronised)."""
        if not self.context.execute_async_v3(self.stream_ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def synchronize(self) -> None:
        """Wait for the work queued on the runner's stream."""
        self._require(self._stream).synchronize()

    @staticmethod
    def _require(handle: Any) -> Any:
        if handle is None:
            raise RuntimeError("the TensorRT runner is closed")
        return handle


def _free_stream(stream: Any) -> None:
    if stream is not None:
        stream.free()


def numpy_dtype(trt_dtype: Any) -> type:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _NUMPY_DTYPES:
        raise InputError(f"TensorRT tensor type {name} has no NumPy equivalent in yoloq")
    return _NUMPY_DTYPES[name]


def load_plugins(trt: Any, logger: Any) -> None:
    """Register TensorRT's bundled plugins (EfficientNMS_TRT for `tensorrt.nms: efficient_nms`) before an engine is
    deserialized: an engine that holds a plugin cannot be loaded otherwise (measured on the H200 kit: "getPluginCreator
    could not find plugin: EfficientNMS_TRT"). The builder side gets them from Polygraphy's ONNX loader."""
    init = getattr(trt, "init_libnvinfer_plugins", None)
    if init is not None:
        init(logger, "")
