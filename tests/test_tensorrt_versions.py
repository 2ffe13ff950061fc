"""TensorRT version rules (8.6, 10.x, 11.x), availability and GPU discovery, with fake modules: no GPU needed."""

from __future__ import annotations

import ctypes
import types

import pytest

from yoloq.backends.tensorrt.cuda import CudaUnavailable, GpuInfo, cuda_devices
from yoloq.backends.tensorrt.versions import (
    TrtVersion,
    UnsupportedVariant,
    cache_mismatch,
    capabilities,
    check_availability,
    find_fp16_converter,
    parse_cache_header,
    parse_version,
    plan_variant,
    version_from_number,
)
from yoloq.config import VariantConfig
from yoloq.errors import BackendUnavailable

H200 = GpuInfo(0, "NVIDIA H200", "9.0", 143771)

FP32 = VariantConfig(name="fp32", precision="fp32", backend="tensorrt")
FP16 = VariantConfig(name="fp16", precision="fp16", backend="tensorrt")
MINMAX = VariantConfig(name="q", precision="int8", quantization="implicit", backend="tensorrt")
ENTROPY2 = VariantConfig(name="e", precision="int8", quantization="implicit", calibrator="entropy2", backend="tensorrt")
QDQ = VariantConfig(name="qdq", precision="int8", quantization="qdq", backend="tensorrt")


def fake_tensorrt(version: str) -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    return module


def caps(text: str):
    return capabilities(parse_version(text))


# -- versions ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8.6.1", TrtVersion(8, 6, 1)), ("10.3.0.26", TrtVersion(10, 3, 0)), ("11.0", TrtVersion(11, 0, 0))],
)
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError, match="not a TensorRT version"):
        parse_version("unknown")


@pytest.mark.parametrize(
    ("version", "number"), [("8.6.0", 8600), ("8.6.1", 8601), ("10.3.0", 100300), ("11.1.2", 110102)]
)
def test_nv_number_matches_cache_headers_and_round_trips(version, number):
    assert parse_version(version).nv_number == number
    assert version_from_number(number) == parse_version(version)


def test_capabilities_per_version():
    c86, c100, c101, c11 = caps("8.6.1"), caps("10.0.1"), caps("10.8.0"), caps("11.0.0")
    assert c86.calibrators and c86.precision_flags and not c86.strongly_typed_only and not c86.calibrators_deprecated
    assert c100.calibrators and not c100.calibrators_deprecated
    assert c101.calibrators and c101.calibrators_deprecated and c101.precision_flags
    assert not c11.calibrators and not c11.precision_flags and c11.strongly_typed_only


@pytest.mark.parametrize(("text", "message"), [("8.5.3", "too old"), ("7.2.3", "too old"), ("12.0.0", "newer than")])
def test_unsupported_versions_are_refused_with_the_reason(text, message):
    with pytest.raises(BackendUnavailable, match=message):
        caps(text)


# -- build plans --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_weakly_typed_plans(version):
    c = caps(version)
    fp32 = plan_variant(FP32, c, fp16_fallback=True, fp16_converter=None)
    assert (fp32.onnx, fp32.fp16_flag, fp32.int8_flag, fp32.calibrator, fp32.tag) == (
        "fp32",
        False,
        False,
        None,
        "fp32",
    )
    fp16 = plan_variant(FP16, c, True, None)
    assert (fp16.onnx, fp16.fp16_flag, fp16.int8_flag, fp16.tag) == ("fp32", True, False, "fp16")
    minmax = plan_variant(MINMAX, c, True, None)
    assert (minmax.onnx, minmax.fp16_flag, minmax.int8_flag, minmax.calibrator) == ("fp32", True, True, "minmax")
    assert minmax.tag == "int8-minmax" and "IInt8MinMaxCalibrator" in minmax.describe()
    assert plan_variant(ENTROPY2, c, True, None).calibrator == "entropy2"
    qdq = plan_variant(QDQ, c, True, None)
    assert (qdq.onnx, qdq.fp16_flag, qdq.int8_flag, qdq.calibrator, qdq.tag) == ("qdq", True, True, None, "int8-qdq")
    assert not any(p.strongly_typed for p in (fp32, fp16, minmax, qdq))


def test_int8_only_without_fp16_fallback():
    c = caps("8.6.1")
    assert not plan_variant(MINMAX, c, fp16_fallback=False, fp16_converter=None).fp16_flag
    assert not plan_variant(QDQ, c, fp16_fallback=False, fp16_converter=None).fp16_flag


def test_calibrators_are_deprecated_from_10_1():
    assert plan_variant(MINMAX, caps("8.6.1"), True, None).notes == ()
    assert "deprecates INT8 calibrators" in plan_variant(MINMAX, caps("10.8.0"), True, None).notes[0]


def test_tensorrt_11_fp32_and_qdq_are_strongly_typed_without_flags():
    c = caps("11.0.0")
    fp32 = plan_variant(FP32, c, True, None)
    assert fp32.strongly_typed and not fp32.fp16_flag and not fp32.int8_flag
    qdq = plan_variant(QDQ, c, fp16_fallback=True, fp16_converter=None)
    assert (qdq.onnx, qdq.strongly_typed, qdq.fp16_flag, qdq.int8_flag) == ("qdq", True, False, False)
    assert "fp16_fallback has no effect" in qdq.notes[0]
    assert plan_variant(QDQ, c, fp16_fallback=False, fp16_converter=None).notes == ()


def test_tensorrt_11_has_no_calibrators_and_says_to_use_qdq():
    with pytest.raises(UnsupportedVariant, match=r"removed INT8 calibrators.*quantization: qdq"):
        plan_variant(MINMAX, caps("11.0.0"), True, None)


def test_tensorrt_11_fp16_needs_an_fp16_onnx_converter():
    with pytest.raises(UnsupportedVariant, match=r"no FP16 builder flag.*nvidia-modelopt.*onnxconverter-common"):
        plan_variant(FP16, caps("11.0.0"), True, None)
    plan = plan_variant(FP16, caps("11.0.0"), True, "modelopt")
    assert (plan.onnx, plan.strongly_typed, plan.fp16_flag, plan.fp16_converter, plan.tag) == (
        "fp16",
        True,
        False,
        "modelopt",
        "fp16",
    )


def test_unsupported_variant_is_a_backend_error_exit_2():
    assert issubclass(UnsupportedVariant, BackendUnavailable) and UnsupportedVariant.exit_code == 2


def test_fp16_converter_preference():
    assert find_fp16_converter(lambda name: True) == "modelopt"
    assert find_fp16_converter(lambda name: name == "onnxconverter_common") == "onnxconverter-common"
    assert find_fp16_converter(lambda name: False) is None


# -- calibration cache headers -----------------------------------------------------------------------------------


def test_cache_header_parsing():
    header = parse_cache_header(b"TRT-8600-MinMaxCalibration\nimages: 3c010204\n")
    assert header is not None and header.version == TrtVersion(8, 6, 0) and header.algorithm == "MinMaxCalibration"
    assert parse_cache_header(b"TRT-100300-EntropyCalibration2\n").version == TrtVersion(10, 3, 0)
    assert parse_cache_header(b"images: 3c010204\n") is None
    assert parse_cache_header(b"") is None


def test_cache_from_the_same_tensorrt_and_algorithm_is_reusable():
    cache = b"TRT-8600-MinMaxCalibration\nimages: 3c010204\n"
    assert cache_mismatch(cache, TrtVersion(8, 6, 0), exact_version=True, calibrator="minmax") is None
    # only the bindings' version known (the kit: bindings 8.6.1 over an 8.6.0 library): major.minor must match
    assert cache_mismatch(cache, TrtVersion(8, 6, 1), exact_version=False, calibrator="minmax") is None


def test_cache_from_another_tensorrt_version_is_never_reused():
    cache = b"TRT-8600-MinMaxCalibration\n"
    reason = cache_mismatch(cache, TrtVersion(8, 6, 1), exact_version=True, calibrator="minmax")
    assert reason and "8.6.0" in reason and "not portable" in reason
    assert cache_mismatch(cache, TrtVersion(10, 3, 0), exact_version=False, calibrator="minmax")


def test_cache_of_another_algorithm_or_without_header_is_refused():
    assert "EntropyCalibration2" in cache_mismatch(
        b"TRT-8600-EntropyCalibration2\n", TrtVersion(8, 6, 0), True, "minmax"
    )
    assert "no TensorRT calibration header" in cache_mismatch(b"junk", TrtVersion(8, 6, 0), True, "minmax")


# -- availability -------------------------------------------------------------------------------------------------


def raises(exc: BaseException):
    def call():
        raise exc

    return call


def test_available_with_a_supported_tensorrt_and_a_gpu():
    found = check_availability(lambda: fake_tensorrt("8.6.1"), lambda: [H200])
    assert found.available and found.version == TrtVersion(8, 6, 1) and found.gpu == H200


@pytest.mark.parametrize(
    ("importer", "gpus", "reason"),
    [
        (raises(ImportError("No module named 'tensorrt'")), lambda: [H200], "TensorRT is not installed"),
        (raises(OSError("libnvinfer.so.10: cannot open")), lambda: [H200], "libraries fail to load"),
        (lambda: fake_tensorrt("8.5.3"), lambda: [H200], "unsupported version: TensorRT 8.5.3 is too old"),
        (lambda: fake_tensorrt("weird"), lambda: [H200], "no usable version"),
        (lambda: fake_tensorrt("10.3.0"), raises(CudaUnavailable("no NVIDIA driver: x")), "no GPU: no NVIDIA driver"),
        (lambda: fake_tensorrt("10.3.0"), lambda: [], "no GPU"),
    ],
)
def test_unavailable_reasons_and_install_hint(importer, gpus, reason):
    found = check_availability(importer, gpus)
    assert not found.available
    message = found.message()
    assert reason in message
    assert "pip install '.[tensorrt]'" in message


def test_every_reason_is_reported():
    found = check_availability(raises(ImportError("nope")), raises(CudaUnavailable("no NVIDIA driver: x")))
    assert len(found.reasons) == 2


# -- GPU discovery through a fake driver --------------------------------------------------------------------------


class FakeDriver:
    def __init__(self, init_status: int = 0, count: int = 1) -> None:
        self.init_status, self.count = init_status, count

    def cuInit(self, flags):  # noqa: N802 - CUDA driver API names
        return self.init_status

    def cuDeviceGetCount(self, count):  # noqa: N802
        count._obj.value = self.count
        return 0

    def cuDeviceGet(self, device, index):  # noqa: N802
        device._obj.value = index
        return 0

    def cuDeviceGetName(self, buffer, length, device):  # noqa: N802
        ctypes.memmove(buffer, b"NVIDIA H200\0", 12)
        return 0

    def cuDeviceGetAttribute(self, value, attribute, device):  # noqa: N802
        value._obj.value = {75: 9, 76: 0}[attribute]
        return 0

    def cuDeviceTotalMem_v2(self, memory, device):  # noqa: N802
        memory._obj.value = 143771 << 20
        return 0


def test_cuda_devices_through_the_driver_api():
    assert cuda_devices(lambda name: FakeDriver()) == [H200]
    assert H200.slug == "nvidia-h200-sm90"


def test_no_driver_and_no_device_are_explained():
    with pytest.raises(CudaUnavailable, match="no NVIDIA driver"):
        cuda_devices(raises_os_error)
    with pytest.raises(CudaUnavailable, match="no CUDA device"):
        cuda_devices(lambda name: FakeDriver(init_status=100))
    with pytest.raises(CudaUnavailable, match="no CUDA device"):
        cuda_devices(lambda name: FakeDriver(count=0))
    with pytest.raises(CudaUnavailable, match="cuInit error 3"):
        cuda_devices(lambda name: FakeDriver(init_status=3))


def raises_os_error(name: str):
    raise OSError(f"{name}: cannot open shared object file")


def test_implicit_float_layers_become_obeyed_precision_constraints():
    variant = VariantConfig(
        name="int8-minmax",
        precision="int8",
        quantization="implicit",
        backend="tensorrt",
        float_layers=["/model.2/cv1/conv/Conv", "/model.3/conv/Conv"],
    )
    plan = plan_variant(variant, capabilities(TrtVersion(10, 3, 0)), True, None)
    assert plan.float_layers == ("/model.2/cv1/conv/Conv", "/model.3/conv/Conv")
    assert "2 layers held out of INT8 by precision constraints" in plan.describe()
    plain = plan_variant(
        variant.model_copy(update={"float_layers": []}), capabilities(TrtVersion(10, 3, 0)), True, None
    )
    assert plain.float_layers == () and plain != plan  # different plans: different engine keys


def test_float_layers_are_for_implicit_variants_only():
    with pytest.raises(ValueError, match="float_layers applies to quantization 'implicit' only"):
        VariantConfig(name="q", precision="int8", quantization="qdq", float_layers=["/model.0/conv/Conv"])


# -- FP16 for the convs outside Q/DQ ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_qdq_with_fp16_fallback_prefers_fp16_for_the_convs_outside_qdq(version):
    plan = plan_variant(QDQ, caps(version), fp16_fallback=True, fp16_converter=None)
    assert plan.fp16_float_convs and plan.precision_constraints == "prefer"
    assert "convs outside Q/DQ preferred in FP16" in plan.describe()
    assert any("PREFER_PRECISION_CONSTRAINTS" in note for note in plan.notes)
    plain = plan_variant(QDQ, caps(version), fp16_fallback=False, fp16_converter=None)
    assert not plain.fp16_float_convs and plain.precision_constraints is None and plain.notes == ()
    assert plain != plan  # different plans: different engine keys


def test_tensorrt_11_qdq_says_the_float_convs_are_not_constrained():
    plan = plan_variant(QDQ, caps("11.0.0"), fp16_fallback=True, fp16_converter=None)
    assert not plan.fp16_float_convs and plan.precision_constraints is None
    assert "not constrained to FP16" in plan.notes[0] and "no precision constraints" in plan.notes[0]


def test_only_qdq_plans_prefer_fp16_convs_and_float_layers_are_obeyed():
    assert not any(plan_variant(v, caps("8.6.1"), True, None).fp16_float_convs for v in (FP32, FP16, MINMAX))
    held = MINMAX.model_copy(update={"float_layers": ["/model.0/conv/Conv"]})
    assert plan_variant(held, caps("8.6.1"), True, None).precision_constraints == "obey"
    assert plan_variant(MINMAX, caps("8.6.1"), True, None).precision_constraints is None
