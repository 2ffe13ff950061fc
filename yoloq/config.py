"""Typed configuration: params.yaml validated by pydantic, with `section.key=value` overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from yoloq.backend_registry import BACKENDS, backends_that_build
from yoloq.errors import ConfigError
from yoloq.quant.formats import FORMATS

Precision = Literal[("fp32", "fp16", *FORMATS)]  # type: ignore[valid-type]  # the float ones and the quantized formats
Quantization = Literal["none", "qdq", "implicit"]
BackendName = Literal[("auto", *BACKENDS)]  # type: ignore[valid-type]
"""What params.yaml may ask for; `auto` = TensorRT when it imports and a CUDA GPU exists, else ONNX Runtime."""
ResolvedBackendName = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]
"""A concrete backend, after `auto` is resolved on this machine (yoloq.backends.resolve_backend)."""
CalibrationAlgorithm = Literal["minmax", "entropy", "percentile", "mse"]
TrtCalibrator = Literal["minmax", "entropy2", "legacy"]
EngineNms = Literal["none", "efficient_nms"]
"""TensorRT's implicit INT8 calibrators: IInt8MinMaxCalibrator, IInt8EntropyCalibrator2, IInt8LegacyCalibrator."""
EngineInput = Literal["float", "uint8"]


NAME_RULE = "letters, digits, '_', '-' and '.', not starting with a dot and without '..'"


def check_name(name: str) -> str:
    """A variant or target name becomes a folder of the run's report (report_dir / name): it must stay inside."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith(".") or ".." in name:
        raise ValueError(f"{name!r} is not allowed: use {NAME_RULE} (the name becomes a folder of the run's report)")
    return name


SafeName = Annotated[str, AfterValidator(check_name)]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(Section):
    path: Path = Field(description="PyTorch checkpoint (.pt), Ultralytics model yaml, or ONNX model")
    imgsz: int = Field(640, ge=32, le=4096, multiple_of=32, description="square input size in pixels")


class ExportConfig(Section):
    opset: int = Field(17, ge=17, le=21)
    dynamic_batch: bool = True


class SimplifyConfig(Section):
    enabled: bool = True
    check_images: int = Field(4, ge=1, le=64, description="calibration images used to prove equivalence")
    atol: float = Field(1e-3, gt=0)
    rtol: float = Field(1e-3, gt=0)
    stem_space_to_depth: bool = Field(
        False,
        description="rewrite a stride-2 even-kernel stem (YOLOv5's 6x6) as SpaceToDepth + a stride-1 conv: same "
        "outputs, an ordinary INT8 conv for TensorRT",
    )


class CalibrationConfig(Section):
    images: Path = Path("data/coco/calib/images")
    num_images: int = Field(128, ge=1, le=100_000, description="first N readable calibration images (sorted by name)")
    min_images: int = Field(8, ge=1, description="fail when fewer readable images remain")
    batch_size: int = Field(8, ge=1, le=256)
    algorithm: CalibrationAlgorithm = Field("minmax", description="INT8 calibration used when search.enabled is false")
    percentile: float = Field(99.99, gt=90.0, le=100.0, description="used by algorithm: percentile")
    max_validation_overlap: float = Field(
        0.05, ge=0.0, le=1.0, description="largest share of calibration images that may also be validation images"
    )


class VariantConfig(Section):
    name: SafeName = Field(description=f"{NAME_RULE}; names the variant's folder of the run's report")
    precision: Precision = "fp32"
    quantization: Quantization = "none"
    backend: BackendName = Field(
        "auto", description="onnxruntime, tensorrt, or auto; a variant without one takes the top-level backend"
    )
    calibrator: TrtCalibrator | None = Field(
        None, description="TensorRT calibrator for quantization implicit; null = minmax (entropy2 loses ~12 points)"
    )
    float_layers: list[str] = Field(
        default_factory=list,
        description="quantization implicit (TensorRT 8.6-10.x): ONNX node names kept in FP16 (FP32 without "
        "tensorrt.fp16_fallback) by layer precision constraints; the search fills this in for implicit variants",
    )

    @model_validator(mode="after")
    def _quantization_matches_precision(self) -> VariantConfig:
        if self.quantized and self.quantization == "none":
            raise ValueError(
                f"variant {self.name!r}: precision {self.precision} needs quantization 'qdq' or 'implicit'"
            )
        if not self.quantized and self.quantization != "none":
            raise ValueError(
                f"variant {self.name!r}: quantization {self.quantization!r} needs a quantized precision "
                f"({', '.join(FORMATS)})"
            )
        if self.backend != "auto" and not BACKENDS[self.backend].can_build(self.precision, self.quantization):
            what = self.precision if self.quantization == "none" else f"{self.precision} ({self.quantization})"
            builders = " or ".join(repr(b) for b in backends_that_build(self.precision, self.quantization))
            raise ValueError(
                f"variant {self.name!r}: backend {self.backend!r} builds {BACKENDS[self.backend].describe_builds()}, "
                f"not {what}: use backend {builders} (or 'auto' on a machine that has it)"
            )
        if self.float_layers and self.quantization != "implicit":
            raise ValueError(
                f"variant {self.name!r}: float_layers applies to quantization 'implicit' only; Q/DQ variants keep "
                "layers in float by leaving them out of quantization (the search does that)"
            )
        if self.calibrator is not None and self.quantization != "implicit":
            raise ValueError(
                f"variant {self.name!r}: calibrator {self.calibrator!r} applies to quantization 'implicit' only "
                f"(TensorRT calibration); remove it, or set quantization: implicit"
            )
        return self

    @property
    def quantized(self) -> bool:
        """Its precision is a quantized format (yoloq.quant.formats: int8 today)."""
        return self.precision in FORMATS

    @property
    def trt_calibrator(self) -> TrtCalibrator:
        """The calibrator an implicit INT8 variant uses: its own, else minmax."""
        return self.calibrator or "minmax"


class TensorRTProfile(Section):
    """The dynamic-batch optimization profile: engines accept batches min..max and are tuned for opt.

    Implicit INT8 calibration runs at the opt batch (TensorRT calibrates with the profile's opt shape)."""

    min_batch: int = Field(1, ge=1, le=1024)
    opt_batch: int = Field(8, ge=1, le=1024)
    max_batch: int = Field(32, ge=1, le=1024)

    @model_validator(mode="after")
    def _ordered(self) -> TensorRTProfile:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"tensorrt.profile needs min_batch <= opt_batch <= max_batch, "
                f"got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        return self


class TensorRTTimingConfig(Section):
    """Device-time measurement of an engine (CUDA events), at batch 1 and at the profile's max batch."""

    warmup: int = Field(20, ge=0)
    iterations: int = Field(200, ge=1, description="timed executions per batch size, spread over the rounds")
    rounds: int = Field(10, ge=1, description="variants are timed interleaved, one turn each per round")


class TensorRTLayerProfileConfig(Section):
    """Per-layer profile of every TensorRT variant after validation (IProfiler + engine inspector) at the profile's
    max batch: profile.md, profile.png and profile.json in the variant's MLflow run (`yoloq profile` by hand)."""

    enabled: bool = True
    warmup: int = Field(10, ge=0)
    iterations: int = Field(50, ge=1, description="profiled executions whose per-layer times are averaged")


class TensorRTConfig(Section):
    """Engine builds (backend tensorrt). TensorRT's own defaults where a key is null."""

    profile: TensorRTProfile = TensorRTProfile()
    workspace_mb: int = Field(4096, ge=16, description="builder workspace memory pool limit (MiB)")
    builder_optimization_level: int = Field(
        3, ge=0, le=5, description="0 builds fastest (about 10x faster), 3 is TensorRT's default, 5 searches most"
    )
    tactic_sources: list[str] | None = Field(
        None,
        description="TacticSource names to allow, e.g. [EDGE_MASK_CONVOLUTIONS, JIT_CONVOLUTIONS]; null = TensorRT's "
        "default (the 8.6 kit in ../shared/gpu has no cuBLAS/cuDNN and needs exactly those two)",
    )
    timing_cache: Path | None = Field(
        None, description="tactic timing cache shared by builds; null = one per TensorRT version and GPU in the cache"
    )
    fp16_fallback: bool = Field(
        True, description="INT8 engines may run layers in FP16 where faster or unquantized (else FP32)"
    )
    nms: EngineNms = Field(
        "none",
        description="efficient_nms: append TensorRT's EfficientNMS_TRT plugin (validation's conf, IoU and max "
        "detections) to the ONNX before the build, so the engine outputs final detections; none: NMS on the CPU",
    )
    input: EngineInput = Field(
        "float",
        description="uint8: the engine takes letterboxed RGB uint8 (N, H, W, 3) frames and does the float "
        "conversion (/255) itself, so the host sends a quarter of the bytes and skips the conversion (the fast path "
        "of `yoloq predict`; validation feeds it the same frames); float: (N, 3, H, W) float32. TensorRT-calibrated "
        "(implicit) INT8 keeps the float input",
    )
    qdq_stem_space_to_depth: bool = Field(
        True,
        description="Q/DQ INT8 engines: a quantized stride-2 even-kernel stem (YOLOv5's 6x6 conv on the image) is "
        "built as a 2x2 stride-2 conv that does the space-to-depth (FP16 on the float image where fp16_fallback "
        "prefers float convs in FP16, else INT8 on the quantized image), its output quantized like the image, + a "
        "stride-1 INT8 conv on 12 channels: the same numbers (yoloq.stem.space_to_depth_qdq_stem); TensorRT 8.6 has "
        "no fast INT8 kernel for the 6x6 form",
    )
    timing: TensorRTTimingConfig = TensorRTTimingConfig()
    layer_profile: TensorRTLayerProfileConfig = TensorRTLayerProfileConfig()

    @model_validator(mode="after")
    def _tactic_source_names(self) -> TensorRTConfig:
        for name in self.tactic_sources or []:
            if not name.isidentifier() or name.upper() != name:
                raise ValueError(
                    f"tensorrt.tactic_sources: {name!r} is not a TacticSource name; use upper-case names such as "
                    "EDGE_MASK_CONVOLUTIONS, JIT_CONVOLUTIONS, CUBLAS, CUBLAS_LT, CUDNN"
                )
        return self


class TimingConfig(Section):
    """Wall-clock timing on the CPU (ONNX Runtime); variants are timed in one process, interleaved round by round."""

    warmup: int = Field(3, ge=0)
    iterations: int = Field(20, ge=1, description="timed inferences per batch size, spread over the rounds")
    batch_size: int = Field(8, ge=1, description="batch for the throughput measurement")
    rounds: int = Field(5, ge=1, description="variants are timed interleaved, one turn each per round")


class LabelledSet(Section):
    images: Path
    labels: Path = Field(description="folder of YOLO .txt labels, or a COCO instances .json")


class IntervalConfig(Section):
    """The bootstrap interval printed beside every mAP delta (yoloq.interval): how sure the report set makes it."""

    draws: int = Field(200, ge=0, le=10000, description="resamples of the report images; 0 = no interval")
    level: float = Field(0.9, gt=0.0, lt=1.0, description="central coverage of the interval")


class ValidationConfig(Section):
    images: Path = Path("data/coco/report/images")
    labels: Path = Path("data/coco/report/labels")
    extra_sets: list[LabelledSet] = Field(
        default_factory=list,
        description="more labelled folders scored together with images/labels as one set (one COCO evaluation)",
    )
    num_images: int | None = Field(None, ge=1, description="first N images (sorted by name); null = all")
    batch_size: int = Field(8, ge=1, le=256)
    conf_threshold: float = Field(0.001, ge=0.0, lt=1.0)
    iou_threshold: float = Field(0.6, gt=0.0, le=1.0)
    max_detections: int = Field(300, ge=1)
    preview_images: int = Field(
        4,
        ge=0,
        le=64,
        description="first N validation images drawn with every variant's detections side by side "
        "(MLflow artifact previews/); 0 = none",
    )
    timing: TimingConfig = TimingConfig()
    interval: IntervalConfig = IntervalConfig()


SelectionMetric = Literal["agreement", "map"]


class SelectionConfig(Section):
    """The selection set: the images the INT8 search judges its candidates on. The numbers a run reports and
    gates on come from the validation set (the report set), which the search never sees; selection images must
    be neither validation nor calibration images (checked by content)."""

    images: Path = Field(Path("data/coco/select/images"), description="images the search judges candidates on")
    labels: Path | None = Field(
        Path("data/coco/select/labels"),
        description="YOLO label folder or COCO json; read by metric map only (agreement needs no labels)",
    )
    num_images: int | None = Field(None, ge=1, description="first N images (sorted by name); null = all")
    metric: SelectionMetric = Field(
        "agreement",
        description="agreement: mAP50-95 of a candidate's detections against FP32's confident ones (no labels); "
        "map: mAP50-95 against the labels",
    )
    min_score: float = Field(
        0.25, gt=0.0, lt=1.0, description="agreement: FP32 detections at least this confident are the pseudo labels"
    )
    tolerance: float = Field(
        0.005,
        ge=0.0,
        le=1.0,
        description="a candidate passes the search when its selection score is at most this below the reference, "
        "the best score of the candidates with no more float convs than the default (0.005 = 0.5 points); "
        "the best-scoring passing candidate is chosen, so this matters when the reference is too slow",
    )

    @model_validator(mode="after")
    def _map_needs_labels(self) -> SelectionConfig:
        if self.metric == "map" and self.labels is None:
            raise ValueError("metric map scores candidates against labels: set selection.labels, or use agreement")
        return self


class GateConfig(Section):
    """When a run ships: every variant within `max_map_drop` of FP32; with an FP16 variant in the run, every INT8
    variant also within `max_map_drop_vs_fp16` of it and at least `min_speedup_vs_fp16` times its throughput."""

    max_map_drop: float = Field(0.005, ge=0.0, le=1.0, description="largest mAP50-95 drop vs fp32 (0.005 = 0.5 points)")
    max_map_drop_vs_fp16: float = Field(
        0.003, ge=0.0, le=1.0, description="largest INT8 mAP50-95 drop vs the fp16 variant (0.003 = 0.3 points)"
    )
    min_speedup_vs_fp16: float = Field(
        1.0,
        ge=0.0,
        description="smallest INT8 throughput / fp16 throughput (at the timing batch): 1.0 = INT8 must not be slower "
        "(measured reachable: TensorRT implicit INT8 1.07x on yolov5n, 1.64x on yolov8s); 0 = no speed gate",
    )


class SearchConfig(Section):
    """Automatic INT8 search for the Q/DQ variants: compare calibrations, rank convs by sensitivity, build
    candidates that keep the most sensitive convs in float, and choose the one with the best selection score that
    passes (within selection.tolerance of the reference and, with a speed gate, fast enough; see yoloq.search)."""

    enabled: bool = Field(
        True, description="search each INT8 variant's calibration and float convs (else plain calibration)"
    )
    algorithms: list[CalibrationAlgorithm] = Field(
        default_factory=lambda: ["percentile", "mse"],
        min_length=1,
        description="calibrations compared (minmax and entropy may be added: on the selection set minmax scored "
        "1.5-4.4 points below MSE on yolov5n and yolov8n, entropy lost 8.6-9.2 mAP points on yolov5n everywhere)",
    )
    calibration_sizes: list[int] = Field(
        default_factory=lambda: [64, 128], min_length=1, description="calibration images per candidate"
    )
    sensitivity_images: int = Field(32, ge=1, le=256, description="calibration images for the per-conv analysis")
    float_steps: list[int] = Field(
        default_factory=lambda: [0, 2, 4, 8, 16],
        min_length=1,
        description="candidates keep this many of the most sensitive convs in float, tried in this order",
    )

    @field_validator("float_steps")
    @classmethod
    def _increasing_steps(cls, steps: list[int]) -> list[int]:
        if steps != sorted(set(steps)) or steps[0] < 0:
            raise ValueError("must be increasing and >= 0, e.g. [0, 2, 4, 8, 16]")
        return steps

    @field_validator("calibration_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("every size must be >= 1, e.g. [64, 128]")
        return sizes


class MlflowConfig(Section):
    tracking_uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db")
    experiment: str = "yoloq"


DEFAULT_VARIANTS: tuple[dict[str, str], ...] = (
    {"name": "fp32", "precision": "fp32"},
    {"name": "int8", "precision": "int8", "quantization": "qdq"},
)
"""The variants of a params file that lists none (the shipped params.yaml's)."""


class Params(Section):
    model: ModelConfig
    backend: BackendName = Field(
        "auto", description="backend of every variant that names none: auto, onnxruntime or tensorrt"
    )
    export: ExportConfig = ExportConfig()
    simplify: SimplifyConfig = SimplifyConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    variants: list[VariantConfig] = Field(
        default_factory=lambda: [VariantConfig.model_validate(v) for v in DEFAULT_VARIANTS], min_length=1
    )
    validation: ValidationConfig = ValidationConfig()
    gate: GateConfig = GateConfig()
    search: SearchConfig = SearchConfig()
    selection: SelectionConfig = SelectionConfig()
    mlflow: MlflowConfig = MlflowConfig()
    tensorrt: TensorRTConfig = TensorRTConfig()
    output_dir: Path = Field(Path("runs"), description="cached exports, Q/DQ models, engines and per-run reports")
    build: BuildConfig = Field(default_factory=lambda: BuildConfig())
    registry: RegistryConfig = Field(default_factory=lambda: RegistryConfig())
    targets: list[TargetConfig] = Field(
        default_factory=list, description="build targets (one Prefect work pool per GPU type); empty = build here"
    )
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig())

    @field_validator("targets")
    @classmethod
    def _unique_target_names(cls, targets: list[TargetConfig]) -> list[TargetConfig]:
        names = [t.name for t in targets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"target names must be unique; repeated: {', '.join(duplicates)}")
        return targets

    @model_validator(mode="before")
    @classmethod
    def _variants_inherit_backend(cls, data: Any) -> Any:
        """A variant without its own `backend` takes the top-level one (checked with the variant's other keys).
        Without `variants`, the DEFAULT_VARIANTS do too."""
        if isinstance(data, dict) and "variants" not in data:
            data = {**data, "variants": [dict(v) for v in DEFAULT_VARIANTS]}
        if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
            return data
        if data.get("backend") not in ("auto", *BACKENDS):
            return data  # absent (variants keep their default), or invalid (reported once, at `backend`)
        variants = [
            {**v, "backend": data["backend"]} if isinstance(v, dict) and "backend" not in v else v
            for v in data["variants"]
        ]
        return {**data, "variants": variants}

    @model_validator(mode="after")
    def _unique_variant_names(self) -> Params:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicates)}")
        if not any(v.precision == "fp32" for v in self.variants):
            raise ValueError(
                "variants need one fp32 variant: it is the accuracy reference every delta is measured from"
            )
        return self

    @property
    def reference_variant(self) -> VariantConfig:
        """The first fp32 variant: deltas and the gate are measured against it."""
        return next(v for v in self.variants if v.precision == "fp32")

    @property
    def needs_calibration(self) -> bool:
        """Any INT8 variant: the calibration stage runs (image checks, overlap with validation, Q/DQ model)."""
        return any(v.quantized for v in self.variants)

    @property
    def needs_selection(self) -> bool:
        """The INT8 search runs (it judges candidates on the selection set; with build targets, on each target)."""
        return self.search.enabled and self.needs_calibration

    def resolved(self, base_dir: Path) -> Params:
        """A copy where every relative path is made absolute against `base_dir` (the params file's folder)."""

        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else (base_dir / path).resolve()

        data = self.model_copy(deep=True)
        data.model.path = absolute(data.model.path)
        data.calibration.images = absolute(data.calibration.images)
        data.validation.images = absolute(data.validation.images)
        data.validation.labels = absolute(data.validation.labels)
        data.validation.extra_sets = [
            LabelledSet(images=absolute(extra.images), labels=absolute(extra.labels))
            for extra in data.validation.extra_sets
        ]
        data.selection.images = absolute(data.selection.images)
        if data.selection.labels is not None:
            data.selection.labels = absolute(data.selection.labels)
        data.output_dir = absolute(data.output_dir)
        if data.tensorrt.timing_cache is not None:
            data.tensorrt.timing_cache = absolute(data.tensorrt.timing_cache)
        return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as a YAML scalar)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set calibration.num_images=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc
    return [part for part in key.strip().split(".")], value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `value` at `path` inside nested dicts/lists (list items by index: variants.1.name=...)."""
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {'.'.join(path)}: {where} needs an index 0..{len(node) - 1}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:depth])} is a value, not a section")


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid configuration:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key" + _valid_keys_hint(err["loc"])
        elif err["type"] == "missing":
            message = "required key is missing"
        lines.append(
            f"  {where}: {message} (got {err.get('input')!r})" if err["type"] != "missing" else f"  {where}: {message}"
        )
    return "\n".join(lines)


def _valid_keys_hint(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[str(part)].annotation
        inner = getattr(annotation, "__args__", (annotation,))[0] if hasattr(annotation, "__args__") else annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            model = inner
        else:
            return ""
    return "; valid keys: " + ", ".join(model.model_fields)


def load_params(path: Path, overrides: list[str] | None = None) -> Params:
    """Read params.yaml, apply `--set` overrides, validate, and resolve paths against the file's folder."""
    if not path.is_file():
        raise ConfigError(f"params file {path} not found: pass -p PATH or create params.yaml (see README)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, calibration, variants, ...)")
    for text in overrides or []:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc)) from exc
    return params.resolved(path.resolve().parent)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"section.key": "value"} for MLflow params."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    flat: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            flat.update(flatten(value, f"{prefix}{index}."))
    else:
        flat[prefix.rstrip(".")] = str(data)
    return flat


# -- operations (issue 5): build deadline, model registry, per-GPU build targets ---------------------------------


class BuildConfig(Section):
    """Engine builds run in a child process with a real deadline (a hung TensorRT build is killed)."""

    timeout_s: float = Field(
        3600, gt=0, description="deadline of one TensorRT engine build in seconds; the build process is killed past it"
    )


class RegistryConfig(Section):
    """MLflow model registry: variants that pass the gate get alias `champion`, the others `challenger`."""

    enabled: bool = True
    model_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="registered model name; null = yoloq-<model file stem>"
    )


class TargetConfig(Section):
    """A build target: a GPU type whose engines are built and validated by workers of one Prefect work pool."""

    name: SafeName = Field(description=f"e.g. h100, l4, orin ({NAME_RULE})")
    work_pool: str = Field(min_length=1, description="Prefect work pool whose workers run on that GPU type")
    timeout_s: float = Field(
        7200, gt=0, description="deadline of the target's build+validate run; cancelled past it (workers kill it)"
    )
    backend: BackendName | None = Field(
        None, description="backend of every variant on this target (e.g. tensorrt); null = the variants' own"
    )


CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def _check_cron(cron: str | None) -> str | None:
    """Five fields (minute hour day month weekday) or a macro such as @daily; Prefect checks the fields' values."""
    if cron is not None and len(cron.split()) != 5 and cron.strip() not in CRON_MACROS:
        raise ValueError(f"{cron!r} is not a cron expression: five fields, e.g. '0 3 * * *' (03:00 daily), or @daily")
    return cron


class ScheduleConfig(Section):
    """When the served or deployed quantize deployment runs (flows/deploy.py): a cron schedule, and the
    new-checkpoint trigger's window for starting one run per checkpoint content."""

    cron: Annotated[str | None, AfterValidator(_check_cron)] = Field(
        None, description="cron schedule of the deployment, e.g. '0 3 * * *'; null = none (--cron overrides)"
    )
    timezone: str | None = Field(None, description="time zone of the cron schedule, e.g. Europe/Berlin; null = UTC")
    checkpoint_dedupe_hours: float = Field(
        24.0,
        gt=0,
        description="the trigger starts one run per checkpoint content within this many hours (later repeats of "
        "the same content start a run that skip_if_done returns at once)",
    )
