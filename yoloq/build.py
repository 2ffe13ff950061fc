"""Build one variant; TensorRT builds run in a child process under the `build.timeout_s` deadline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from yoloq.backend_registry import backend_spec
from yoloq.backends import BuiltModel, get_backend
from yoloq.config import Params, VariantConfig
from yoloq.deadline import call_with_deadline

Progress = Callable[[str], None]


def _print_progress(message: str) -> None:
    print(message, flush=True)


def build_variant(
    variant: VariantConfig,
    params: Params,
    fp32_onnx: Path,
    qdq_onnx: Path | None,
    out_dir: Path,
    progress: Progress = _print_progress,
) -> BuiltModel:
    """Make one variant with its backend, in this process."""
    backend = get_backend(variant.backend, params)
    if hasattr(backend, "progress"):
        backend.progress = progress  # TensorRT builds take minutes: say what is happening
    return backend.build(variant, fp32_onnx, qdq_onnx, out_dir)


def build_variant_with_deadline(
    variant: VariantConfig,
    params: Params,
    fp32_onnx: Path,
    qdq_onnx: Path | None,
    out_dir: Path,
    progress: Progress = _print_progress,
) -> BuiltModel:
    """TensorRT engines are built in a child process killed after `params.build.timeout_s` (DeadlineExceeded).

    ONNX Runtime "builds" only pick a file and run here. A reused engine costs the child's start (a few seconds).
    """
    if not backend_spec(variant.backend).isolated_builds:
        return build_variant(variant, params, fp32_onnx, qdq_onnx, out_dir, progress)
    progress(f"build {variant.name}: TensorRT build in a child process, deadline {params.build.timeout_s:g} s")
    return call_with_deadline(
        build_variant, (variant, params, fp32_onnx, qdq_onnx, out_dir), params.build.timeout_s, f"build {variant.name}"
    )
