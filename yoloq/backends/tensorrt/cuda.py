"""The little CUDA that the TensorRT backend needs beyond Polygraphy, through ctypes: which GPUs exist, and CUDA
events for timing.

Device memory, copies and streams come from `polygraphy.cuda` (the runner); yoloq needs no cuda-python. This small
ctypes layer covers only what `polygraphy.cuda` lacks:
- listing GPUs with the driver API (libcuda.so.1, present wherever an NVIDIA driver is), so the availability check
  needs neither TensorRT nor a CUDA toolkit;
- CUDA events, on the CUDA runtime that Polygraphy loads for its device buffers (`polygraphy.cuda.wrapper().handle`),
  so timing and inference share one runtime;
- page-locked (pinned) host memory on that runtime, which the runner stages its copies through: the GPU copies it
  by DMA, asynchronously and at full bus speed, where pageable memory goes through the driver's own staging.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_CUDA_ERROR_NO_DEVICE = 100


class CudaUnavailable(Exception):
    """No usable CUDA GPU; the message says why (no driver, no device, driver error)."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    memory_mb: int

    @property
    def slug(self) -> str:
        """The GPU as a file-name part: 'NVIDIA H200' -> 'nvidia-h200-sm90'."""
        name = "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")
        while "--" in name:
            name = name.replace("--", "-")
        return f"{name}-sm{self.compute_capability.replace('.', '')}"


def cuda_devices(load_library: Callable[[str], Any] = ctypes.CDLL) -> list[GpuInfo]:
    """The CUDA GPUs the NVIDIA driver reports (CUDA_VISIBLE_DEVICES applies); raises CudaUnavailable if none."""
    try:
        lib = load_library("libcuda.so.1")
    except OSError as exc:
        raise CudaUnavailable(f"no NVIDIA driver: libcuda.so.1 cannot be loaded ({exc})") from exc
    status = lib.cuInit(0)
    if status == _CUDA_ERROR_NO_DEVICE:
        raise CudaUnavailable("the NVIDIA driver reports no CUDA device (check CUDA_VISIBLE_DEVICES)")
    if status != 0:
        raise CudaUnavailable(f"the NVIDIA driver failed to initialise (cuInit error {status})")
    count = ctypes.c_int(0)
    _check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if count.value == 0:
        raise CudaUnavailable("the NVIDIA driver reports no CUDA device (check CUDA_VISIBLE_DEVICES)")
    return [_device_info(lib, index) for index in range(count.value)]


def _device_info(lib: Any, index: int) -> GpuInfo:
    device = ctypes.c_int(0)
    _check(lib.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    _check(lib.cuDeviceGetName(name, 256, device), "cuDeviceGetName")
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    _check(lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "cc")
    _check(lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "cc")
    memory = ctypes.c_size_t(0)
    _check(lib.cuDeviceTotalMem_v2(ctypes.byref(memory), device), "cuDeviceTotalMem_v2")
    return GpuInfo(
        index=index,
        name=name.value.decode(errors="replace"),
        compute_capability=f"{major.value}.{minor.value}",
        memory_mb=memory.value // (1 << 20),
    )


def _check(status: int, call: str) -> None:
    if status != 0:
        raise CudaUnavailable(f"CUDA driver call {call} failed with error {status}")


class EventTimer:
    """CUDA events on one stream: GPU time between two points of the stream's work, in milliseconds."""

    def __init__(self, cudart: Any, stream_ptr: int) -> None:
        self._lib = cudart
        self._stream = ctypes.c_void_p(stream_ptr)

    def create(self) -> int:
        event = ctypes.c_void_p()
        self._call(self._lib.cudaEventCreate(ctypes.byref(event)), "cudaEventCreate")
        return event.value or 0

    def record(self, event: int) -> None:
        self._call(self._lib.cudaEventRecord(ctypes.c_void_p(event), self._stream), "cudaEventRecord")

    def elapsed_ms(self, start: int, end: int) -> float:
        """Milliseconds between two recorded events; waits for `end` to complete."""
        self._call(self._lib.cudaEventSynchronize(ctypes.c_void_p(end)), "cudaEventSynchronize")
        millis = ctypes.c_float(0.0)
        self._call(
            self._lib.cudaEventElapsedTime(ctypes.byref(millis), ctypes.c_void_p(start), ctypes.c_void_p(end)),
            "cudaEventElapsedTime",
        )
        return float(millis.value)

    def destroy(self, event: int) -> None:
        self._call(self._lib.cudaEventDestroy(ctypes.c_void_p(event)), "cudaEventDestroy")

    @staticmethod
    def _call(status: int, call: str) -> None:
        check_runtime(status, call)


def check_runtime(status: int, call: str) -> None:
    """RuntimeError naming the CUDA runtime call when it did not return cudaSuccess."""
    if status != 0:
        raise RuntimeError(f"CUDA runtime call {call} failed with error {status}")


@dataclass
class PinnedArray:
    """A NumPy array over page-locked host memory from `cudaHostAlloc`; `free()` returns it (safe to call twice)."""

    array: np.ndarray
    _cudart: Any
    _pointer: int

    def free(self) -> None:
        pointer, self._pointer = self._pointer, 0
        if pointer:
            status = self._cudart.cudaFreeHost(ctypes.c_void_p(pointer))
            if status != 0:
                raise RuntimeError(f"CUDA runtime call cudaFreeHost failed with error {status}")


def pinned_array(cudart: Any, shape: tuple[int, ...], dtype: type) -> PinnedArray | None:
    """`shape` x `dtype` in pinned host memory, or None where the runtime has none to give (a runtime without
    cudaHostAlloc, or an allocation error): callers then copy from pageable memory, which only costs speed."""
    allocate = getattr(cudart, "cudaHostAlloc", None)
    if allocate is None or not hasattr(cudart, "cudaFreeHost"):
        return None
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    pointer = ctypes.c_void_p()
    if allocate(ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 1)), ctypes.c_uint(0)) != 0 or not pointer.value:
        return None
    raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(pointer.value)
    array = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)
    return PinnedArray(array, cudart, pointer.value)
