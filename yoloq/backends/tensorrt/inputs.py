"""The image input of an ONNX model, as a TensorRT build needs it: name and fixed (C, H, W)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from yoloq.errors import InputError


@dataclass(frozen=True)
class OnnxInput:
    name: str
    channels: int
    height: int
    width: int

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.channels, self.height, self.width)


def onnx_input(path: Path) -> OnnxInput:
    """The image input of an ONNX model: name and (C, H, W), which must be fixed (the batch may be dynamic)."""
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
    return OnnxInput(inputs[0].name, int(values[1]), int(values[2]), int(values[3]))  # type: ignore[arg-type]
