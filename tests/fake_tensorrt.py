"""Fake `tensorrt`, `polygraphy.cuda` and `polygraphy.backend.trt.util` modules for CPU tests of the runner and the
profiler: they record every device allocation, stream and TensorRT object, so tests can check what was freed.

`install(monkeypatch, ...)` puts them into sys.modules (the runner imports them with importlib) and returns the fake
driver state (`FakeDevice`)."""

from __future__ import annotations

import ctypes
import itertools
import json
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

INPUT, OUTPUT = "images", "output0"


@dataclass
class FakeDevice:
    """What the fake CUDA and TensorRT did: live allocations and streams, and weak references to TRT objects."""

    fail_malloc_at: int | None = None  # the n-th malloc (0-based) raises
    reject_address_of: str | None = None  # set_tensor_address returns False for this tensor
    layers: list[tuple[str, float]] = field(default_factory=list)  # what the profiler hears per execution
    slow_executions: int = 0  # the first executions report 10x the layer times (a cold GPU)
    inspector_json: str = '{"Layers": [], "Bindings": []}'
    profile: tuple[int, int, int] = (1, 8, 32)
    allocated: dict[int, int] = field(default_factory=dict)  # pointer -> bytes
    mallocs: int = 0
    freed: list[int] = field(default_factory=list)
    streams_open: int = 0
    executions: int = 0
    inspected_with_context: bool = False
    objects: list[weakref.ref] = field(default_factory=list)  # runtime, engine, context
    input_hw: int = 64  # the engine's input is (N, 3, input_hw, input_hw), or (N, input_hw, input_hw, 3) uint8
    uint8_input: bool = False  # an engine built with tensorrt.input uint8
    pinned: bool = False  # the CUDA runtime hands out pinned host memory (cudaHostAlloc)
    pinned_live: dict[int, Any] = field(default_factory=dict)  # pinned pointer -> its ctypes buffer
    pinned_freed: int = 0
    outputs: dict[str, tuple[tuple[int, ...], str]] = field(
        default_factory=lambda: {OUTPUT: ((84, 10), "FLOAT")}
    )  # output name -> (shape of one image's output, TensorRT type name)
    compute: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None  # input batch -> outputs, run on execute
    memory: dict[int, bytearray] = field(default_factory=dict)  # device bytes (pointer -> contents)

    def alive(self) -> list[str]:
        return [type(o).__name__ for o in (ref() for ref in self.objects) if o is not None]


def install(monkeypatch: pytest.MonkeyPatch, device: FakeDevice | None = None) -> FakeDevice:
    device = device or FakeDevice()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(device))
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", fake_cuda(device))
    util = types.ModuleType("polygraphy.backend.trt.util")
    util.get_trt_logger = lambda: "logger"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt.util", util)
    return device


# -- polygraphy.cuda ------------------------------------------------------------------------------------------------


def fake_cuda(device: FakeDevice) -> types.ModuleType:
    pointers = itertools.count(0x1000, 0x1000)

    class Cudart:
        """The two pinned-memory calls of the CUDA runtime, over ctypes buffers."""

        def cudaHostAlloc(self, pointer: Any, nbytes: Any, flags: Any) -> int:  # noqa: N802 (CUDA's name)
            buffer = ctypes.create_string_buffer(nbytes.value)
            pointer._obj.value = ctypes.addressof(buffer)
            device.pinned_live[ctypes.addressof(buffer)] = buffer
            return 0

        def cudaFreeHost(self, pointer: Any) -> int:  # noqa: N802
            del device.pinned_live[pointer.value]
            device.pinned_freed += 1
            return 0

    class Cuda:
        handle: Any = Cudart() if device.pinned else "cudart"

        def malloc(self, nbytes: int) -> int:
            index = device.mallocs
            device.mallocs += 1
            if device.fail_malloc_at == index:
                raise RuntimeError("cudaMalloc: out of memory")
            pointer = next(pointers)
            device.allocated[pointer] = nbytes
            device.memory[pointer] = bytearray(nbytes)
            return pointer

        def free(self, pointer: int) -> None:
            del device.allocated[pointer]
            device.memory.pop(pointer, None)
            device.freed.append(pointer)

        def memcpy(self, dst: int, src: int, nbytes: int, kind: str, stream_ptr: int | None = None) -> None:
            if kind == "h2d" and dst in device.memory:
                device.memory[dst][:nbytes] = ctypes.string_at(src, nbytes)
            elif kind == "d2h" and src in device.memory:
                ctypes.memmove(dst, bytes(device.memory[src][:nbytes]), nbytes)

    class Stream:
        def __init__(self) -> None:
            device.streams_open += 1
            self.ptr = 0xBEEF

        def synchronize(self) -> None:
            pass

        def free(self) -> None:
            device.streams_open -= 1

    module = types.ModuleType("polygraphy.cuda")
    cuda = Cuda()
    module.wrapper = lambda: cuda  # type: ignore[attr-defined]
    module.Stream = Stream  # type: ignore[attr-defined]
    module.MemcpyKind = types.SimpleNamespace(HostToDevice="h2d", DeviceToHost="d2h")  # type: ignore[attr-defined]
    return module


# -- tensorrt -------------------------------------------------------------------------------------------------------


def fake_tensorrt(device: FakeDevice) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "8.6.1"  # type: ignore[attr-defined]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")  # type: ignore[attr-defined]
    trt.LayerInformationFormat = types.SimpleNamespace(ONELINE="oneline", JSON="json")  # type: ignore[attr-defined]
    trt.ProfilingVerbosity = types.SimpleNamespace(LAYER_NAMES_ONLY="names", DETAILED="detailed")  # type: ignore[attr-defined]
    tensor_names = (INPUT, *device.outputs)

    def input_sample() -> tuple[int, int, int]:
        size = device.input_hw
        return (size, size, 3) if device.uint8_input else (3, size, size)

    class IProfiler:
        def __init__(self) -> None:
            self.initialised = True

    class Inspector:
        def __init__(self) -> None:
            self.execution_context: Any = None

        def get_engine_information(self, fmt: str) -> str:
            assert fmt == "json"
            device.inspected_with_context = self.execution_context is not None
            return device.inspector_json

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.profiler: Any = None
            self.batch = engine.profile[2]
            self.addresses: dict[str, int] = {}
            device.objects.append(weakref.ref(self))

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.batch = int(shape[0])
            return device.profile[0] <= self.batch <= device.profile[2]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (self.batch, *input_sample()) if name == INPUT else (self.batch, *device.outputs[name][0])

        def set_tensor_address(self, name: str, pointer: int) -> bool:
            self.addresses[name] = pointer
            return name != device.reject_address_of

        def execute_async_v3(self, stream: int) -> bool:
            factor = 10.0 if device.executions < device.slow_executions else 1.0
            device.executions += 1
            if device.compute is not None:
                shape = self.get_tensor_shape(INPUT)
                dtype = np.uint8 if device.uint8_input else np.float32
                data = device.memory[self.addresses[INPUT]][: int(np.prod(shape)) * np.dtype(dtype).itemsize]
                results = device.compute(np.frombuffer(bytes(data), dtype).reshape(shape))
                for name, value in results.items():
                    raw = np.ascontiguousarray(value).tobytes()
                    device.memory[self.addresses[name]][: len(raw)] = raw
            if self.profiler is not None:
                for name, ms in device.layers:
                    self.profiler.report_layer_time(name, ms * factor)
            return True

    class Engine:
        num_io_tensors = len(tensor_names)
        profile = device.profile

        def __init__(self) -> None:
            device.objects.append(weakref.ref(self))

        def get_tensor_name(self, index: int) -> str:
            return tensor_names[index]

        def get_tensor_mode(self, name: str) -> str:
            return "input" if name == INPUT else "output"

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            return [(b, *input_sample()) for b in device.profile]

        def get_tensor_dtype(self, name: str) -> Any:
            if name == INPUT:
                return types.SimpleNamespace(name="UINT8" if device.uint8_input else "FLOAT")
            return types.SimpleNamespace(name=device.outputs[name][1])

        def create_execution_context(self) -> Context:
            return Context(self)

        def create_engine_inspector(self) -> Inspector:
            return Inspector()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            device.objects.append(weakref.ref(self))

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            return Engine() if data.startswith(b"engine") else None

    trt.IProfiler = IProfiler  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    return trt


def inspector_document(layers: list[dict[str, Any] | str]) -> str:
    """The engine inspector's JSON for these layers (dicts with ProfilingVerbosity.DETAILED, names without)."""
    return json.dumps({"Layers": layers, "Bindings": [INPUT, OUTPUT]})
