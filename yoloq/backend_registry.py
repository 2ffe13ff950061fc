"""What each backend is, in one table: what it builds, whether its builds are isolated, whether it is profiled,
how to ask whether it runs here, and where its code lives (imported only when used; the class says how it times).

Adding a backend (OpenVINO, say) is one module with a Backend class (yoloq.backends.base: build, load,
speed_measures; a `from_params` constructor) plus one entry here; config validation, backend resolution, the
build step, the speed stage and the profile step all ask this table. Pure data: it imports nothing of yoloq.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Build = tuple[str, str]  # (precision, quantization), e.g. ("int8", "qdq")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    builds: frozenset[Build]  # the (precision, quantization) pairs it can build
    backend_class: str  # "module:Class", imported on first use
    isolated_builds: bool  # builds run in a child process killed at build.timeout_s (hung C++ code)
    profiled: bool  # a per-layer profile follows validation
    availability: str | None  # "module:function" -> Availability (can it run here?); None: always available

    def can_build(self, precision: str, quantization: str) -> bool:
        return (precision, quantization) in self.builds

    def describe_builds(self) -> str:
        return ", ".join(f"{p}" if q == "none" else f"{p} ({q})" for p, q in sorted(self.builds))


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            name="onnxruntime",
            builds=frozenset({("fp32", "none"), ("int8", "qdq")}),
            backend_class="yoloq.backends.onnxruntime:OnnxRuntimeBackend",
            isolated_builds=False,
            profiled=False,
            availability=None,
        ),
        BackendSpec(
            name="tensorrt",
            builds=frozenset({("fp32", "none"), ("fp16", "none"), ("int8", "qdq"), ("int8", "implicit")}),
            backend_class="yoloq.backends.tensorrt.build:TensorRTBackend",
            isolated_builds=True,
            profiled=True,
            availability="yoloq.backends:tensorrt_availability",
        ),
    )
}
AUTO_ORDER = ("tensorrt", "onnxruntime")  # what `auto` means: the first of these that is available here


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]


def load_object(reference: str) -> Any:
    """The object a "module:name" reference names (imported now)."""
    import importlib

    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def backends_that_build(precision: str, quantization: str) -> list[str]:
    return [name for name, spec in BACKENDS.items() if spec.can_build(precision, quantization)]
