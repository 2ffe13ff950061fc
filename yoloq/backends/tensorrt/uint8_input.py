"""A uint8 image input inside the engine (`tensorrt.input: uint8`): the host sends letterboxed frames as they are.

`add_uint8_input` is ONNX graph surgery with plain `onnx.helper`: the model's float (N, 3, H, W) input becomes a uint8
(N, H, W, 3) RGB input of the same name (`yoloq.preprocess.letterbox_rgb`'s frames, stacked) followed by
Cast -> Transpose -> Div 255, which is exactly the float frame `yoloq.preprocess.letterbox` computes on the host
(same values, bit for bit: checked in ONNX Runtime by the tests). The Cast comes first because TensorRT wants a uint8
network input to feed a Cast directly. What it saves, per 640 x 640 image: the host's float conversion (2.1 of 2.3 ms
of letterboxing on this project's CPU) and 3/4 of the host-to-GPU copy (1.2 MB instead of 4.9 MB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from yoloq.artifacts import atomic_path, file_sha256
from yoloq.cache import get_or_create
from yoloq.errors import InputError

_PREFIX = "/yoloq_uint8_input/"
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


def add_uint8_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose image input is uint8 (N, H, W, 3) RGB, converted inside the graph to the float
    (N, 3, H, W) / 255 frame the model was exported for."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"tensorrt.input uint8 needs one image input; the model has {[i.name for i in inputs]}")
    image = inputs[0]
    tensor_type = image.type.tensor_type
    if tensor_type.elem_type == TensorProto.UINT8:
        raise InputError(f"tensorrt.input uint8: input {image.name!r} is already uint8")
    if tensor_type.elem_type not in _FLOAT_TYPES:
        name = TensorProto.DataType.Name(tensor_type.elem_type)
        raise InputError(f"tensorrt.input uint8: input {image.name!r} is {name}; it must be FLOAT or FLOAT16")
    dims = list(tensor_type.shape.dim)
    if len(dims) != 4 or dims[1].dim_value != 3:
        shape = tuple(_dim(d) for d in dims)
        raise InputError(f"tensorrt.input uint8: input {image.name!r} must be (N, 3, H, W), not {shape}")
    if any(output.name == image.name for output in graph.output):
        raise InputError(f"tensorrt.input uint8: the input {image.name!r} is also a graph output")
    float_name = _PREFIX + "frame"
    for node in graph.node:  # every consumer of the old input now reads the converted frame
        for index, name in enumerate(node.input):
            if name == image.name:
                node.input[index] = float_name
    scale = numpy_helper.from_array(np.array(255.0, dtype=np.float32), _PREFIX + "255")
    cast, nchw, divided = _PREFIX + "cast", _PREFIX + "nchw", _PREFIX + "divided"
    nodes = [  # in float32, as the host does; an FP16-typed model then gets the host's float16 rounding of it
        helper.make_node("Cast", [image.name], [cast], to=TensorProto.FLOAT, name=_PREFIX + "Cast"),
        helper.make_node("Transpose", [cast], [nchw], perm=[0, 3, 1, 2], name=_PREFIX + "Transpose"),
        helper.make_node("Div", [nchw, scale.name], [divided], name=_PREFIX + "Div"),
    ]
    if tensor_type.elem_type == TensorProto.FLOAT:
        nodes[-1].output[0] = float_name
    else:
        nodes.append(helper.make_node("Cast", [divided], [float_name], to=tensor_type.elem_type, name=_PREFIX + "To"))
    batch, _, height, width = (_dim(d) for d in dims)
    new_input = helper.make_tensor_value_info(image.name, TensorProto.UINT8, [batch, height, width, 3])
    position = list(graph.input).index(image)
    graph.input.remove(image)
    graph.input.insert(position, new_input)
    graph.initializer.append(scale)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return out


def uint8_input_onnx(source: Path, out_dir: Path) -> Path:
    """`source` with a uint8 NHWC input (`add_uint8_input`), named by content hash and reused."""

    def produce(final: Path) -> None:
        with atomic_path(final) as tmp:
            onnx.save(add_uint8_input(onnx.load(str(source))), str(tmp))

    key = ["uint8-input-v1", file_sha256(source)]
    return get_or_create(out_dir, "model", key, ".uint8.onnx", produce, lambda path: path).value


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None
