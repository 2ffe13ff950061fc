"""Backends build a variant from ONNX (+ calibration) and run it; each is one entry of yoloq.backend_registry.

`get_backend(name, params)` gives a backend; `resolve_variants(params)` turns every `auto` into the first backend
of the registry's AUTO_ORDER that runs here and builds the variant (TensorRT when it imports, is a supported version
and a CUDA GPU exists; else ONNX Runtime) and fails early, with the reason and the install hint, for variants no
available backend builds. A backend's own code (TensorRT, ONNX Runtime) is imported only when it is used.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from yoloq.backend_registry import AUTO_ORDER, BACKENDS, backend_spec, backends_that_build, load_object
from yoloq.backends.base import Backend, BuiltModel, Runner, closing_runner, output_head_format
from yoloq.backends.tensorrt.cuda import cuda_devices
from yoloq.backends.tensorrt.versions import Availability, check_availability
from yoloq.config import BackendName, Params, ResolvedBackendName, VariantConfig
from yoloq.errors import BackendUnavailable

AvailabilityFn = Callable[[str], Availability]


@functools.lru_cache(maxsize=1)
def tensorrt_availability() -> Availability:
    """Can backend 'tensorrt' run here? (TensorRT importable, supported version, a CUDA GPU); reasons if not.
    Asked once per process: a GPU does not come or go while a run runs."""
    return check_availability(lambda: importlib.import_module("tensorrt"), cuda_devices)


def backend_availability(name: str) -> Availability:
    """Whether backend `name` can run on this machine (its registry entry says how to ask)."""
    check = backend_spec(name).availability
    return load_object(check)() if check else Availability(())


def resolve_backend(variant: VariantConfig, available: AvailabilityFn = backend_availability) -> ResolvedBackendName:
    """The concrete backend of `variant` on this machine; raises BackendUnavailable when none that builds it runs
    here (a variant naming a backend gets that one, or the reason it cannot run)."""
    if variant.backend != "auto":
        found = available(variant.backend)
        if not found.available:
            raise BackendUnavailable(f"variant {variant.name!r} (backend {variant.backend}): {found.message()}")
        return variant.backend  # type: ignore[return-value]
    builders = backends_that_build(variant.precision, variant.quantization)
    reasons = []
    for name in (n for n in AUTO_ORDER if n in builders):
        found = available(name)
        if found.available:
            return name  # type: ignore[return-value]
        reasons.append(found.message())
    what = f"variant {variant.name!r} ({variant.precision}, {variant.quantization})"
    raise BackendUnavailable(f"{what} is built by {', '.join(builders)} only, and none runs here: {'; '.join(reasons)}")


def resolve_variants(params: Params, available: AvailabilityFn = backend_availability) -> Params:
    """A copy of `params` where every variant names a concrete backend (`auto` resolved on this machine).

    Call it once before any work: it raises BackendUnavailable (exit 2) for a variant that cannot run here.
    """
    checked: dict[str, Availability] = {}

    def cached(name: str) -> Availability:  # one TensorRT import and GPU query for all variants
        if name not in checked:
            checked[name] = available(name)
        return checked[name]

    resolved = params.model_copy(deep=True)
    for variant in resolved.variants:
        variant.backend = resolve_backend(variant, cached)
    return resolved


def get_backend(name: BackendName, params: Params | None = None) -> Backend:
    """The backend called `name` (`auto`: the first of the registry's AUTO_ORDER that runs here), made from
    `params` (TensorRT takes its `tensorrt:` settings and, for implicit INT8, the calibration images; without
    params it uses its defaults and cannot calibrate). Raises BackendUnavailable with the reason and the hint."""
    if name == "auto":
        name = next(n for n in AUTO_ORDER if backend_availability(n).available)  # onnxruntime always is
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    found = backend_availability(name)
    if not found.available:
        raise BackendUnavailable(found.message())
    return load_object(backend_spec(name).backend_class).from_params(params)


__all__ = [
    "Backend",
    "BuiltModel",
    "Runner",
    "backend_availability",
    "closing_runner",
    "output_head_format",
    "get_backend",
    "resolve_backend",
    "resolve_variants",
    "tensorrt_availability",
]
