"""The image input of an ONNX model, as a TensorRT build needs it: name, fixed (C, H, W) and layout (float NCHW, or
uint8 NHWC for `tensorrt.input: uint8`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from onnx import TensorProto

from yoloq.errors import InputError


@dataclass(frozen=True)
class OnnxInput:
    name: str
    channels: int
    height: int
    width: int
    layout: Literal["nchw", "nhwc"] = "nchw"

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        if self.layout == "nhwc":
            return (batch, self.height, self.width, self.channels)
        return (batch, self.channels, self.height, self.width)


def onnx_input(path: Path) -> OnnxInput:
    """The image input of an ONNX model: name and (C, H, W), which must be fixed (the batch may be dynamic); a uint8
    input is (N, H, W, C) (`yoloq.backends.tensorrt.uint8_input`)."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(values) != 4 or any(v is None for v in values[1:]):
        raise InputError(
            f"{path}: input {inputs[0].name!r} has shape {values}; TensorRT builds need (batch, 3, H, W) with fixed "
            "C, H, W: export with a fixed model.imgsz"
        )
    if inputs[0].type.tensor_type.elem_type == TensorProto.UINT8:
        return OnnxInput(inputs[0].name, int(values[3]), int(values[1]), int(values[2]), "nhwc")  # type: ignore[arg-type]
    return OnnxInput(inputs[0].name, int(values[1]), int(values[2]), int(values[3]))  # type: ignore[arg-type]
