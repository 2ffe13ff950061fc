"""The small interface every backend implements: build a variant, load it as a runner, run a batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from yoloq.config import Params, VariantConfig
from yoloq.heads import HeadFormat
from yoloq.speed import SpeedMeasures


@dataclass(frozen=True)
class BuiltModel:
    """A variant ready to run: an ONNX model (ONNX Runtime) or an engine (TensorRT)."""

    variant: VariantConfig
    path: Path
    size_mb: float
    build_seconds: float
    details: dict[str, str] = field(default_factory=dict)


def output_head_format(built: BuiltModel, head_format: HeadFormat) -> HeadFormat:
    """How to decode what `built` outputs: the model's head format, or end2end rows for an engine with NMS inside
    (`tensorrt.nms: efficient_nms`)."""
    return "end2end" if built.details.get("nms", "none") != "none" else head_format


class Runner(Protocol):
    """Runs NCHW float32 batches; returns the raw detection output."""

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


R = TypeVar("R")


@contextlib.contextmanager
def closing_runner(runner: R) -> Iterator[R]:
    """Yield `runner`, then close it, also on error (TensorRT runners hold GPU memory)."""
    try:
        yield runner
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()


class Backend(Protocol):
    name: str

    @classmethod
    def from_params(cls, params: Params | None) -> Backend:
        """The backend with its settings from `params` (its defaults without)."""
        ...

    def build(self, variant: VariantConfig, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path) -> BuiltModel:
        """Make the variant from the FP32 ONNX (or the Q/DQ ONNX for explicit INT8)."""
        ...

    def load(self, built: BuiltModel) -> Runner:
        """A runner for a built variant."""
        ...

    def speed_measures(self, runner: Runner, frames: np.ndarray, params: Params) -> SpeedMeasures:
        """How this backend times a loaded runner on `frames` (preprocessed images): see yoloq.speed."""
        ...
