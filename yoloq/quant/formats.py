"""Quantized number formats as values: what a Q/DQ pair stores, its largest magnitude and its rounding.

A format is data, so a new one (FP8 E4M3: qmax 448, ONNX FLOAT8E4M3FN, TensorRT flag FP8, its own rounding) is one
more entry in FORMATS, not edits in every module that says "int8".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from yoloq.errors import ConfigError


def _round_to_int_grid(qmax: float) -> Callable[[np.ndarray], np.ndarray]:
    def quantize(steps: np.ndarray) -> np.ndarray:
        return np.clip(np.round(steps), -qmax, qmax)  # round half to even, as QuantizeLinear does

    return quantize


@dataclass(frozen=True)
class QuantFormat:
    """A symmetric quantized format (zero point 0): values are `scale * q` with |q| <= qmax."""

    name: str  # the precision name in params.yaml (variants[].precision)
    qmax: float  # largest representable magnitude in steps: scale = amax / qmax
    onnx_type: int  # TensorProto element type of the quantized tensors (and of the zero points)
    numpy_type: type  # the same as a NumPy dtype, for weight initializers
    trt_flag: str  # TensorRT BuilderFlag that enables it on weakly typed TensorRT (8.6 - 10.x)
    to_grid: Callable[[np.ndarray], np.ndarray]  # float steps (x / scale) -> representable steps

    def scale(self, amax: float) -> float:
        """The quantization step for a symmetric range [-amax, amax] (never 0: an all-zero tensor gets 1/qmax)."""
        return max(float(amax), 1e-12) / self.qmax

    def fake_quantize(self, values: np.ndarray, scale: float | np.ndarray) -> np.ndarray:
        """Quantize then dequantize: what the Q/DQ pair does to `values`."""
        return self.to_grid(values / scale) * scale


INT8 = QuantFormat("int8", 127.0, TensorProto.INT8, np.int8, "INT8", _round_to_int_grid(127.0))
FORMATS: dict[str, QuantFormat] = {fmt.name: fmt for fmt in (INT8,)}


def quant_format(name: str) -> QuantFormat:
    """The format called `name` (a variant's precision)."""
    if name not in FORMATS:
        raise ConfigError(f"no quantized format {name!r}: yoloq writes {', '.join(FORMATS)}")
    return FORMATS[name]
