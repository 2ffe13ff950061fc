"""What the installed TensorRT can build, decided from its version alone: pure rules, unit-tested with fakes on CPU.

Nothing here imports tensorrt. Callers pass the version (or an importer and a GPU lister) in.

Facts these rules encode (NVIDIA's TensorRT migration guides; ../shared/docs/facts.md):
- 8.6 is the oldest version yoloq supports: builder optimization levels, name-based I/O tensors, `set_input_shape`
  and `execute_async_v3` all exist from 8.6 on.
- 8.6 - 10.x are weakly typed: FP16 and INT8 come from BuilderFlag.FP16/INT8; implicit INT8 needs a calibrator
  (IInt8MinMaxCalibrator, IInt8EntropyCalibrator2, IInt8LegacyCalibrator); a Q/DQ network also needs the INT8
  flag (and FP16 for the layers outside Q/DQ pairs). 10.1 deprecated every calibrator; they still work in 10.x.
- With the FP16 flag alone, TensorRT 8.6 ran the float stem conv of yoloq's Q/DQ engines on an FP32 kernel
  (1.17 ms vs 0.30 ms in FP16 at batch 32); layer precision (`layer.precision`) with PREFER_PRECISION_CONSTRAINTS
  asks for FP16 there (8.6 - 10.x; 11.x has no precision constraints).
- 11.x removed the calibrators, BuilderFlag.FP16/INT8 and precision constraints: every network is strongly
  typed. INT8 exists only as Q/DQ nodes in the ONNX; FP16 only as FP16 types in the ONNX (ModelOpt AutoCast, or
  onnxconverter-common's float16 converter).
- Calibration caches start with `TRT-<NV_TENSORRT_VERSION>-<algorithm>` and are not portable across versions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from yoloq.backends.tensorrt.cuda import CudaUnavailable, GpuInfo
from yoloq.config import TrtCalibrator, VariantConfig
from yoloq.errors import BackendUnavailable

INSTALL_HINT = (
    "install TensorRT with pip install '.[tensorrt]' on a machine with an NVIDIA GPU and driver "
    "(TensorRT 8.6, 10.x or 11.x), or use backend: onnxruntime (fp32, int8 qdq) or backend: auto"
)
MIN_SUPPORTED = (8, 6)
MAX_SUPPORTED_MAJOR = 11

CALIBRATOR_CLASSES: dict[str, str] = {
    "minmax": "IInt8MinMaxCalibrator",
    "entropy2": "IInt8EntropyCalibrator2",
    "legacy": "IInt8LegacyCalibrator",
}
CACHE_HEADER_ALGORITHMS: dict[str, str] = {
    "minmax": "MinMaxCalibration",
    "entropy2": "EntropyCalibration2",
    "legacy": "LegacyCalibration",
}
FP16_CONVERTERS: dict[str, str] = {
    "modelopt": "pip install 'nvidia-modelopt[onnx]' (ModelOpt AutoCast, NVIDIA's tool)",
    "onnxconverter-common": "pip install onnxconverter-common (float16.convert_float_to_float16, keep_io_types)",
}

OnnxSource = Literal["fp32", "qdq", "fp16"]


class UnsupportedVariant(BackendUnavailable):
    """The variant cannot exist on the installed TensorRT (the message says why and what to use instead)."""


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def nv_number(self) -> int:
        """NV_TENSORRT_VERSION, as calibration cache headers write it: 8.6.1 -> 8601, 10.3.0 -> 100300."""
        if self.major >= 10:
            return self.major * 10000 + self.minor * 100 + self.patch
        return self.major * 1000 + self.minor * 100 + self.patch


def parse_version(text: str) -> TrtVersion:
    """'8.6.1', '10.3.0.26', '11.0.0.post1' -> TrtVersion."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"not a TensorRT version: {text!r}")
    return TrtVersion(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))


def version_from_number(number: int) -> TrtVersion:
    """NV_TENSORRT_VERSION (getInferLibVersion, cache headers) -> TrtVersion: 8600 -> 8.6.0, 100300 -> 10.3.0."""
    if number >= 10000:
        return TrtVersion(number // 10000, number // 100 % 100, number % 100)
    return TrtVersion(number // 1000, number // 100 % 10, number % 100)


@dataclass(frozen=True)
class Capabilities:
    version: TrtVersion
    calibrators: bool  # implicit INT8 through IInt8*Calibrator (8.6 - 10.x)
    calibrators_deprecated: bool  # 10.1+
    precision_flags: bool  # BuilderFlag.FP16 / INT8 exist (8.6 - 10.x)
    strongly_typed_only: bool  # 11+: types come from the ONNX only


def unsupported_version_reason(version: TrtVersion) -> str | None:
    """Why yoloq cannot use this TensorRT, or None when it can."""
    if (version.major, version.minor) < MIN_SUPPORTED:
        return (
            f"TensorRT {version} is too old: yoloq needs 8.6 or newer (builder optimization levels, "
            "name-based tensors and execute_async_v3)"
        )
    if version.major > MAX_SUPPORTED_MAJOR:
        return (
            f"TensorRT {version} is newer than yoloq knows (8.6, 10.x, 11.x): its API rules are unchecked here; "
            "install TensorRT 11.x or update yoloq"
        )
    return None


def capabilities(version: TrtVersion) -> Capabilities:
    reason = unsupported_version_reason(version)
    if reason:
        raise BackendUnavailable(f"backend 'tensorrt': {reason}")
    weakly_typed = version.major < 11
    return Capabilities(
        version=version,
        calibrators=weakly_typed,
        calibrators_deprecated=(version.major, version.minor) >= (10, 1),
        precision_flags=weakly_typed,
        strongly_typed_only=not weakly_typed,
    )


@dataclass(frozen=True)
class BuildPlan:
    """How one variant is built on the installed TensorRT."""

    onnx: OnnxSource  # the network is parsed from the FP32, the Q/DQ, or an FP16-typed ONNX
    fp16_flag: bool
    int8_flag: bool
    calibrator: TrtCalibrator | None
    strongly_typed: bool
    fp16_converter: str | None = None  # for onnx == "fp16"
    notes: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()  # implicit INT8: layers held in FP16/FP32 by precision constraints (obeyed)
    fp16_float_convs: bool = False  # Q/DQ, weakly typed: convs outside Q/DQ preferred in FP16 (precision constraints)

    @property
    def tag(self) -> str:
        """A short file-name part naming what the engine is: fp32, fp16, int8-minmax, int8-qdq."""
        if self.calibrator:
            return f"int8-{self.calibrator}"
        if self.onnx == "qdq":
            return "int8-qdq"
        return "fp16" if self.fp16_flag or self.onnx == "fp16" else "fp32"

    def describe(self) -> str:
        flags = "+".join(f for f, on in (("FP16", self.fp16_flag), ("INT8", self.int8_flag)) if on) or "none"
        parts = [f"network from the {self.onnx} ONNX", f"builder flags {flags}"]
        if self.calibrator:
            parts.append(f"calibrator {CALIBRATOR_CLASSES[self.calibrator]}")
        if self.strongly_typed:
            parts.append("strongly typed")
        if self.fp16_converter:
            parts.append(f"FP16 ONNX by {self.fp16_converter}")
        if self.float_layers:
            parts.append(f"{len(self.float_layers)} layers held out of INT8 by precision constraints")
        if self.fp16_float_convs:
            parts.append("convs outside Q/DQ preferred in FP16 by precision constraints")
        return ", ".join(parts)

    @property
    def precision_constraints(self) -> str | None:
        """Polygraphy's `CreateConfig(precision_constraints=...)` for this plan: "obey" for float layers of implicit
        INT8, "prefer" for FP16 convs outside Q/DQ, else None (TensorRT ignores layer precisions)."""
        if self.float_layers:
            return "obey"
        if self.fp16_float_convs:
            return "prefer"
        return None


def plan_variant(
    variant: VariantConfig, caps: Capabilities, fp16_fallback: bool, fp16_converter: str | None
) -> BuildPlan:
    """The build plan of `variant` on TensorRT `caps.version`; raises UnsupportedVariant when it cannot exist there.

    `fp16_converter` is the installed FP16 ONNX converter (see `find_fp16_converter`), needed for fp16 on 11.x.
    """
    version = caps.version
    if variant.precision == "fp32":
        return BuildPlan("fp32", False, False, None, strongly_typed=caps.strongly_typed_only)
    if variant.precision == "fp16":
        if caps.precision_flags:
            return BuildPlan("fp32", True, False, None, strongly_typed=False)
        if fp16_converter is None:
            hints = "; or ".join(FP16_CONVERTERS.values())
            raise UnsupportedVariant(
                f"variant {variant.name!r} (fp16) cannot be built with TensorRT {version}: TensorRT 11 has no FP16 "
                f"builder flag, so FP16 must come from an FP16-typed ONNX, and no converter is installed: {hints}"
            )
        return BuildPlan("fp16", False, False, None, strongly_typed=True, fp16_converter=fp16_converter)
    if variant.quantization == "implicit":
        calibrator = variant.trt_calibrator
        if not caps.calibrators:
            raise UnsupportedVariant(
                f"variant {variant.name!r} (int8, implicit, calibrator {calibrator}) cannot be built with TensorRT "
                f"{version}: TensorRT 11 removed INT8 calibrators; INT8 comes only from Q/DQ nodes in the ONNX. Use "
                "quantization: qdq (the Q/DQ model from the calibration stage) for this variant"
            )
        notes = ()
        if caps.calibrators_deprecated:
            notes = (f"TensorRT {version} deprecates INT8 calibrators (since 10.1); explicit Q/DQ is the way forward",)
        return BuildPlan(
            "fp32",
            fp16_fallback,
            True,
            calibrator,
            strongly_typed=False,
            notes=notes,
            float_layers=tuple(variant.float_layers),
        )
    if caps.precision_flags:
        notes = ()
        if fp16_fallback:
            notes = (
                "fp16_fallback: the convs outside Q/DQ pairs (fed by no Dequantize layer) are preferred in FP16 by "
                "layer precision constraints (PREFER_PRECISION_CONSTRAINTS); with the FP16 flag alone TensorRT 8.6 "
                "ran the float stem on an FP32 kernel",
            )
        return BuildPlan(
            "qdq", fp16_fallback, True, None, strongly_typed=False, notes=notes, fp16_float_convs=fp16_fallback
        )
    notes = ()
    if fp16_fallback:
        notes = (
            f"fp16_fallback has no effect on TensorRT {version}: networks are strongly typed, so the layers outside "
            "Q/DQ pairs run in the ONNX's types (FP32), and the convs outside Q/DQ are not constrained to FP16 "
            "(TensorRT 11 has no precision constraints; an FP16-typed ONNX would be needed)",
        )
    return BuildPlan("qdq", False, False, None, strongly_typed=True, notes=notes)


@dataclass(frozen=True)
class CacheHeader:
    version: TrtVersion
    algorithm: str  # e.g. "MinMaxCalibration"


def parse_cache_header(data: bytes) -> CacheHeader | None:
    """The header of a TensorRT calibration cache (`TRT-8600-MinMaxCalibration`), or None if it has none."""
    first_line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
    match = re.fullmatch(r"TRT-(\d+)-(\w+)", first_line)
    if not match:
        return None
    return CacheHeader(version_from_number(int(match.group(1))), match.group(2))


def cache_mismatch(data: bytes, runtime: TrtVersion, exact_version: bool, calibrator: TrtCalibrator) -> str | None:
    """Why a calibration cache must not be reused with this TensorRT and calibrator; None when it may be.

    `exact_version`: compare major.minor.patch (the library version is known) or major.minor only (only the
    Python bindings' version is known, which may differ from the library's patch level).
    """
    header = parse_cache_header(data)
    if header is None:
        return "it has no TensorRT calibration header (TRT-<version>-<algorithm>)"
    cached = header.version
    same = cached == runtime if exact_version else (cached.major, cached.minor) == (runtime.major, runtime.minor)
    if not same:
        return f"it was written by TensorRT {cached}, this is {runtime}: calibration caches are not portable"
    expected = CACHE_HEADER_ALGORITHMS[calibrator]
    if header.algorithm != expected:
        return f"it holds {header.algorithm} scales, the {calibrator} calibrator writes {expected}"
    return None


def find_fp16_converter(has_module: Callable[[str], bool]) -> str | None:
    """The FP16 ONNX converter installed, in order of preference: ModelOpt AutoCast, then onnxconverter-common."""
    if has_module("modelopt"):
        return "modelopt"
    if has_module("onnxconverter_common"):
        return "onnxconverter-common"
    return None


@dataclass(frozen=True)
class Availability:
    """Whether backend 'tensorrt' can run here, with every reason when it cannot."""

    reasons: tuple[str, ...]
    version: TrtVersion | None = None
    gpu: GpuInfo | None = None

    @property
    def available(self) -> bool:
        return not self.reasons

    def message(self) -> str:
        return f"backend 'tensorrt' is not available on this machine: {'; '.join(self.reasons)}. {INSTALL_HINT}"


def check_availability(
    import_tensorrt: Callable[[], ModuleType], list_gpus: Callable[[], list[GpuInfo]]
) -> Availability:
    """Is TensorRT importable, of a supported version, and is there a CUDA GPU? Every failing reason is kept."""
    reasons: list[str] = []
    version: TrtVersion | None = None
    try:
        trt = import_tensorrt()
    except ImportError as exc:
        reasons.append(f"TensorRT is not installed (import tensorrt: {exc})")
    except OSError as exc:  # the Python package is there but its libraries (libnvinfer) are not
        reasons.append(f"TensorRT is installed but its libraries fail to load ({exc})")
    else:
        raw = str(getattr(trt, "__version__", ""))
        try:
            version = parse_version(raw)
        except ValueError:
            reasons.append(f"the tensorrt module reports no usable version ({raw!r})")
        else:
            reason = unsupported_version_reason(version)
            if reason:
                reasons.append(f"unsupported version: {reason}")
    gpu: GpuInfo | None = None
    try:
        gpus = list_gpus()
    except CudaUnavailable as exc:
        reasons.append(f"no GPU: {exc}")
    else:
        if gpus:
            gpu = gpus[0]
        else:
            reasons.append("no GPU: the NVIDIA driver reports no CUDA device")
    return Availability(tuple(reasons), version, gpu)
