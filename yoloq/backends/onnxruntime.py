"""ONNX Runtime backend (CPU): FP32 runs the simplified ONNX, INT8 runs the explicit Q/DQ ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from yoloq.artifacts import size_mb
from yoloq.backends.base import BuiltModel
from yoloq.config import VariantConfig
from yoloq.errors import InputError


class OnnxRuntimeRunner:
    def __init__(self, model_path: Path) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise InputError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def build(self, variant: VariantConfig, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path) -> BuiltModel:
        if variant.precision == "fp32":
            path = fp32_onnx
        elif variant.precision == "int8" and variant.quantization == "qdq":
            if qdq_onnx is None:
                raise InputError(f"variant {variant.name!r} needs the Q/DQ model from the calibration stage")
            path = qdq_onnx
        else:
            raise InputError(
                f"variant {variant.name!r}: onnxruntime builds fp32 and int8 (quantization qdq) only, "
                f"not {variant.precision}/{variant.quantization}"
            )
        return BuiltModel(variant=variant, path=path, size_mb=size_mb(path), build_seconds=0.0)

    def load(self, built: BuiltModel) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(built.path)
