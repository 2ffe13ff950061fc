"""The installed TensorRT: its bindings' and library's versions, what it can build, and the GPU it runs on."""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yoloq.backends.tensorrt.cuda import GpuInfo, cuda_devices
from yoloq.backends.tensorrt.versions import (
    Capabilities,
    TrtVersion,
    capabilities,
    check_availability,
    version_from_number,
)
from yoloq.errors import BackendUnavailable


@dataclass(frozen=True)
class TrtEnvironment:
    trt: Any
    version: TrtVersion  # the Python bindings (tensorrt.__version__)
    library: TrtVersion | None  # libnvinfer (getInferLibVersion) when it can be asked; in the kit 8.6.0 under 8.6.1
    gpu: GpuInfo
    caps: Capabilities

    @property
    def runtime_version(self) -> TrtVersion:
        """The version that writes calibration caches and engines: the library's when known."""
        return self.library or self.version

    def describe(self) -> dict[str, str]:
        return {
            "tensorrt_version": str(self.version),
            "tensorrt_library_version": str(self.library) if self.library else "unknown",
            "gpu": self.gpu.name,
            "gpu_compute_capability": self.gpu.compute_capability,
            "gpu_memory_mb": str(self.gpu.memory_mb),
        }


def load_environment() -> TrtEnvironment:
    """TensorRT, its version and capabilities, and the GPU; raises BackendUnavailable with the reason and hint."""
    availability = check_availability(lambda: importlib.import_module("tensorrt"), cuda_devices)
    if not availability.available or availability.version is None or availability.gpu is None:
        raise BackendUnavailable(availability.message())
    trt = importlib.import_module("tensorrt")
    version = availability.version
    return TrtEnvironment(trt, version, library_version(version.major), availability.gpu, capabilities(version))


def library_version(major: int, load_library: Callable[[str], Any] = ctypes.CDLL) -> TrtVersion | None:
    """libnvinfer's own version (it can differ from the bindings'), or None when it cannot be asked."""
    try:
        return version_from_number(int(load_library(f"libnvinfer.so.{major}").getInferLibVersion()))
    except (OSError, AttributeError, ValueError):
        return None


def has_module(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
