"""Per-layer profile of an engine: where the time of one batch goes, which kernel (and so which precision) each conv
runs, and how many reformats and Q/DQ layers TensorRT added. It answers "why is my INT8 engine not faster than FP16?".

Collect (needs TensorRT and a GPU, kept thin): an `IProfiler` on the execution context hears the time of every layer
of each `execute_async_v3` (after warm-up, averaged over the iterations); the engine inspector
(`get_engine_information(LayerInformationFormat.JSON)`) gives each layer's type and kernel (tactic) name. It has
them only for engines built with ProfilingVerbosity.DETAILED, as yoloq builds them (engine key v2).

Aggregate (pure, unit-tested on fake inspector JSON and fake layer times):
- conv precision from the kernel name (the inspector reports tensor formats as "N/A due to dynamic shapes" unless
  a context with shapes is set; kernel names always say it): `PRECISION_PATTERNS`, first match wins; a conv kernel
  whose name matches no pattern counts as FP32 (TensorRT's FP32 kernels often carry no type tag); a conv without a
  kernel name falls back to its input tensor format, else "unknown";
- reformat layers (LayerType Reformat, named `Reformatting CopyNode for ...`), Q/DQ layers not fused into a conv
  (a Quantize/Dequantize node alone or fused with pointwise ops), convs per precision, other layers;
- time per model block: a layer goes to the `/model.N/` block of the first of its fused names that has one
  (TensorRT joins fused names with ` + ` and wraps pointwise fusions in `PWN(...)`), else to "other".
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from yoloq.backends.tensorrt.runner import TensorRTRunner
from yoloq.errors import InputError

LayerKind = Literal["conv", "reformat", "qdq", "other"]
UNKNOWN = "unknown"
OTHER_BLOCK = "other"

# Kernel (tactic) name fragments -> precision, checked in this order (INT8 kernels also name their FP32 epilogue).
PRECISION_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("INT8", ("i8i8", "i8i32", "int8", "imma")),  # i8f16_i8i32: INT8 in, int32 accumulate, FP16 out
    ("FP8", ("e4m3", "fp8")),
    ("BF16", ("bf16",)),
    ("FP16", ("f16f16", "h884", "h1688", "hmma", "fp16")),
    ("TF32", ("tf32",)),
    ("FP32", ("f32f32", "scudnn", "sgemm", "fp32")),
)
# Tensor format strings (inspector "Format/Datatype", TensorRT 11 "Datatype") -> precision, for convs without kernels.
FORMAT_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("INT8", ("int8",)),
    ("FP8", ("fp8",)),
    ("BF16", ("bf16",)),
    ("FP16", ("fp16", "half")),
    ("FP32", ("fp32", "float")),
)
PRECISIONS = ("INT8", "FP8", "BF16", "FP16", "TF32", "FP32", UNKNOWN)

_BLOCK = re.compile(r"(?:^|[^\w.])model\.(\d+)[/.]")
_QDQ_NAME = re.compile(r"quantize", re.IGNORECASE)  # QuantizeLinear, DequantizeLinear, ModelOpt's */input_quantizer/*
_CONV_OP = re.compile(r"^(Conv|Gemm|MatMul)(_\d+)?$")  # the ONNX op in a node name, when the inspector gives no type


@dataclass(frozen=True)
class InspectedLayer:
    """One layer as the engine inspector describes it."""

    name: str
    layer_type: str  # "CaskConvolution", "Reformat", "PointWiseV2", ...; "unknown" without DETAILED verbosity
    tactic: str  # the kernel name, "" when none is given
    input_format: str  # the first input's format/datatype, "" when none is given
    parameter_type: str = ""  # "Convolution", "Pooling", ... (DETAILED only)


@dataclass(frozen=True)
class LayerProfile:
    """One engine layer: its average time per execution and what it is."""

    name: str
    layer_type: str
    kind: LayerKind
    ms: float
    precision: str | None  # conv layers only
    block: str  # "model.N" or "other"
    tactic: str


@dataclass(frozen=True)
class EngineProfile:
    engine: str
    batch: int
    iterations: int
    warmup: int
    detailed: bool  # the inspector gave layer types and kernels (ProfilingVerbosity.DETAILED)
    layers: tuple[LayerProfile, ...]
    environment: dict[str, str] = field(default_factory=dict)  # TensorRT version, GPU


@dataclass(frozen=True)
class Bucket:
    count: int
    ms: float


@dataclass(frozen=True)
class ProfileSummary:
    total_ms: float  # per batch: the sum of the layers' average times
    images_per_s: float  # batch / total; the profiler's per-layer synchronisation makes this a lower bound
    convs: dict[str, Bucket]  # precision -> convs, in PRECISIONS order, only precisions present
    reformat: Bucket
    qdq: Bucket
    other: Bucket
    blocks: dict[str, dict[str, float]]  # block -> category (see `category`) -> ms, blocks in model order
    top: tuple[LayerProfile, ...]  # the slowest layers, slowest first


# -- parse and classify (pure) -----------------------------------------------------------------------------------


def parse_engine_information(text: str) -> tuple[list[InspectedLayer], bool]:
    """The layers of the inspector's JSON, and whether it had details (DETAILED) or names only."""
    try:
        document = json.loads(text, strict=False)  # TensorRT 8.6 writes raw control characters in strings
    except ValueError as exc:
        raise InputError(f"the engine inspector returned no JSON ({exc}): {text[:200]!r}") from exc
    items = document.get("Layers", []) if isinstance(document, dict) else []
    layers: list[InspectedLayer] = []
    detailed = False
    for item in items:
        if isinstance(item, dict):
            detailed = True
            inputs = item.get("Inputs") or []
            first = inputs[0] if inputs and isinstance(inputs[0], dict) else {}
            layers.append(
                InspectedLayer(
                    name=str(item.get("Name", "")),
                    layer_type=str(item.get("LayerType", UNKNOWN)),
                    tactic=str(item.get("TacticName", "") or ""),
                    input_format=str(
                        first.get("Format/Datatype") or " ".join(str(first.get(k, "")) for k in ("Datatype", "Format"))
                    ).strip(),
                    parameter_type=str(item.get("ParameterType", "")),
                )
            )
        else:
            layers.append(InspectedLayer(str(item), UNKNOWN, "", ""))
    return layers, detailed


def name_parts(name: str) -> list[str]:
    """The ONNX node names a TensorRT layer name joins: `a + PWN(PWN(b), c)` -> [a, b, c]."""
    text = name
    for wrapper in ("{ForeignNode[", "]}", "PWN(", ")", ", ", "..."):
        text = text.replace(wrapper, " + ")
    return [part.strip() for part in text.split(" + ") if part.strip()]


def block_of(name: str) -> str:
    """`model.N` of the first fused name that has a `/model.N/` (or `model.N.` weight) part, else "other"."""
    match = _BLOCK.search(name)
    return f"model.{match.group(1)}" if match else OTHER_BLOCK


def precision_of_kernel(tactic: str) -> str | None:
    """The precision a conv kernel name says, by `PRECISION_PATTERNS`; None when it says none."""
    lowered = tactic.lower()
    for precision, fragments in PRECISION_PATTERNS:
        if any(fragment in lowered for fragment in fragments):
            return precision
    return None


def precision_of_format(text: str) -> str | None:
    lowered = text.lower()
    if not lowered or "n/a" in lowered:
        return None
    for precision, fragments in FORMAT_PATTERNS:
        if any(fragment in lowered for fragment in fragments):
            return precision
    return None


def conv_precision(layer: InspectedLayer) -> str:
    """The precision of a conv layer: from its kernel name, an unmatched kernel name is FP32, then from its input
    format, else "unknown"."""
    if layer.tactic:
        return precision_of_kernel(layer.tactic) or "FP32"
    return precision_of_format(layer.input_format) or UNKNOWN


def is_conv(layer: InspectedLayer) -> bool:
    lowered = layer.layer_type.lower()
    if any(word in lowered for word in ("convolution", "gemm", "matrixmultiply")):
        return True
    if layer.parameter_type in ("Convolution", "Deconvolution", "MatrixMultiply", "FullyConnected"):
        return True
    if layer.layer_type == UNKNOWN:  # names only: the ONNX op ends the node name (/model.0/conv/Conv)
        return any(_CONV_OP.match(part.rsplit("/", 1)[-1]) for part in name_parts(layer.name))
    return False


def layer_kind(layer: InspectedLayer) -> LayerKind:
    if layer.layer_type == "Reformat" or layer.name.startswith("Reformatting CopyNode"):
        return "reformat"
    if is_conv(layer):
        return "conv"
    if layer.layer_type.lower() in ("quantize", "dequantize") or any(
        _QDQ_NAME.search(p) for p in name_parts(layer.name)
    ):
        return "qdq"
    return "other"


def layer_profiles(information: str, times: dict[str, float]) -> tuple[list[LayerProfile], bool]:
    """Every engine layer with its average time: the inspector's layers in engine order (0 ms for layers the
    profiler did not report, such as no-ops), then layers only the profiler named."""
    inspected, detailed = parse_engine_information(information)
    known = {layer.name for layer in inspected}
    inspected += [InspectedLayer(name, UNKNOWN, "", "") for name in times if name not in known]
    profiles = []
    for layer in inspected:
        kind = layer_kind(layer)
        profiles.append(
            LayerProfile(
                name=layer.name,
                layer_type=layer.layer_type,
                kind=kind,
                ms=float(times.get(layer.name, 0.0)),
                precision=conv_precision(layer) if kind == "conv" else None,
                block=block_of(layer.name),
                tactic=layer.tactic,
            )
        )
    return profiles, detailed


# -- aggregate (pure) --------------------------------------------------------------------------------------------


def category(layer: LayerProfile) -> str:
    """The plot's stack a layer belongs to: "<precision> conv", "reformat", "Q/DQ" or "other"."""
    if layer.kind == "conv":
        return f"{layer.precision or UNKNOWN} conv"
    return {"reformat": "reformat", "qdq": "Q/DQ"}.get(layer.kind, "other")


def _bucket(layers: list[LayerProfile]) -> Bucket:
    return Bucket(len(layers), sum(layer.ms for layer in layers))


def _block_order(block: str) -> tuple[int, int]:
    return (1, 0) if block == OTHER_BLOCK else (0, int(block.split(".")[1]))


def summarize(profile: EngineProfile, top: int = 10) -> ProfileSummary:
    layers = list(profile.layers)
    total = sum(layer.ms for layer in layers)
    convs = [layer for layer in layers if layer.kind == "conv"]
    by_precision = {p: _bucket([c for c in convs if (c.precision or UNKNOWN) == p]) for p in PRECISIONS}
    blocks: dict[str, dict[str, float]] = {}
    for layer in layers:
        stacks = blocks.setdefault(layer.block, {})
        stacks[category(layer)] = stacks.get(category(layer), 0.0) + layer.ms
    return ProfileSummary(
        total_ms=total,
        images_per_s=profile.batch * 1000.0 / total if total > 0 else 0.0,
        convs={p: bucket for p, bucket in by_precision.items() if bucket.count},
        reformat=_bucket([layer for layer in layers if layer.kind == "reformat"]),
        qdq=_bucket([layer for layer in layers if layer.kind == "qdq"]),
        other=_bucket([layer for layer in layers if layer.kind == "other"]),
        blocks={block: blocks[block] for block in sorted(blocks, key=_block_order)},
        top=tuple(sorted(layers, key=lambda layer: -layer.ms)[:top]),
    )


def profile_metrics(summary: ProfileSummary) -> dict[str, float]:
    """The key numbers for MLflow: `profile.total_ms`, `profile.reformat_ms`, `profile.int8_convs`, ..."""
    metrics = {
        "profile.total_ms": summary.total_ms,
        "profile.images_per_s": summary.images_per_s,
        "profile.reformat_ms": summary.reformat.ms,
        "profile.reformat_count": float(summary.reformat.count),
        "profile.qdq_ms": summary.qdq.ms,
        "profile.qdq_count": float(summary.qdq.count),
        "profile.other_ms": summary.other.ms,
    }
    for precision in PRECISIONS:
        bucket = summary.convs.get(precision, Bucket(0, 0.0))
        if bucket.count or precision in ("INT8", "FP16", "TF32", "FP32", UNKNOWN):
            metrics[f"profile.{precision.lower()}_convs"] = float(bucket.count)
            metrics[f"profile.{precision.lower()}_conv_ms"] = bucket.ms
    return metrics


def profile_line(metrics: dict[str, float]) -> str:
    """`profile_metrics` in one line: "3.081 ms per batch, 51/3/10 INT8/FP16/FP32 convs, 44 reformats (0.859 ms)"."""
    convs = "/".join(f"{metrics.get(f'profile.{p}_convs', 0.0):.0f}" for p in ("int8", "fp16", "fp32"))
    return (
        f"{metrics['profile.total_ms']:.3f} ms per batch, {convs} INT8/FP16/FP32 convs, "
        f"{metrics['profile.reformat_count']:.0f} reformats ({metrics['profile.reformat_ms']:.3f} ms)"
    )


def findings(profile: EngineProfile, summary: ProfileSummary) -> list[str]:
    """Plain statements of where an engine spends time it might not need to (no advice beyond the facts)."""
    total = summary.total_ms or 1.0
    lines = []
    if not profile.detailed:
        lines.append(
            "the engine has no layer details (built without ProfilingVerbosity.DETAILED, e.g. by yoloq before engine "
            "key v2): kernels and precisions are unknown; rebuild it with this yoloq"
        )
    convs = [layer for layer in profile.layers if layer.kind == "conv"]
    slow_float = sorted((c for c in convs if c.precision in ("FP32", "TF32")), key=lambda c: -c.ms)
    if slow_float:
        ms = sum(c.ms for c in slow_float)
        named = ", ".join(f"{c.name} ({c.precision}, {c.ms:.3f} ms)" for c in slow_float[:3])
        lines.append(
            f"{len(slow_float)} conv layers run FP32/TF32 kernels: {ms:.3f} ms ({ms / total:.0%} of the batch); "
            f"slowest: {named}"
        )
    if convs and profile.detailed and "INT8" not in summary.convs:
        lines.append("no conv layer runs an INT8 kernel")
    if summary.reformat.count:
        lines.append(
            f"{summary.reformat.count} reformat layers (precision or layout changes between layers) cost "
            f"{summary.reformat.ms:.3f} ms ({summary.reformat.ms / total:.0%})"
        )
    if summary.qdq.count:
        lines.append(
            f"{summary.qdq.count} Q/DQ layers not fused into a conv cost {summary.qdq.ms:.3f} ms "
            f"({summary.qdq.ms / total:.0%})"
        )
    unknown = summary.convs.get(UNKNOWN)
    if unknown and profile.detailed:
        lines.append(f"{unknown.count} conv layers name no kernel: their precision is unknown")
    return lines


# -- collect (TensorRT, GPU) -------------------------------------------------------------------------------------


def make_profiler(trt: Any, record: Callable[[str, float], None]) -> Any:
    """A `tensorrt.IProfiler` that passes every (layer name, ms) report to `record`."""

    class LayerTimes(trt.IProfiler):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)  # the bindings need the base initialised explicitly

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            record(layer_name, ms)

    return LayerTimes()


def collect_layer_times(runner: TensorRTRunner, batch: np.ndarray, iterations: int, warmup: int) -> dict[str, float]:
    """Average ms per execution of every layer TensorRT reports, over `iterations` executions after `warmup`."""
    totals: dict[str, float] = {}

    def record(name: str, ms: float) -> None:
        totals[name] = totals.get(name, 0.0) + float(ms)

    runner.set_profiler(make_profiler(runner.trt, record))
    runner.set_input(batch)
    for _ in range(warmup):
        runner.execute()
        runner.synchronize()
    totals.clear()
    for _ in range(iterations):
        runner.execute()
        runner.synchronize()
    if not totals:
        raise RuntimeError("TensorRT reported no layer times to the profiler (IExecutionContext.profiler)")
    return {name: total / iterations for name, total in totals.items()}


def engine_information(runner: TensorRTRunner) -> str:
    """The engine inspector's JSON, with the runner's context set so shapes (and formats) are concrete."""
    inspector = runner.engine.create_engine_inspector()
    with contextlib.suppress(AttributeError, TypeError):  # optional: without it formats read "N/A"
        inspector.execution_context = runner.context
    return str(inspector.get_engine_information(runner.trt.LayerInformationFormat.JSON))


def profile_engine(
    engine_path: Path, batch: int | None, iterations: int, warmup: int, environment: dict[str, str] | None = None
) -> EngineProfile:
    """Profile `engine_path` at `batch` (default: its profile's max batch) on random input: in [0, 1), or random
    pixels for a uint8 input."""
    if iterations < 1 or warmup < 0:
        raise InputError(f"profile: iterations must be >= 1 and warm-up >= 0, got {iterations} and {warmup}")
    with TensorRTRunner(engine_path) as runner:
        size = batch or runner.max_batch
        if not runner.min_batch <= size <= runner.max_batch:
            raise InputError(
                f"batch {size} is outside the engine's profile {runner.min_batch}..{runner.max_batch}: "
                "pick --batch within it"
            )
        rng = np.random.default_rng(0)
        shape = (size, *runner.sample_shape)
        if runner.input_layout == "nhwc-uint8":
            sample = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            sample = rng.random(shape, dtype=np.float32)
        times = collect_layer_times(runner, sample, iterations, warmup)
        information = engine_information(runner)
    layers, detailed = layer_profiles(information, times)
    return EngineProfile(str(engine_path), size, iterations, warmup, detailed, tuple(layers), dict(environment or {}))
