"""Backends build a variant from ONNX (+ calibration) and run it. TensorRT is imported only when used."""

from __future__ import annotations

from yoloq.backends.base import Backend, BuiltModel, Runner
from yoloq.config import BackendName
from yoloq.errors import BackendUnavailable


def get_backend(name: BackendName) -> Backend:
    """The backend called `name`; raises BackendUnavailable with the reason and the install hint."""
    if name == "onnxruntime":
        from yoloq.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if name == "tensorrt":
        raise BackendUnavailable(
            "backend 'tensorrt' is not available in this version of yoloq on this machine: "
            "use backend: onnxruntime variants (fp32, int8 qdq), or install TensorRT with pip install '.[tensorrt]' "
            "on a GPU machine once the TensorRT backend lands"
        )
    raise BackendUnavailable(f"unknown backend {name!r}; valid: onnxruntime, tensorrt")


__all__ = ["Backend", "BuiltModel", "Runner", "get_backend"]
