"""ONNX Runtime backend (CPU): FP32 runs the simplified ONNX, INT8 runs the explicit Q/DQ ONNX.

Q/DQ models run as an integer-exact simulation of the INT8 engine (yoloq.quant.simulate): every INT8 conv sums
integers exactly and scales once, as the engine does, so the numbers do not depend on which kernels ONNX Runtime
picks for the CPU. ONNX Runtime's QDQ fusions into integer kernels are switched off (`session.disable_quant_qdq`):
their results depend on the instruction set (on AVX2 without VNNI, the u8s8 kernels can saturate 16-bit
intermediate sums), and so did the Q/DQ model run as written (float convs sum in a kernel-dependent order, and a
last-bit difference flips the next rounding). On the CPU the INT8 variant is therefore an accuracy simulation of
the GPU engine, not a speed-up: it runs at about half FP32's speed (0.57x in `make run` here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_model

from yoloq.artifacts import size_mb
from yoloq.backends.base import BuiltModel
from yoloq.config import Params, VariantConfig
from yoloq.errors import InputError
from yoloq.preprocess import to_hwc_uint8
from yoloq.quant.graph import QDQ_OP_TYPES
from yoloq.quant.simulate import integer_exact
from yoloq.speed import SpeedMeasures, tile_batch, wall_clock_measure


def has_qdq(model_path: Path) -> bool:
    return _has_qdq_nodes(onnx.load(str(model_path), load_external_data=False))


def _has_qdq_nodes(model: onnx.ModelProto) -> bool:
    return any(node.op_type in QDQ_OP_TYPES for node in model.graph.node)


EXACT_DISABLED_OPTIMIZERS = ["ConvMulFusion"]  # it would fold the scale into the integer weights


def qdq_session(model: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session on the integer-exact simulation of the Q/DQ `model` (yoloq.quant.simulate)."""
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(
        integer_exact(model).model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=EXACT_DISABLED_OPTIMIZERS,
    )


def session_options() -> ort.SessionOptions:
    """Full graph optimization, warnings off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxRuntimeRunner:
    def __init__(self, model_path: Path) -> None:
        try:
            model = onnx.load(str(model_path), load_external_data=False)  # read once: checked, then run
            if _has_qdq_nodes(model):
                load_external_data_for_model(model, str(model_path.parent))
                self.session = qdq_session(model, session_options())
            else:
                self.session = ort.InferenceSession(
                    str(model_path), session_options(), providers=["CPUExecutionProvider"]
                )
        except Exception as exc:  # ORT and onnx raise their own Fail/InvalidGraph/DecodeError types
            raise InputError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        uint8 = self.session.get_inputs()[0].type == "tensor(uint8)"  # a `tensorrt.input: uint8` model
        self.input_layout = "nhwc-uint8" if uint8 else "nchw-float"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The model's output for a batch: NCHW float frames, or for a uint8-input model NHWC uint8 frames (float
        frames are converted to them exactly)."""
        if self.input_layout == "nhwc-uint8" and batch.dtype != np.uint8:
            batch = to_hwc_uint8(batch)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def __enter__(self) -> OnnxRuntimeRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    @classmethod
    def from_params(cls, params: Params | None) -> OnnxRuntimeBackend:
        return cls()

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

    def speed_measures(self, runner: OnnxRuntimeRunner, frames: np.ndarray, params: Params) -> SpeedMeasures:
        """Wall clock at validation.timing.batch_size and at batch 1, after warm-up."""
        timing = params.validation.timing
        batch = tile_batch(frames, timing.batch_size)
        for _ in range(timing.warmup):
            runner.infer(batch)
            runner.infer(batch[:1])
        per_round = max(1, timing.iterations // timing.rounds)
        return SpeedMeasures(
            timing.batch_size,
            wall_clock_measure(runner.infer, batch, per_round),
            wall_clock_measure(runner.infer, batch[:1], per_round),
            timing.rounds,
        )
