"""TensorRT backend: engines built with Polygraphy from the FP32 or Q/DQ ONNX, run on the execution API directly.

Build (`TensorRTBackend.build`): Polygraphy `NetworkFromOnnxPath` -> `CreateConfig` (dynamic-batch profile,
workspace limit, builder optimization level, tactic sources, timing cache, precision flags, calibrator) ->
`EngineBytesFromNetwork`. What each variant becomes on the installed TensorRT is decided in `trt_versions`.
Implicit INT8 calibrates with Polygraphy's `Calibrator` over yoloq's `CalibrationDataLoader`: the same letterbox
as validation.

Caches (all under the build folder, all written atomically):
- engines, named `trt-<tag>-<hash>.engine` by a hash of the ONNX content, the build plan and settings, the TensorRT
  version and the GPU; a JSON beside each (written last) says it is complete, and it is reused;
- calibration caches, `trt-calib-<algorithm>-<hash>.cache`, keyed by model + images + algorithm + batch + TensorRT
  version; before reuse their header (`TRT-<version>-<algorithm>`) is checked, and a cache from another TensorRT
  version or algorithm is set aside (renamed `.rejected`) and recalibrated, never silently reused;
- one tactic timing cache per TensorRT version and GPU (or `tensorrt.timing_cache`), read before and updated
  after every build, so later builds (other variants, higher optimization levels) skip timing known tactics.

Run (`TensorRTRunner`): `deserialize_cuda_engine`, name-based tensors, `set_input_shape`, `set_tensor_address`,
`execute_async_v3` on one stream, device buffers sized for the profile's max batch. Polygraphy's `TrtRunner` is not
used (it segfaults with the 8.6 kit: ../shared/gpu/README.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from yoloq.artifacts import atomic_path, atomic_write_bytes, atomic_write_json, content_key, file_sha256, read_json
from yoloq.artifacts import size_mb as file_size_mb
from yoloq.backends.base import BuiltModel
from yoloq.backends.trt_cuda import EventTimer, GpuInfo, cuda_devices
from yoloq.backends.trt_versions import (
    CALIBRATOR_CLASSES,
    BuildPlan,
    Capabilities,
    TrtVersion,
    cache_mismatch,
    capabilities,
    check_availability,
    find_fp16_converter,
    plan_variant,
    version_from_number,
)
from yoloq.calibration_data import PREPROCESSING_ID, CalibrationDataLoader, select_calibration_images
from yoloq.config import CalibrationConfig, TensorRTConfig, TrtCalibrator, ValidationConfig, VariantConfig
from yoloq.errors import BackendUnavailable, EngineBuildError, InputError
from yoloq.heads import HeadFormat, decode
from yoloq.preprocess import load_preprocessed
from yoloq.validate import Timing

Progress = Callable[[str], None]

_NUMPY_DTYPES: dict[str, type] = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


# ---------------------------------------------------------------------------------------------------------------
# The installed TensorRT
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtEnvironment:
    trt: Any
    version: TrtVersion  # the Python bindings (tensorrt.__version__)
    library: TrtVersion | None  # libnvinfer (getInferLibVersion) when it can be asked; in the kit 8.6.0 under 8.6.1
    gpu: GpuInfo
    caps: Capabilities

    @property
    def runtime_version(self) -> TrtVersion:
        """The version that writes calibration caches and engines: the library's when known."""
        return self.library or self.version

    def describe(self) -> dict[str, str]:
        return {
            "tensorrt_version": str(self.version),
            "tensorrt_library_version": str(self.library) if self.library else "unknown",
            "gpu": self.gpu.name,
            "gpu_compute_capability": self.gpu.compute_capability,
            "gpu_memory_mb": str(self.gpu.memory_mb),
        }


def load_environment() -> TrtEnvironment:
    """TensorRT, its version and capabilities, and the GPU; raises BackendUnavailable with the reason and hint."""
    availability = check_availability(lambda: importlib.import_module("tensorrt"), cuda_devices)
    if not availability.available or availability.version is None or availability.gpu is None:
        raise BackendUnavailable(availability.message())
    trt = importlib.import_module("tensorrt")
    version = availability.version
    return TrtEnvironment(trt, version, library_version(version.major), availability.gpu, capabilities(version))


def library_version(major: int, load_library: Callable[[str], Any] = ctypes.CDLL) -> TrtVersion | None:
    """libnvinfer's own version (it can differ from the bindings'), or None when it cannot be asked."""
    try:
        return version_from_number(int(load_library(f"libnvinfer.so.{major}").getInferLibVersion()))
    except (OSError, AttributeError, ValueError):
        return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Keys and inputs (pure)
# ---------------------------------------------------------------------------------------------------------------


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


def calibration_cache_key(
    onnx_sha256: str,
    images_hash: str,
    calibrator: TrtCalibrator,
    batch: int,
    imgsz: int,
    tensorrt_version: str,
    library_version: str,
) -> str:
    """Names a calibration cache: model, images (+ preprocessing), algorithm, batch and TensorRT version."""
    return content_key(
        "trt-calib-v1",
        onnx_sha256,
        images_hash,
        PREPROCESSING_ID,
        imgsz,
        calibrator,
        batch,
        tensorrt_version,
        library_version,
    )


def engine_key(
    onnx_sha256: str,
    plan: BuildPlan,
    settings: TensorRTConfig,
    environment: dict[str, str],
    calibration_key: str | None,
) -> str:
    """Names an engine: everything that changes its bytes (the timing cache only speeds the build up)."""
    return content_key(
        "trt-engine-v1",
        onnx_sha256,
        asdict(plan),
        settings.profile.model_dump(),
        settings.workspace_mb,
        settings.builder_optimization_level,
        sorted(settings.tactic_sources) if settings.tactic_sources is not None else None,
        {k: environment[k] for k in sorted(environment) if k != "gpu_memory_mb"},
        calibration_key,
    )


def default_timing_cache(out_dir: Path, runtime: TrtVersion, gpu: GpuInfo) -> Path:
    return out_dir / f"trt-timing-{runtime}-{gpu.slug}.cache"


# ---------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationPlan:
    images: list[Path]
    images_hash: str
    batch: int
    cache_path: Path
    reuse: bool  # a valid cache for this TensorRT and algorithm exists
    rejected: str | None  # why an existing cache was set aside


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self,
        settings: TensorRTConfig | None = None,
        calibration: CalibrationConfig | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings or TensorRTConfig()
        self.calibration = calibration
        self.progress = progress or (lambda message: None)

    # -- the Backend protocol ------------------------------------------------------------------------------------

    def build(self, variant: VariantConfig, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path) -> BuiltModel:
        """Build (or reuse) the engine of `variant`; BuiltModel.details says what was built, with what, and where."""
        env = load_environment()
        plan = plan_variant(variant, env.caps, self.settings.fp16_fallback, find_fp16_converter(_has_module))
        out_dir.mkdir(parents=True, exist_ok=True)
        source = self._source_onnx(variant, plan, fp32_onnx, qdq_onnx, out_dir)
        source_sha = file_sha256(source)
        model_input = onnx_input(source)
        environment = env.describe()
        calibration = self._calibration_plan(variant, plan, source_sha, model_input, env, out_dir)
        calibration_id = calibration.cache_path.stem if calibration else None
        key = engine_key(source_sha, plan, self.settings, environment, calibration_id)
        stem = f"trt-{plan.tag}-{key}"
        engine_path, record_path, log_path = (out_dir / f"{stem}{suffix}" for suffix in (".engine", ".json", ".log"))
        if engine_path.is_file() and record_path.is_file():
            record = read_json(record_path)
            details = {**record["details"], "reused": "true"}
            self.progress(f"TensorRT {variant.name}: reusing {engine_path.name}")
            return BuiltModel(variant, engine_path, file_size_mb(engine_path), float(record["build_seconds"]), details)

        timing_cache = self.settings.timing_cache or default_timing_cache(out_dir, env.runtime_version, env.gpu)
        details = {
            **environment,
            "plan": plan.describe(),
            "notes": " | ".join(plan.notes),
            "source_onnx": str(source),
            "profile": "/".join(str(b) for b in self._batches()),
            "workspace_mb": str(self.settings.workspace_mb),
            "builder_optimization_level": str(self.settings.builder_optimization_level),
            "tactic_sources": ",".join(self.settings.tactic_sources) if self.settings.tactic_sources else "default",
            "timing_cache": str(timing_cache),
            "timing_cache_reused": str(timing_cache.is_file()).lower(),
            "build_log": str(log_path),
            "engine_key": key,
            "reused": "false",
        }
        if calibration:
            details.update(
                calibrator=CALIBRATOR_CLASSES[plan.calibrator or "minmax"],
                calibration_images=str(len(calibration.images)),
                calibration_batch=str(calibration.batch),
                calibration_cache=str(calibration.cache_path),
                calibration_cache_reused=str(calibration.reuse).lower(),
            )
            if calibration.rejected:
                details["calibration_cache_rejected"] = calibration.rejected
        for note in plan.notes:
            self.progress(f"TensorRT {variant.name}: {note}")
        self.progress(f"TensorRT {variant.name}: building ({plan.describe()}); log {log_path}")
        seconds = self._build_engine(
            variant, plan, source, model_input, env, calibration, timing_cache, engine_path, log_path, details
        )
        details["build_seconds"] = f"{seconds:.1f}"
        atomic_write_json(record_path, {"details": details, "build_seconds": seconds})
        self.progress(f"TensorRT {variant.name}: built {engine_path.name} in {seconds:.0f} s")
        return BuiltModel(variant, engine_path, file_size_mb(engine_path), seconds, details)

    def load(self, built: BuiltModel) -> TensorRTRunner:
        return TensorRTRunner(built.path)

    # -- steps ---------------------------------------------------------------------------------------------------

    def _batches(self) -> tuple[int, int, int]:
        profile = self.settings.profile
        return profile.min_batch, profile.opt_batch, profile.max_batch

    def _source_onnx(
        self, variant: VariantConfig, plan: BuildPlan, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path
    ) -> Path:
        if plan.onnx == "qdq":
            if qdq_onnx is None:
                raise InputError(f"variant {variant.name!r} needs the Q/DQ model from the calibration stage")
            return qdq_onnx
        if plan.onnx == "fp16":
            return fp16_typed_onnx(fp32_onnx, plan.fp16_converter or "", out_dir)
        return fp32_onnx

    def _calibration_plan(
        self,
        variant: VariantConfig,
        plan: BuildPlan,
        source_sha: str,
        model_input: OnnxInput,
        env: TrtEnvironment,
        out_dir: Path,
    ) -> CalibrationPlan | None:
        if plan.calibrator is None:
            return None
        if self.calibration is None:
            raise InputError(
                f"variant {variant.name!r} calibrates INT8 in TensorRT and needs the calibration settings: "
                "create the backend with get_backend('tensorrt', params)"
            )
        batch = self.settings.profile.opt_batch
        selected = select_calibration_images(
            self.calibration.images, self.calibration.num_images, self.calibration.min_images
        )
        usable = len(selected.images) // batch * batch
        if usable == 0:
            raise InputError(
                f"variant {variant.name!r}: TensorRT calibrates at the profile's opt batch ({batch}) and needs at "
                f"least {batch} readable calibration images, found {len(selected.images)}: add images or lower "
                "tensorrt.profile.opt_batch"
            )
        images = selected.images[:usable]
        images_hash = content_key(selected.image_hashes[:usable], length=32)
        key = calibration_cache_key(
            source_sha,
            images_hash,
            plan.calibrator,
            batch,
            model_input.height,
            str(env.version),
            str(env.library) if env.library else "unknown",
        )
        cache_path = out_dir / f"trt-calib-{plan.calibrator}-{key}.cache"
        reuse, rejected = False, None
        if cache_path.is_file():
            rejected = cache_mismatch(
                cache_path.read_bytes(), env.runtime_version, env.library is not None, plan.calibrator
            )
            if rejected:
                aside = cache_path.with_suffix(".rejected")
                cache_path.replace(aside)
                self.progress(
                    f"TensorRT {variant.name}: calibration cache {cache_path.name} not reused: {rejected}; "
                    f"moved to {aside.name}, calibrating again"
                )
            else:
                reuse = True
        return CalibrationPlan(images, images_hash, batch, cache_path, reuse, rejected)

    def _build_engine(
        self,
        variant: VariantConfig,
        plan: BuildPlan,
        source: Path,
        model_input: OnnxInput,
        env: TrtEnvironment,
        calibration: CalibrationPlan | None,
        timing_cache: Path,
        engine_path: Path,
        log_path: Path,
        details: dict[str, str],
    ) -> float:
        from polygraphy.backend.trt import (
            Calibrator,
            CreateConfig,
            EngineBytesFromNetwork,
            NetworkFromOnnxPath,
            Profile,
        )
        from polygraphy.exception import PolygraphyException

        trt = env.trt
        low, opt, high = self._batches()
        profile = Profile().add(
            model_input.name, min=model_input.shape(low), opt=model_input.shape(opt), max=model_input.shape(high)
        )
        calibrator = None
        if calibration is not None:
            if model_input.height != model_input.width:
                raise InputError(
                    f"{source}: yoloq's letterbox is square; the model input is "
                    f"{model_input.height}x{model_input.width}"
                )
            loader = CalibrationDataLoader(calibration.images, model_input.name, model_input.height, calibration.batch)
            calibrator = Calibrator(
                loader,
                cache=str(calibration.cache_path) if calibration.reuse else None,
                BaseClass=getattr(trt, CALIBRATOR_CLASSES[plan.calibrator or "minmax"]),
            )
        create_config = CreateConfig(
            precision_constraints="obey" if plan.float_layers else None,
            fp16=plan.fp16_flag,
            int8=plan.int8_flag,
            calibrator=calibrator,
            profiles=[profile],
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: self.settings.workspace_mb << 20},
            builder_optimization_level=self.settings.builder_optimization_level,
            tactic_sources=tactic_sources(trt, self.settings.tactic_sources),
            load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        )
        start = time.perf_counter()
        with _polygraphy_log_to(log_path) as log:
            log(f"yoloq: variant {variant.name}: {plan.describe()}")
            log("yoloq: " + ", ".join(f"{k}={v}" for k, v in details.items()))
            try:
                builder, network, parser = NetworkFromOnnxPath(
                    str(source), strongly_typed=True if plan.strongly_typed else None
                )()
                if plan.float_layers:
                    float_type = trt.float16 if plan.fp16_flag else trt.float32
                    held = hold_layers_in_float(network, plan.float_layers, float_type)
                    log(f"yoloq: {len(held)} layers held in {float_type} by precision constraints: {held}")
                config = create_config(builder, network)
                engine = EngineBytesFromNetwork((builder, network, parser), config=config)()
                timing_bytes = _updated_timing_cache(config, timing_cache)
            except (PolygraphyException, RuntimeError, TypeError, ValueError) as exc:
                raise EngineBuildError(
                    f"TensorRT could not build variant {variant.name!r} ({plan.describe()}): {exc}. "
                    f"Build log: {log_path}"
                ) from exc
            finally:
                if calibrator is not None:
                    calibrator.free()
        seconds = time.perf_counter() - start
        with atomic_path(engine_path) as tmp:
            tmp.write_bytes(memoryview(engine))
        if timing_bytes:
            atomic_write_bytes(timing_cache, timing_bytes)
        if calibration is not None and calibrator is not None and not calibration.reuse:
            contents = calibrator.cache_contents
            if contents:
                atomic_write_bytes(calibration.cache_path, bytes(contents))
            else:
                details["calibration_cache"] = "not written: TensorRT returned no calibration cache"
        return seconds


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


def _updated_timing_cache(config: Any, path: Path) -> bytes:
    """The build's timing cache merged with the one on disk (as Polygraphy does), so entries a build could not load
    are kept; b"" when TensorRT gives none. (TensorRT 8.6.0 in the kit rejects its own level-0 caches: "Myelin error
    from unknown graph"; the build then runs without one.)"""
    timing = config.get_timing_cache()
    if timing is None:
        return b""
    if path.is_file():
        with contextlib.suppress(Exception):  # an unreadable old cache is simply not merged
            timing.combine(config.create_timing_cache(path.read_bytes()), True)
    return bytes(memoryview(timing.serialize()))


def tactic_sources(trt: Any, names: list[str] | None) -> list[Any] | None:
    """TacticSource values from their names; None keeps TensorRT's default."""
    if names is None:
        return None
    known = [name for name in dir(trt.TacticSource) if name.isupper()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError(
            f"tensorrt.tactic_sources: {unknown} are not TacticSource names of TensorRT {trt.__version__}; "
            f"valid: {', '.join(known)}"
        )
    return [getattr(trt.TacticSource, name) for name in names]


@contextlib.contextmanager
def _polygraphy_log_to(path: Path) -> Iterator[Callable[[str], None]]:
    """Copy Polygraphy's log (its build messages and TensorRT's warnings and errors) to `path` while building."""
    from polygraphy.logger import G_LOGGER

    previous = G_LOGGER.log_file
    G_LOGGER.log_file = str(path)
    try:
        yield G_LOGGER.info
    finally:
        G_LOGGER.log_file = previous


def fp16_typed_onnx(fp32_onnx: Path, converter: str, out_dir: Path) -> Path:
    """An FP16-typed copy of the model (I/O kept FP32) for strongly typed TensorRT (11+), named by content hash."""
    key = content_key("fp16-onnx-v1", file_sha256(fp32_onnx), converter)
    final = out_dir / f"model-{key}.fp16.onnx"
    if final.is_file():
        return final
    if converter == "modelopt":
        from modelopt.onnx.autocast import convert_to_mixed_precision

        model = convert_to_mixed_precision(onnx_path=str(fp32_onnx), low_precision_type="fp16", keep_io_types=True)
    elif converter == "onnxconverter-common":
        from onnxconverter_common import float16

        model = float16.convert_float_to_float16(onnx.load(str(fp32_onnx)), keep_io_types=True)
    else:
        raise BackendUnavailable(
            f"no FP16 ONNX converter {converter!r}: install nvidia-modelopt[onnx] or onnxconverter-common"
        )
    with atomic_path(final) as tmp:
        onnx.save(model, str(tmp))
    return final


# ---------------------------------------------------------------------------------------------------------------
# Run and time
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceTiming:
    """GPU time of `execute_async_v3` (CUDA events), after warm-up."""

    batch: int
    iterations: int
    latency_ms_median: float  # one execution at a time (synchronised): what a single request waits for
    latency_ms_p90: float
    throughput_ms_per_batch: float  # back-to-back executions on the stream: steady-state cost of one batch
    images_per_s: float


class TensorRTRunner:
    """Runs an engine on one CUDA stream; buffers are allocated once for the profile's max batch."""

    def __init__(self, engine_path: Path) -> None:
        from polygraphy import cuda
        from polygraphy.backend.trt.util import get_trt_logger

        trt = importlib.import_module("tensorrt")
        self._trt = trt
        self._cuda = cuda.wrapper()
        self._memcpy_kind = cuda.MemcpyKind
        self._stream = cuda.Stream()
        self._runtime = trt.Runtime(get_trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise InputError(
                f"TensorRT cannot load {engine_path}: it was built by another TensorRT version or for another GPU; "
                "delete it and build again"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise InputError(f"{engine_path}: expected one input tensor, found {inputs}")
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n != self.input_name]
        low, opt, high = (tuple(s) for s in self._engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.opt_batch, self.max_batch = int(low[0]), int(opt[0]), int(high[0])
        self.sample_shape = tuple(int(d) for d in high[1:])
        self._dtypes = {n: numpy_dtype(self._engine.get_tensor_dtype(n)) for n in names}
        self._context.set_input_shape(self.input_name, tuple(high))
        self._buffers: dict[str, int] = {}
        for name in names:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * np.dtype(self._dtypes[name]).itemsize
            self._buffers[name] = self._cuda.malloc(nbytes)
            self._context.set_tensor_address(name, self._buffers[name])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The engine's (first) output for an NCHW batch; batches above the profile's max run in pieces."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.sample_shape:
            raise InputError(
                f"TensorRT engine takes (N, {', '.join(map(str, self.sample_shape))}) batches, got {batch.shape}"
            )
        if batch.shape[0] > self.max_batch:
            pieces = [self.infer(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
            return np.concatenate(pieces)
        if batch.shape[0] < self.min_batch:
            raise InputError(f"batch {batch.shape[0]} is below the engine profile's min batch {self.min_batch}")
        self._set_input(batch)
        self._execute()
        name = self.output_names[0]
        output = np.empty(tuple(int(d) for d in self._context.get_tensor_shape(name)), dtype=self._dtypes[name])
        self._cuda.memcpy(
            dst=output.ctypes.data,
            src=self._buffers[name],
            nbytes=output.nbytes,
            kind=self._memcpy_kind.DeviceToHost,
            stream_ptr=self._stream.ptr,
        )
        self._stream.synchronize()
        return output.astype(np.float32, copy=False)

    def time_device(self, batch: np.ndarray, iterations: int, warmup: int) -> DeviceTiming:
        """Device time of the engine on `batch` (N within the profile), measured with CUDA events."""
        size = batch.shape[0]
        if not self.min_batch <= size <= self.max_batch:
            raise InputError(f"timing batch {size} is outside the engine profile {self.min_batch}..{self.max_batch}")
        self._set_input(batch)
        for _ in range(warmup):
            self._execute()
        self._stream.synchronize()
        timer = EventTimer(self._cuda.handle, self._stream.ptr)
        start, end = timer.create(), timer.create()
        try:
            latencies = []
            for _ in range(iterations):
                timer.record(start)
                self._execute()
                timer.record(end)
                latencies.append(timer.elapsed_ms(start, end))
            timer.record(start)
            for _ in range(iterations):
                self._execute()
            timer.record(end)
            total_ms = timer.elapsed_ms(start, end)
        finally:
            timer.destroy(start)
            timer.destroy(end)
        per_batch = total_ms / iterations
        return DeviceTiming(
            batch=size,
            iterations=iterations,
            latency_ms_median=statistics.median(latencies),
            latency_ms_p90=float(np.percentile(latencies, 90)),
            throughput_ms_per_batch=per_batch,
            images_per_s=size * 1000.0 / per_batch,
        )

    def close(self) -> None:
        """Free the device buffers (the engine and context go with the object)."""
        for pointer in self._buffers.values():
            self._cuda.free(pointer)
        self._buffers.clear()
        self._stream.free()
        self._context = None  # context before engine before runtime
        self._engine = None

    def _set_input(self, batch: np.ndarray) -> None:
        host = np.ascontiguousarray(batch, dtype=self._dtypes[self.input_name])
        if not self._context.set_input_shape(self.input_name, host.shape):
            raise InputError(f"TensorRT rejected input shape {host.shape} for {self.input_name!r}")
        self._cuda.memcpy(
            dst=self._buffers[self.input_name],
            src=host.ctypes.data,
            nbytes=host.nbytes,
            kind=self._memcpy_kind.HostToDevice,
            stream_ptr=self._stream.ptr,
        )
        self._stream.synchronize()  # `host` may be a temporary: the copy must finish before it is freed

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")


def numpy_dtype(trt_dtype: Any) -> type:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _NUMPY_DTYPES:
        raise InputError(f"TensorRT tensor type {name} has no NumPy equivalent in yoloq")
    return _NUMPY_DTYPES[name]


def measure_device_timing(
    runner: TensorRTRunner, sample: np.ndarray, batch_sizes: list[int], iterations: int, warmup: int
) -> list[DeviceTiming]:
    """Device timing at each batch size, with `sample` (real preprocessed images) tiled to fill each batch."""
    timings = []
    for size in batch_sizes:
        batch = np.concatenate([sample] * -(-size // len(sample)))[:size]
        timings.append(runner.time_device(batch, iterations, warmup))
    return timings


def measure_end_to_end(
    runner: Any,
    images: list[Path],
    imgsz: int,
    head_format: HeadFormat,
    config: ValidationConfig,
    warmup: int = 2,
) -> float:
    """Wall milliseconds per image for read + letterbox + infer (batch 1) + decode with NMS, over `images`."""
    if not images:
        raise InputError("end-to-end timing needs at least one image")

    def one(path: Path) -> None:
        loaded = load_preprocessed(path, imgsz)
        if loaded is None:
            raise InputError(f"image {path} is unreadable")
        output = runner.infer(loaded[0][None])
        decode(output, head_format, config.conf_threshold, config.iou_threshold, config.max_detections)

    for path in images[:warmup]:
        one(path)
    start = time.perf_counter()
    for path in images:
        one(path)
    return (time.perf_counter() - start) * 1000.0 / len(images)


def device_timing(runner: TensorRTRunner, images: list[Path], imgsz: int, settings: TensorRTConfig) -> Timing:
    """The validate stage's timing for an engine: device latency at batch 1 and images/s at the profile's max."""
    frames = [load_preprocessed(p, imgsz) for p in images[: settings.profile.max_batch]]
    sample = np.stack([frame[0] for frame in frames if frame is not None])
    single, full = measure_device_timing(
        runner, sample, [1, settings.profile.max_batch], settings.timing.iterations, settings.timing.warmup
    )
    return Timing(latency_ms_b1=single.latency_ms_median, throughput_ips=full.images_per_s, throughput_batch=full.batch)


def device_timing_fn(imgsz: int, settings: TensorRTConfig) -> Callable[[TensorRTRunner, list[Path]], Timing]:
    """`score_variant`'s timing_fn for engines: `device_timing` with these settings."""
    return lambda runner, images: device_timing(runner, images, imgsz, settings)
