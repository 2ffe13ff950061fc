"""Engine builds: `TensorRTBackend` builds (or reuses) the engine of a variant with Polygraphy.

Build (`TensorRTBackend.build`): Polygraphy `NetworkFromOnnxPath` (+ layer precision constraints: `constraints`) ->
`CreateConfig` (dynamic-batch profile, workspace limit, builder optimization level, tactic sources, timing cache,
precision flags and constraints, calibrator, ProfilingVerbosity.DETAILED for the engine inspector) ->
`EngineBytesFromNetwork`. What each variant becomes on the installed TensorRT is decided in `versions`.
Implicit INT8 calibrates with Polygraphy's `Calibrator` over yoloq's `CalibrationDataLoader`: the same letterbox
as validation.

Caches (all under the build folder, all written atomically, named in `keys`):
- engines, named `trt-<tag>-<hash>.engine` by a hash of the ONNX content, the build plan and settings, the TensorRT
  version and the GPU; a JSON beside each (written last) says it is complete, and it is reused;
- calibration caches, `trt-calib-<algorithm>-<hash>.cache`, keyed by model + images + algorithm + batch + TensorRT
  version; before reuse their header (`TRT-<version>-<algorithm>`) is checked, and a cache from another TensorRT
  version or algorithm is set aside (renamed `.rejected`) and recalibrated, never silently reused;
- one tactic timing cache per TensorRT version and GPU (or `tensorrt.timing_cache`), read before and updated
  after every build, so later builds (other variants, higher optimization levels) skip timing known tactics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from yoloq.artifacts import atomic_path, atomic_write_bytes, atomic_write_json, content_key, file_sha256, read_json
from yoloq.artifacts import size_mb as file_size_mb
from yoloq.backends.base import BuiltModel
from yoloq.backends.tensorrt.constraints import convs_outside_qdq, hold_layers_in_float, prefer_precision
from yoloq.backends.tensorrt.environment import TrtEnvironment, has_module, load_environment
from yoloq.backends.tensorrt.inputs import OnnxInput, onnx_input
from yoloq.backends.tensorrt.keys import calibration_cache_key, default_timing_cache, engine_key
from yoloq.backends.tensorrt.nms import efficient_nms_onnx, has_nms_outputs
from yoloq.backends.tensorrt.runner import TensorRTRunner
from yoloq.backends.tensorrt.timing import time_device
from yoloq.backends.tensorrt.uint8_input import uint8_input_onnx
from yoloq.backends.tensorrt.versions import (
    CALIBRATOR_CLASSES,
    BuildPlan,
    cache_mismatch,
    find_fp16_converter,
    plan_variant,
)
from yoloq.cache import get_or_create
from yoloq.calibration_data import CalibrationDataLoader, select_calibration_images
from yoloq.config import CalibrationConfig, Params, TensorRTConfig, ValidationConfig, VariantConfig
from yoloq.errors import BackendUnavailable, EngineBuildError, InputError
from yoloq.export import read_facts
from yoloq.heads import DecodeSettings
from yoloq.speed import SpeedMeasures, tile_batch
from yoloq.stem import Permutation, find_quantized_stride2_stem, space_to_depth_qdq_stem
from yoloq.validate import decode_settings

Progress = Callable[[str], None]


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
        decoding: DecodeSettings | None = None,
    ) -> None:
        self.settings = settings or TensorRTConfig()
        self.calibration = calibration
        self.progress = progress or (lambda message: None)
        self.decoding = decoding or decode_settings(ValidationConfig())  # in-engine NMS (tensorrt.nms) settings

    @classmethod
    def from_params(cls, params: Params | None) -> TensorRTBackend:
        if params is None:
            return cls()
        return cls(params.tensorrt, params.calibration, decoding=decode_settings(params.validation))

    # -- the Backend protocol ------------------------------------------------------------------------------------

    def build(self, variant: VariantConfig, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path) -> BuiltModel:
        """Build (or reuse) the engine of `variant`; BuiltModel.details says what was built, with what, and where."""
        env = load_environment()
        plan = plan_variant(variant, env.caps, self.settings.fp16_fallback, find_fp16_converter(has_module))
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self._model_onnx(variant, plan, fp32_onnx, qdq_onnx, out_dir)
        source = self._engine_onnx(variant, plan, model, fp32_onnx, out_dir)
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
            **({"model_onnx": str(model)} if model != source else {}),  # before the NMS / uint8 surgery
            "profile": "/".join(str(b) for b in self._batches()),
            "workspace_mb": str(self.settings.workspace_mb),
            "builder_optimization_level": str(self.settings.builder_optimization_level),
            "tactic_sources": ",".join(self.settings.tactic_sources) if self.settings.tactic_sources else "default",
            "timing_cache": str(timing_cache),
            "timing_cache_reused": str(timing_cache.is_file()).lower(),
            "build_log": str(log_path),
            "engine_key": key,
            "nms": self.settings.nms,
            "input": "uint8-nhwc" if model_input.layout == "nhwc" else "float-nchw",
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
        facts = engine_facts_record(fp32_onnx, self.settings)
        record = {"details": details, "build_seconds": seconds, "facts": facts}
        atomic_write_json(record_path, record)
        self.progress(f"TensorRT {variant.name}: built {engine_path.name} in {seconds:.0f} s")
        return BuiltModel(variant, engine_path, file_size_mb(engine_path), seconds, details)

    def load(self, built: BuiltModel) -> TensorRTRunner:
        return TensorRTRunner(built.path)

    def speed_measures(self, runner: TensorRTRunner, frames: np.ndarray, params: Params) -> SpeedMeasures:
        """Device time (CUDA events) at the profile's max batch and at batch 1, warm-up before every turn."""
        timing = self.settings.timing
        size = min(self.settings.profile.max_batch, runner.max_batch)
        batch = tile_batch(frames, size)
        single = batch[:1]
        per_round = max(1, timing.iterations // timing.rounds)
        return SpeedMeasures(
            size,
            lambda: time_device(runner, batch, per_round, timing.warmup).throughput_ms_per_batch,
            lambda: time_device(runner, single, per_round, timing.warmup).latency_ms_median,
            timing.rounds,
        )

    # -- steps ---------------------------------------------------------------------------------------------------

    def _batches(self) -> tuple[int, int, int]:
        profile = self.settings.profile
        return profile.min_batch, profile.opt_batch, profile.max_batch

    def _source_onnx(
        self, variant: VariantConfig, plan: BuildPlan, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path
    ) -> Path:
        """The ONNX TensorRT parses for `variant`: `_model_onnx`, then `_engine_onnx`."""
        model = self._model_onnx(variant, plan, fp32_onnx, qdq_onnx, out_dir)
        return self._engine_onnx(variant, plan, model, fp32_onnx, out_dir)

    def _model_onnx(
        self, variant: VariantConfig, plan: BuildPlan, fp32_onnx: Path, qdq_onnx: Path | None, out_dir: Path
    ) -> Path:
        """The variant's model: FP32, Q/DQ or FP16-typed ONNX, which ONNX Runtime can run too (logged with a
        registered engine, so it can be rebuilt elsewhere or run without TensorRT)."""
        if plan.onnx == "qdq":
            if qdq_onnx is None:
                raise InputError(f"variant {variant.name!r} needs the Q/DQ model from the calibration stage")
            source = qdq_onnx
        elif plan.onnx == "fp16":
            source = fp16_typed_onnx(fp32_onnx, plan.fp16_converter or "", out_dir)
        else:
            source = fp32_onnx
        return source

    def _engine_onnx(
        self, variant: VariantConfig, plan: BuildPlan, source: Path, fp32_onnx: Path, out_dir: Path
    ) -> Path:
        """`source` with the TensorRT-only surgery the settings ask for: the Q/DQ stem as a space-to-depth
        conv (`tensorrt.qdq_stem_space_to_depth`), EfficientNMS_TRT (`tensorrt.nms`) and the uint8 input
        (`tensorrt.input`); each is skipped where it does not apply or the model has it already."""
        model = onnx.load(str(source), load_external_data=False)
        if plan.onnx == "qdq" and self.settings.qdq_stem_space_to_depth:
            stem = find_quantized_stride2_stem(model)
            if stem is not None:
                # The float permutation needs the FP16 preference of convs outside Q/DQ (fp16_fallback on 8.6-10)
                permutation: Permutation = "float" if plan.fp16_float_convs else "int8"
                source = space_to_depth_qdq_onnx(source, permutation, out_dir)
                how = {"float": "an FP16", "int8": "an INT8"}[permutation]
                self.progress(
                    f"TensorRT {variant.name}: stem {stem.name} as {how} 2x2 stride-2 space-to-depth conv, its "
                    f"output quantized like the image, + a stride-1 INT8 conv ({source.name})"
                )
        has_nms = has_nms_outputs([o.name for o in model.graph.output])
        has_uint8 = onnx_input(source).layout == "nhwc"
        if self.settings.nms == "efficient_nms" and not has_nms:
            head_format = read_facts(fp32_onnx).head_format  # the Q/DQ and FP16 models derive from it
            if head_format == "end2end":
                self.progress(f"TensorRT {variant.name}: tensorrt.nms ignored: the end-to-end head has no NMS")
            else:
                source = efficient_nms_onnx(source, head_format, self.decoding, out_dir)
                self.progress(f"TensorRT {variant.name}: EfficientNMS_TRT appended ({source.name}): NMS in the engine")
        if self.settings.input == "uint8" and not has_uint8:
            if plan.calibrator is not None:
                self.progress(
                    f"TensorRT {variant.name}: tensorrt.input uint8 ignored: TensorRT's calibrator feeds float frames, "
                    "so implicit INT8 keeps the float input"
                )
            else:
                source = uint8_input_onnx(source, out_dir)
                self.progress(f"TensorRT {variant.name}: uint8 NHWC input ({source.name}): /255 in the engine")
        return source

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
            calibrator=calibrator, profiles=[profile], **config_options(trt, plan, self.settings, timing_cache)
        )
        start = time.perf_counter()
        with polygraphy_log_to(log_path) as log:
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
                if plan.fp16_float_convs:
                    float_convs = convs_outside_qdq(network, trt.LayerType.CONVOLUTION, trt.LayerType.DEQUANTIZE)
                    preferred = prefer_precision(network, float_convs, trt.float16)
                    details["fp16_preferred_convs"] = ",".join(preferred) or "none"
                    message = f"{len(preferred)} convs outside Q/DQ preferred in FP16: {', '.join(preferred) or '-'}"
                    log(f"yoloq: {message} (layer precision, PREFER_PRECISION_CONSTRAINTS)")
                    self.progress(f"TensorRT {variant.name}: {message}")
                config = create_config(builder, network)
                engine = EngineBytesFromNetwork((builder, network, parser), config=config)()
                timing_bytes = updated_timing_cache(config, timing_cache)
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


def engine_facts_record(fp32_onnx: Path, settings: TensorRTConfig) -> dict[str, Any] | None:
    """The model facts of an engine for its build record (what predict and validate need: head format, names,
    input size), from the metadata of the FP32 ONNX every variant derives from; an engine with NMS inside outputs
    end2end rows. None when the ONNX carries no yoloq metadata (readers then fall back to the source ONNX)."""
    try:
        facts = read_facts(fp32_onnx)
    except InputError:
        return None
    if settings.nms == "efficient_nms":
        facts = dataclasses.replace(facts, head_format="end2end")
    return dataclasses.asdict(facts)


def config_options(trt: Any, plan: BuildPlan, settings: TensorRTConfig, timing_cache: Path) -> dict[str, Any]:
    """Polygraphy `CreateConfig` options of a build (besides calibrator and profile). Engines are built with
    ProfilingVerbosity.DETAILED so the engine inspector reports each layer's kernel (`yoloq profile`)."""
    return {
        "precision_constraints": plan.precision_constraints,
        "fp16": plan.fp16_flag,
        "int8": plan.int8_flag,
        "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: settings.workspace_mb << 20},
        "builder_optimization_level": settings.builder_optimization_level,
        "tactic_sources": tactic_sources(trt, settings.tactic_sources),
        "load_timing_cache": str(timing_cache) if timing_cache.is_file() else None,
        "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,
    }


def updated_timing_cache(config: Any, path: Path) -> bytes:
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
def polygraphy_log_to(path: Path) -> Iterator[Callable[[str], None]]:
    """Copy Polygraphy's log (its build messages and TensorRT's warnings and errors) to `path` while building."""
    from polygraphy.logger import G_LOGGER

    previous = G_LOGGER.log_file
    G_LOGGER.log_file = str(path)
    try:
        yield G_LOGGER.info
    finally:
        G_LOGGER.log_file = previous


def space_to_depth_qdq_onnx(qdq_onnx: Path, permutation: Permutation, out_dir: Path) -> Path:
    """`qdq_onnx` with its quantized stride-2 stem rewritten (`yoloq.stem.space_to_depth_qdq_stem`), named by
    content hash and reused."""

    def produce(final: Path) -> None:
        with atomic_path(final) as tmp:
            onnx.save(space_to_depth_qdq_stem(onnx.load(str(qdq_onnx)), permutation)[0], str(tmp))

    key = ["qdq-stem-space-to-depth-v2", file_sha256(qdq_onnx), permutation]
    return get_or_create(out_dir, "model", key, ".s2d.onnx", produce, lambda path: path).value


def fp16_typed_onnx(fp32_onnx: Path, converter: str, out_dir: Path) -> Path:
    """An FP16-typed copy of the model (I/O kept FP32) for strongly typed TensorRT (11+), named by content hash."""

    def produce(final: Path) -> None:
        with atomic_path(final) as tmp:
            onnx.save(_fp16_model(fp32_onnx, converter), str(tmp))

    key_parts = ["fp16-onnx-v1", file_sha256(fp32_onnx), converter]
    return get_or_create(out_dir, "model", key_parts, ".fp16.onnx", produce, lambda path: path).value


def _fp16_model(fp32_onnx: Path, converter: str) -> onnx.ModelProto:
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
    return model
