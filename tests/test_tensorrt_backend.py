"""TensorRT backend pieces that need no GPU (selection, config, cache keys and reuse rules, inputs, timing helpers),
and one engine build that runs only where TensorRT and a GPU exist."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.conftest import CALIB_IMAGES, PROJECT, VAL_IMAGES, shipped, write_params
from yoloq.backends import get_backend, resolve_backend, resolve_variants, tensorrt_availability
from yoloq.backends.tensorrt.build import TensorRTBackend, config_options, tactic_sources, updated_timing_cache
from yoloq.backends.tensorrt.constraints import convs_outside_qdq, hold_layers_in_float, prefer_precision
from yoloq.backends.tensorrt.cuda import GpuInfo
from yoloq.backends.tensorrt.environment import TrtEnvironment, library_version
from yoloq.backends.tensorrt.inputs import OnnxInput, onnx_input
from yoloq.backends.tensorrt.keys import calibration_cache_key, default_timing_cache, engine_key
from yoloq.backends.tensorrt.runner import numpy_dtype
from yoloq.backends.tensorrt.timing import measure_end_to_end, time_device
from yoloq.backends.tensorrt.versions import Availability, TrtVersion, capabilities, plan_variant
from yoloq.config import CalibrationConfig, TensorRTConfig, ValidationConfig, VariantConfig, load_params
from yoloq.errors import BackendUnavailable, EngineBuildError, InputError

H200 = GpuInfo(0, "NVIDIA H200", "9.0", 143771)
AVAILABLE = Availability((), TrtVersion(8, 6, 1), H200)
MISSING = Availability(("TensorRT is not installed (import tensorrt: No module named 'tensorrt')",))
TRT_AVAILABLE = tensorrt_availability().available


# -- imports -------------------------------------------------------------------------------------------------------


def test_the_backends_package_imports_no_tensorrt_and_no_polygraphy():
    code = (
        "import sys, yoloq.backends, yoloq.backends.tensorrt.build, yoloq.backends.tensorrt.timing; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'polygraphy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT)
    assert out.stdout.strip() == "[]"


# -- backend selection --------------------------------------------------------------------------------------------


@pytest.mark.skipif(TRT_AVAILABLE, reason="TensorRT and a GPU are available here")
def test_asking_for_tensorrt_without_it_gives_the_reason_and_the_hint():
    with pytest.raises(BackendUnavailable) as err:
        get_backend("tensorrt")
    message = str(err.value)
    assert "TensorRT is not installed" in message or "no GPU" in message
    assert "pip install '.[tensorrt]'" in message


@pytest.mark.skipif(TRT_AVAILABLE, reason="TensorRT and a GPU are available here")
def test_auto_falls_back_to_onnxruntime_here():
    assert get_backend("auto").name == "onnxruntime"


def machine(tensorrt: Availability):
    """A machine where ONNX Runtime runs and TensorRT is as given (the probe takes the backend's name)."""
    return lambda name: tensorrt if name == "tensorrt" else Availability(())


def test_auto_resolves_per_machine_and_per_variant():
    fp32_auto = VariantConfig(name="a", backend="auto")
    fp16_auto = VariantConfig(name="h", precision="fp16", backend="auto")
    assert resolve_backend(fp32_auto, machine(AVAILABLE)) == "tensorrt"
    assert resolve_backend(fp32_auto, machine(MISSING)) == "onnxruntime"
    assert resolve_backend(fp16_auto, machine(AVAILABLE)) == "tensorrt"
    with pytest.raises(
        BackendUnavailable, match=r"variant 'h' \(fp16.*built by tensorrt only.*pip install '.\[tensorrt\]'"
    ):
        resolve_backend(fp16_auto, machine(MISSING))
    with pytest.raises(BackendUnavailable, match="not installed"):
        resolve_backend(VariantConfig(name="t", backend="tensorrt"), machine(MISSING))


def test_onnxruntime_variants_never_probe_tensorrt():
    def probe(name: str) -> Availability:
        if name == "tensorrt":
            raise AssertionError("probed")
        return Availability(())

    assert resolve_backend(VariantConfig(name="o", backend="onnxruntime"), probe) == "onnxruntime"


def test_resolve_variants_probes_once_and_returns_concrete_backends(tmp_path):
    data = shipped()
    assert data["backend"] == "auto" and not any("backend" in v for v in data["variants"])  # the shipped default
    params = load_params(write_params(tmp_path, data))
    assert [v.backend for v in params.variants] == ["auto", "auto"]
    calls = []

    def probe(name: str) -> Availability:
        calls.append(name)
        return AVAILABLE

    resolved = resolve_variants(params, probe)
    assert [v.backend for v in resolved.variants] == ["tensorrt", "tensorrt"] and calls == ["tensorrt"]
    assert [v.backend for v in params.variants] == ["auto", "auto"]  # the original is left alone
    assert [v.backend for v in resolve_variants(params, machine(MISSING)).variants] == ["onnxruntime", "onnxruntime"]


# -- keys and caches ------------------------------------------------------------------------------------------------

ENV = {
    "tensorrt_version": "8.6.1",
    "tensorrt_library_version": "8.6.0",
    "gpu": "NVIDIA H200",
    "gpu_compute_capability": "9.0",
    "gpu_memory_mb": "143771",
}


def test_calibration_cache_key_changes_with_every_input():
    base = ("sha", "images", "minmax", 8, 640, "8.6.1", "8.6.0")
    key = calibration_cache_key(*base)
    assert calibration_cache_key(*base) == key
    for index, other in enumerate(("sha2", "images2", "entropy2", 16, 320, "10.3.0", "10.3.0")):
        changed = list(base)
        changed[index] = other
        assert calibration_cache_key(*changed) != key, f"argument {index} is not part of the key"


def test_engine_key_covers_plan_settings_version_gpu_and_calibration():
    plan = plan_variant(
        VariantConfig(name="h", precision="fp16", backend="tensorrt"), capabilities(TrtVersion(8, 6, 1)), True, None
    )
    settings = TensorRTConfig()
    key = engine_key("sha", plan, settings, ENV, None)
    assert engine_key("sha", plan, settings, {**ENV, "gpu_memory_mb": "1"}, None) == key  # memory does not matter
    variants = [
        engine_key("sha2", plan, settings, ENV, None),
        engine_key("sha", plan, settings, ENV, "trt-calib-minmax-x"),
        engine_key("sha", plan, TensorRTConfig(builder_optimization_level=0), ENV, None),
        engine_key("sha", plan, TensorRTConfig(workspace_mb=1024), ENV, None),
        engine_key("sha", plan, TensorRTConfig(tactic_sources=["JIT_CONVOLUTIONS"]), ENV, None),
        engine_key("sha", plan, TensorRTConfig(profile={"max_batch": 64}), ENV, None),
        engine_key("sha", plan, settings, {**ENV, "tensorrt_version": "10.3.0"}, None),
        engine_key("sha", plan, settings, {**ENV, "gpu": "NVIDIA H100 80GB HBM3"}, None),
    ]
    assert key not in variants and len(set(variants)) == len(variants)
    ordered = TensorRTConfig(tactic_sources=["EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"])
    reordered = TensorRTConfig(tactic_sources=["JIT_CONVOLUTIONS", "EDGE_MASK_CONVOLUTIONS"])
    assert engine_key("sha", plan, ordered, ENV, None) == engine_key("sha", plan, reordered, ENV, None)


def test_default_timing_cache_is_per_version_and_gpu(tmp_path):
    path = default_timing_cache(tmp_path, TrtVersion(8, 6, 0), H200)
    assert path == tmp_path / "trt-timing-8.6.0-nvidia-h200-sm90.cache"


LIB_860 = TrtVersion(8, 6, 0)


def fake_environment(library: TrtVersion | None = LIB_860) -> TrtEnvironment:
    version = TrtVersion(8, 6, 1)
    return TrtEnvironment(None, version, library, H200, capabilities(version))


def calibration_plan(tmp_path: Path, library: TrtVersion | None = LIB_860):
    backend = TensorRTBackend(TensorRTConfig(), CalibrationConfig(images=CALIB_IMAGES, num_images=20, min_images=8))
    variant = VariantConfig(name="q", precision="int8", quantization="implicit", backend="tensorrt")
    env = fake_environment(library)
    plan = plan_variant(variant, env.caps, True, None)
    return backend._calibration_plan(variant, plan, "sha", OnnxInput("images", 3, 640, 640), env, tmp_path)


def test_calibration_uses_whole_opt_batches_and_names_the_cache(tmp_path):
    calibration = calibration_plan(tmp_path)
    assert calibration.batch == 8 and len(calibration.images) == 16  # 20 images -> 2 full batches of 8
    assert calibration.cache_path.name.startswith("trt-calib-minmax-") and not calibration.reuse


def test_a_valid_calibration_cache_is_reused(tmp_path):
    path = calibration_plan(tmp_path).cache_path
    path.write_bytes(b"TRT-8600-MinMaxCalibration\nimages: 3c010204\n")
    calibration = calibration_plan(tmp_path)
    assert calibration.reuse and calibration.rejected is None


def test_a_calibration_cache_from_another_tensorrt_is_set_aside_not_reused(tmp_path):
    path = calibration_plan(tmp_path).cache_path
    path.write_bytes(b"TRT-8510-MinMaxCalibration\nimages: 3c010204\n")
    calibration = calibration_plan(tmp_path)
    assert not calibration.reuse and "8.5.10" in (calibration.rejected or "")
    assert not path.exists() and path.with_suffix(".rejected").is_file()


def test_calibration_needs_one_full_opt_batch(tmp_path):
    backend = TensorRTBackend(
        TensorRTConfig(profile={"opt_batch": 16, "max_batch": 16}),
        CalibrationConfig(images=CALIB_IMAGES, num_images=10, min_images=8),
    )
    variant = VariantConfig(name="q", precision="int8", quantization="implicit", backend="tensorrt")
    env = fake_environment()
    plan = plan_variant(variant, env.caps, True, None)
    with pytest.raises(InputError, match=r"opt batch \(16\).*at least 16"):
        backend._calibration_plan(variant, plan, "sha", OnnxInput("images", 3, 640, 640), env, tmp_path)


def test_implicit_int8_without_calibration_settings_says_how_to_pass_them(tmp_path):
    variant = VariantConfig(name="q", precision="int8", quantization="implicit", backend="tensorrt")
    env = fake_environment()
    plan = plan_variant(variant, env.caps, True, None)
    with pytest.raises(InputError, match=r"get_backend\('tensorrt', params\)"):
        TensorRTBackend()._calibration_plan(variant, plan, "sha", OnnxInput("images", 3, 640, 640), env, tmp_path)


# -- inputs and helpers ---------------------------------------------------------------------------------------------


def tiny_onnx(path: Path, dims: list) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_onnx_input_reads_name_and_fixed_image_shape(tmp_path):
    found = onnx_input(tiny_onnx(tmp_path / "m.onnx", ["batch", 3, 640, 640]))
    assert found == OnnxInput("images", 3, 640, 640) and found.shape(32) == (32, 3, 640, 640)
    with pytest.raises(InputError, match="fixed"):
        onnx_input(tiny_onnx(tmp_path / "d.onnx", ["batch", 3, "height", 640]))


def test_library_version_from_the_loaded_libnvinfer():
    library = types.SimpleNamespace(getInferLibVersion=lambda: 8600)
    assert library_version(8, lambda name: library) == TrtVersion(8, 6, 0)

    def missing(name: str):
        raise OSError(name)

    assert library_version(10, missing) is None


def fake_trt_module() -> types.SimpleNamespace:
    class TacticSource:
        CUBLAS, CUBLAS_LT, CUDNN, EDGE_MASK_CONVOLUTIONS, JIT_CONVOLUTIONS = range(5)

    return types.SimpleNamespace(TacticSource=TacticSource, __version__="8.6.1")


def test_tactic_sources_by_name():
    trt = fake_trt_module()
    assert tactic_sources(trt, None) is None
    assert tactic_sources(trt, ["EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"]) == [3, 4]
    with pytest.raises(InputError, match=r"\['CUDNN_V9'\] are not TacticSource names.*valid: CUBLAS"):
        tactic_sources(trt, ["CUDNN_V9"])


def test_builds_are_detailed_for_the_inspector_and_take_the_plans_precision_constraints(tmp_path):
    trt = fake_trt_module()
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.ProfilingVerbosity = types.SimpleNamespace(LAYER_NAMES_ONLY="names", DETAILED="detailed")
    qdq = VariantConfig(name="q", precision="int8", quantization="qdq", backend="tensorrt")
    plan = plan_variant(qdq, capabilities(TrtVersion(8, 6, 1)), True, None)
    settings = TensorRTConfig(workspace_mb=1024, builder_optimization_level=1, tactic_sources=["JIT_CONVOLUTIONS"])
    options = config_options(trt, plan, settings, tmp_path / "timing.cache")
    assert options == {
        "precision_constraints": "prefer",
        "fp16": True,
        "int8": True,
        "memory_pool_limits": {"workspace": 1024 << 20},
        "builder_optimization_level": 1,
        "tactic_sources": [4],
        "load_timing_cache": None,  # no cache on disk yet
        "profiling_verbosity": "detailed",
    }
    (tmp_path / "timing.cache").write_bytes(b"cache")
    assert config_options(trt, plan, settings, tmp_path / "timing.cache")["load_timing_cache"] == str(
        tmp_path / "timing.cache"
    )


def test_engines_named_before_detailed_verbosity_are_not_reused():
    from dataclasses import asdict

    from yoloq.artifacts import content_key

    plan = plan_variant(VariantConfig(name="f", backend="tensorrt"), capabilities(TrtVersion(8, 6, 1)), True, None)
    settings = TensorRTConfig()
    v1 = content_key(
        "trt-engine-v1",
        "sha",
        asdict(plan),
        settings.profile.model_dump(),
        settings.workspace_mb,
        settings.builder_optimization_level,
        None,
        {k: ENV[k] for k in sorted(ENV) if k != "gpu_memory_mb"},
        None,
    )
    assert engine_key("sha", plan, settings, ENV, None) != v1


def test_numpy_dtypes_of_tensorrt_types():
    assert numpy_dtype(types.SimpleNamespace(name="FLOAT")) is np.float32
    assert numpy_dtype(types.SimpleNamespace(name="HALF")) is np.float16
    with pytest.raises(InputError, match="FP8"):
        numpy_dtype(types.SimpleNamespace(name="FP8"))


class ZeroRunner:
    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((batch.shape[0], 25200, 85), dtype=np.float32)


def test_end_to_end_time_covers_preprocess_infer_and_decode():
    images = sorted(VAL_IMAGES.glob("*.jpg"))[:3]
    ms = measure_end_to_end(ZeroRunner(), images, 640, "yolov5", ValidationConfig())
    assert ms > 0


@pytest.mark.skipif(TRT_AVAILABLE, reason="TensorRT and a GPU are available here")
def test_building_without_tensorrt_is_a_clear_error(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"pip install '.\[tensorrt\]'"):
        TensorRTBackend().build(VariantConfig(name="f", backend="tensorrt"), tmp_path / "m.onnx", None, tmp_path)


# -- on a GPU ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not TRT_AVAILABLE, reason="needs TensorRT (pip install '.[tensorrt]') and a CUDA GPU")
def test_fp32_engine_builds_runs_and_is_reused(simplified, tmp_path):
    settings = TensorRTConfig(builder_optimization_level=0, profile={"min_batch": 1, "opt_batch": 2, "max_batch": 4})
    backend = TensorRTBackend(settings)
    variant = VariantConfig(name="fp32", backend="tensorrt")
    built = backend.build(variant, simplified.onnx_path, None, tmp_path)
    assert built.path.is_file() and built.details["reused"] == "false" and built.details["tensorrt_version"]
    with backend.load(built) as runner:
        output = runner.infer(np.zeros((3, 3, 640, 640), dtype=np.float32))
        assert output.shape[0] == 3 and output.dtype == np.float32
        timing = time_device(runner, np.zeros((4, 3, 640, 640), dtype=np.float32), iterations=5, warmup=1)
        assert timing.latency_ms_median > 0 and timing.images_per_s > 0
    assert backend.build(variant, simplified.onnx_path, None, tmp_path).details["reused"] == "true"
    from yoloq.backends.tensorrt.profile import profile_engine, summarize

    profiled = profile_engine(built.path, None, iterations=3, warmup=1)
    convs = summarize(profiled).convs
    assert profiled.batch == 4 and profiled.detailed and sum(b.count for b in convs.values()) > 0
    assert set(convs) <= {"FP32", "TF32"}  # an FP32 engine


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data, self.merged = data, []

    def combine(self, other: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.merged.append(other.data)
        return True

    def serialize(self) -> bytes:
        return self.data + b"".join(self.merged)


class FakeBuilderConfig:
    def __init__(self, timing: FakeTimingCache | None, readable: bool = True) -> None:
        self.timing, self.readable = timing, readable

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        if not self.readable:
            raise RuntimeError("Myelin error from unknown graph")
        return FakeTimingCache(data)


def test_timing_cache_is_merged_with_the_one_on_disk(tmp_path):
    path = tmp_path / "timing.cache"
    assert updated_timing_cache(FakeBuilderConfig(FakeTimingCache(b"new")), path) == b"new"
    path.write_bytes(b"+old")
    assert updated_timing_cache(FakeBuilderConfig(FakeTimingCache(b"new")), path) == b"new+old"
    assert updated_timing_cache(FakeBuilderConfig(FakeTimingCache(b"new"), readable=False), path) == b"new"
    assert updated_timing_cache(FakeBuilderConfig(None), path) == b""


class _FakeTensor:
    def __init__(self, name: str) -> None:
        self.name = name


class _FakeLayer:
    def __init__(self, name: str, kind: str = "CONVOLUTION", inputs: tuple[str | None, ...] = (), outputs: int = 1):
        self.name, self.type, self.num_outputs, self.precision, self.output_types = name, kind, outputs, None, {}
        self.inputs = [_FakeTensor(i) if i is not None else None for i in inputs]
        self.num_inputs = len(self.inputs)

    def get_input(self, index: int) -> _FakeTensor | None:
        return self.inputs[index]

    def get_output(self, index: int) -> _FakeTensor:
        return _FakeTensor(f"{self.name}_output_{index}")

    def set_output_type(self, index: int, dtype: object) -> None:
        self.output_types[index] = dtype


class _FakeNetwork:
    def __init__(self, names: list[str] | None = None, layers: list[_FakeLayer] | None = None) -> None:
        self.layers = layers if layers is not None else [_FakeLayer(n) for n in names or []]
        self.num_layers = len(self.layers)

    def get_layer(self, index: int) -> _FakeLayer:
        return self.layers[index]


def test_float_layers_are_constrained_by_onnx_node_name():
    network = _FakeNetwork(["/model.0/conv/Conv", "/model.0/act/Sigmoid", "/model.2/cv1/conv/Conv"])
    assert hold_layers_in_float(network, ["/model.2/cv1/conv/Conv"], "half") == ["/model.2/cv1/conv/Conv"]
    held = network.layers[2]
    assert held.precision == "half" and held.output_types == {0: "half"}
    assert network.layers[0].precision is None
    with pytest.raises(EngineBuildError, match="name no layer"):
        hold_layers_in_float(network, ["/model.99/conv/Conv"], "half")


def qdq_network() -> _FakeNetwork:
    """A Q/DQ network as the ONNX parser makes it: the stem and one head conv left in float, the rest fed by DQ."""
    dq = "DEQUANTIZE"
    return _FakeNetwork(
        layers=[
            _FakeLayer("/model.0/conv/Conv", inputs=("images",)),  # float stem: reads the network input
            _FakeLayer("/model.0/act/Mul", "ELEMENTWISE", ("/model.0/conv/Conv_output_0",)),
            _FakeLayer("/model.0/act/Mul_output_0_QuantizeLinear", "QUANTIZE", ("/model.0/act/Mul_output_0",)),
            _FakeLayer("x_DequantizeLinear", dq, ("/model.0/act/Mul_output_0_QuantizeLinear_output_0",)),
            _FakeLayer("w_DequantizeLinear", dq, ("w_int8",)),
            _FakeLayer("/model.1/conv/Conv", inputs=("x_DequantizeLinear_output_0", "w_DequantizeLinear_output_0")),
            _FakeLayer("/model.2/conv/Conv", inputs=("/model.0/act/Mul_output_0", "w_DequantizeLinear_output_0")),
            _FakeLayer("/model.24/m.0/Conv", inputs=("/model.0/act/Mul_output_0", None)),  # float head conv
        ]
    )


def test_convs_outside_qdq_are_the_ones_no_dequantize_layer_feeds():
    network = qdq_network()
    found = convs_outside_qdq(network, "CONVOLUTION", "DEQUANTIZE")
    assert found == ["/model.0/conv/Conv", "/model.24/m.0/Conv"]  # /model.2 has quantized weights: not float


def test_prefer_precision_sets_the_compute_precision_only():
    network = qdq_network()
    assert prefer_precision(network, ["/model.0/conv/Conv"], "half") == ["/model.0/conv/Conv"]
    stem = network.layers[0]
    assert stem.precision == "half" and stem.output_types == {}  # outputs left to TensorRT
    assert all(layer.precision is None for layer in network.layers[1:])
    with pytest.raises(EngineBuildError, match="not in the TensorRT network"):
        prefer_precision(network, ["/model.99/conv/Conv"], "half")


def test_engine_key_changes_with_fp16_for_the_convs_outside_qdq():
    qdq = VariantConfig(name="q", precision="int8", quantization="qdq", backend="tensorrt")
    caps86 = capabilities(TrtVersion(8, 6, 1))
    with_fp16, without = plan_variant(qdq, caps86, True, None), plan_variant(qdq, caps86, False, None)
    settings = TensorRTConfig()
    assert engine_key("sha", with_fp16, settings, ENV, None) != engine_key("sha", without, settings, ENV, None)
