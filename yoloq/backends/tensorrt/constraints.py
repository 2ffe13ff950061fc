"""Layer precision constraints on a parsed TensorRT network (8.6 - 10.x), duck-typed over the network: no TensorRT
import, unit-tested with fake networks. Layers are named like the ONNX nodes (the ONNX parser keeps node names).

- `hold_layers_in_float`: implicit INT8 variants' `float_layers`, obeyed (OBEY_PRECISION_CONSTRAINTS);
- `convs_outside_qdq` + `prefer_precision`: in Q/DQ networks, the convs no Dequantize layer feeds (the ones the
  Q/DQ model left in float) asked to run in FP16 (PREFER_PRECISION_CONSTRAINTS).
"""

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


def convs_outside_qdq(network: Any, conv_type: Any, dequantize_type: Any) -> list[str]:
    """Names of the convolution layers (`layer.type == conv_type`) none of whose inputs (data, weights, bias) is
    produced by a Dequantize layer: in a Q/DQ network, the convs left in float. In network order."""
    layers = [network.get_layer(index) for index in range(network.num_layers)]
    producers = {layer.get_output(j).name: layer for layer in layers for j in range(layer.num_outputs)}
    selected = []
    for layer in layers:
        if layer.type != conv_type:
            continue
        inputs = [layer.get_input(index) for index in range(layer.num_inputs)]
        sources = [producers.get(tensor.name) for tensor in inputs if tensor is not None]
        if not any(source is not None and source.type == dequantize_type for source in sources):
            selected.append(layer.name)
    return selected


def prefer_precision(network: Any, names: Sequence[str], precision: Any) -> list[str]:
    """Set the compute precision of the layers named `names` (their output types are left to TensorRT); with
    PREFER_PRECISION_CONSTRAINTS TensorRT uses it where a kernel exists. Raises EngineBuildError for unknown names."""
    layers = {network.get_layer(i).name: network.get_layer(i) for i in range(network.num_layers)}
    missing = [name for name in names if name not in layers]
    if missing:
        raise EngineBuildError(f"layers {missing[:5]} are not in the TensorRT network")
    for name in names:
        layers[name].precision = precision
    return list(names)
