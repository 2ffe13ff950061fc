"""`TensorRTRunner`: runs an engine on the TensorRT execution API directly, on one CUDA stream.

`deserialize_cuda_engine`, name-based tensors, `set_input_shape`, `set_tensor_address`, `execute_async_v3`; device
buffers and the stream come from `polygraphy.cuda`, sized once for the profile's max batch. Polygraphy's `TrtRunner`
is not used (it segfaults with the 8.6 kit: ../shared/gpu/README.md).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from yoloq.errors import InputError

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
        from polygraphy import cuda
        from polygraphy.backend.trt.util import get_trt_logger

        trt = importlib.import_module("tensorrt")
        self._trt = trt
        self._cuda = cuda.wrapper()
        self._memcpy_kind = cuda.MemcpyKind
        self._stream = cuda.Stream()
        self._runtime = trt.Runtime(get_trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise InputError(
                f"TensorRT cannot load {engine_path}: it was built by another TensorRT version or for another GPU; "
                "delete it and build again"
            )
        self._context = self._engine.create_execution_context()
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
        self._buffers: dict[str, int] = {}
        for name in names:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * np.dtype(self._dtypes[name]).itemsize
            self._buffers[name] = self._cuda.malloc(nbytes)
            self._context.set_tensor_address(name, self._buffers[name])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The engine's (first) output for an NCHW batch; batches above the profile's max run in pieces."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.sample_shape:
            raise InputError(
                f"TensorRT engine takes (N, {', '.join(map(str, self.sample_shape))}) batches, got {batch.shape}"
            )
        if batch.shape[0] > self.max_batch:
            pieces = [self.infer(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
            return np.concatenate(pieces)
        if batch.shape[0] < self.min_batch:
            raise InputError(f"batch {batch.shape[0]} is below the engine profile's min batch {self.min_batch}")
        self.set_input(batch)
        self.execute()
        name = self.output_names[0]
        output = np.empty(tuple(int(d) for d in self._context.get_tensor_shape(name)), dtype=self._dtypes[name])
        self._cuda.memcpy(
            dst=output.ctypes.data,
            src=self._buffers[name],
            nbytes=output.nbytes,
            kind=self._memcpy_kind.DeviceToHost,
            stream_ptr=self._stream.ptr,
        )
        self._stream.synchronize()
        return output.astype(np.float32, copy=False)

    def synchronize(self) -> None:
        """Wait for the work queued on the runner's stream."""
        self._stream.synchronize()

    def close(self) -> None:
        """Free the device buffers (the engine and context go with the object)."""
        for pointer in self._buffers.values():
            self._cuda.free(pointer)
        self._buffers.clear()
        self._stream.free()
        self._context = None  # context before engine before runtime
        self._engine = None

    @property
    def stream_ptr(self) -> int:
        """The CUDA stream the engine runs on."""
        return int(self._stream.ptr)

    @property
    def cudart(self) -> Any:
        """The CUDA runtime library Polygraphy loaded (ctypes), for CUDA events on the same runtime."""
        return self._cuda.handle

    def set_input(self, batch: np.ndarray) -> None:
        """Copy `batch` (N within the profile) to the input buffer and set the input shape."""
        host = np.ascontiguousarray(batch, dtype=self._dtypes[self.input_name])
        if not self._context.set_input_shape(self.input_name, host.shape):
            raise InputError(f"TensorRT rejected input shape {host.shape} for {self.input_name!r}")
        self._cuda.memcpy(
            dst=self._buffers[self.input_name],
            src=host.ctypes.data,
            nbytes=host.nbytes,
            kind=self._memcpy_kind.HostToDevice,
            stream_ptr=self._stream.ptr,
        )
        self._stream.synchronize()  # `host` may be a temporary: the copy must finish before it is freed

    def execute(self) -> None:
        """One `execute_async_v3` on the runner's stream (not synchronised)."""
        if not self._context.execute_async_v3(self._stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")


def numpy_dtype(trt_dtype: Any) -> type:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _NUMPY_DTYPES:
        raise InputError(f"TensorRT tensor type {name} has no NumPy equivalent in yoloq")
    return _NUMPY_DTYPES[name]
