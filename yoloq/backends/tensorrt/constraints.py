"""Layer precision constraints on a parsed TensorRT network, selected by ONNX node name (the ONNX parser keeps
node names as layer names). Duck-typed over the network: no TensorRT import, unit-tested with fake networks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from yoloq.errors import EngineBuildError


def hold_layers_in_float(network: Any, names: Sequence[str], float_type: Any) -> list[str]:
    """Constrain the network layers named like the ONNX nodes `names` (the ONNX parser keeps node names) to
    `float_type`, outputs included; with OBEY_PRECISION_CONSTRAINTS TensorRT keeps them out of INT8.
    Raises EngineBuildError naming any node the network lacks."""
    layers = {network.get_layer(i).name: network.get_layer(i) for i in range(network.num_layers)}
    missing = [name for name in names if name not in layers]
    if missing:
        raise EngineBuildError(
            f"float_layers {missing[:5]} name no layer of the TensorRT network: use ONNX node names of the FP32 "
            "model (as the search reports them, e.g. /model.2/cv1/conv/Conv)"
        )
    for name in names:
        layer = layers[name]
        layer.precision = float_type
        for index in range(layer.num_outputs):
            layer.set_output_type(index, float_type)
    return list(names)
