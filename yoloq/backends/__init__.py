"""Backends build a variant from ONNX (+ calibration) and run it. TensorRT is imported only when used.

`get_backend(name, params)` gives a backend; `resolve_variants(params)` turns every `auto` into the backend this
machine has (TensorRT when it imports, is a supported version and a CUDA GPU exists; else ONNX Runtime) and fails
early, with the reason and the install hint, for variants that need TensorRT where there is none.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from yoloq.backends.base import Backend, BuiltModel, Runner, closing_runner
from yoloq.backends.tensorrt.cuda import cuda_devices
from yoloq.backends.tensorrt.versions import Availability, check_availability
from yoloq.config import BackendName, Params, ResolvedBackendName, VariantConfig
from yoloq.errors import BackendUnavailable


def tensorrt_availability() -> Availability:
    """Can backend 'tensorrt' run here? (TensorRT importable, supported version, a CUDA GPU); reasons if not."""
    return check_availability(lambda: importlib.import_module("tensorrt"), cuda_devices)


def needs_tensorrt(variant: VariantConfig) -> bool:
    """Variants only TensorRT builds: fp16 and implicit (calibrator) INT8."""
    return variant.precision == "fp16" or variant.quantization == "implicit"


def resolve_backend(
    variant: VariantConfig, availability: Callable[[], Availability] = tensorrt_availability
) -> ResolvedBackendName:
    """The concrete backend of `variant` on this machine; raises BackendUnavailable when it needs missing TensorRT."""
    if variant.backend == "onnxruntime":
        return "onnxruntime"
    found = availability()
    if found.available:
        return "tensorrt"
    if variant.backend == "tensorrt" or needs_tensorrt(variant):
        what = f"variant {variant.name!r} ({variant.precision}, {variant.quantization}, backend {variant.backend})"
        raise BackendUnavailable(f"{what} needs TensorRT: {found.message()}")
    return "onnxruntime"


def resolve_variants(params: Params, availability: Callable[[], Availability] = tensorrt_availability) -> Params:
    """A copy of `params` where every variant names a concrete backend (`auto` resolved on this machine).

    Call it once before any work: it raises BackendUnavailable (exit 2) for a variant that cannot run here.
    """
    checked: list[Availability] = []

    def cached() -> Availability:  # one TensorRT import and GPU query for all variants
        if not checked:
            checked.append(availability())
        return checked[0]

    resolved = params.model_copy(deep=True)
    for variant in resolved.variants:
        variant.backend = resolve_backend(variant, cached)
    return resolved


def get_backend(name: BackendName, params: Params | None = None) -> Backend:
    """The backend called `name` (`auto`: TensorRT when available, else ONNX Runtime).

    `params` gives the TensorRT backend its settings (`tensorrt:` section) and the calibration images for implicit
    INT8; without it TensorRT uses its defaults and cannot calibrate. Raises BackendUnavailable with the reason
    (not installed / no GPU / unsupported version) and the install hint.
    """
    if name == "auto":
        name = "tensorrt" if tensorrt_availability().available else "onnxruntime"
    if name == "onnxruntime":
        from yoloq.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if name == "tensorrt":
        found = tensorrt_availability()
        if not found.available:
            raise BackendUnavailable(found.message())
        from yoloq.backends.tensorrt.build import TensorRTBackend

        if params is None:
            return TensorRTBackend()
        return TensorRTBackend(params.tensorrt, params.calibration)
    raise BackendUnavailable(f"unknown backend {name!r}; valid: auto, onnxruntime, tensorrt")


__all__ = [
    "Backend",
    "BuiltModel",
    "Runner",
    "closing_runner",
    "get_backend",
    "needs_tensorrt",
    "resolve_backend",
    "resolve_variants",
    "tensorrt_availability",
]
