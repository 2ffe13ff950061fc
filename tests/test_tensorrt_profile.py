"""Per-layer engine profiles on CPU: kernel-name precision rules, layer classification and per-block attribution on
fake inspector JSON and fake layer times, the report files, and collection through fake TensorRT modules."""

from __future__ import annotations

import json
import types

import pytest

import yoloq.backends.tensorrt.environment as environment_module
from tests.fake_tensorrt import FakeDevice, inspector_document, install
from yoloq.backends.tensorrt.cuda import GpuInfo
from yoloq.backends.tensorrt.profile import (
    EngineProfile,
    InspectedLayer,
    block_of,
    collect_layer_times,
    conv_precision,
    findings,
    layer_kind,
    layer_profiles,
    name_parts,
    precision_of_kernel,
    profile_engine,
    profile_line,
    profile_metrics,
    summarize,
)
from yoloq.backends.tensorrt.profile_report import write_profile
from yoloq.backends.tensorrt.runner import TensorRTRunner
from yoloq.errors import InputError

INT8_KERNEL = "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32_tilesize128x128x64"
FP16_KERNEL = "sm80_xmma_fprop_implicit_gemm_f16f16_f16f32_f16_nhwckrsc_nhwc_tilesize64x64x64_stage4_tensor16x8x16"
TF32_KERNEL = "sm80_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize128x128x16_stage4"
FP32_KERNEL = "sm50_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nchwkcrs_nchw_tilesize128x128x8_stage3"

STEM = "/model.0/conv/Conv + PWN(PWN(/model.0/act/Sigmoid), /model.0/act/Mul)"
STEM_Q = "/model.0/act/Mul_output_0_QuantizeLinear"
REFORMAT = "Reformatting CopyNode for Input Tensor 0 to model.1.conv.weight + /model.1/conv/_weight_DequantizeLinear"
CONV1 = "model.1.conv.weight + /model.1/conv/_weight_DequantizeLinear + /model.1/conv/Conv + PWN(/model.1/act/Mul)"
CONV2 = "/model.2/cv1/conv/Conv + PWN(PWN(/model.2/cv1/act/Sigmoid), /model.2/cv1/act/Mul)"
POOL = "/model.9/m/MaxPool"
HEAD = "/model.24/m.0/Conv"
MYELIN = "{ForeignNode[/model.24/Reshape.../model.24/Concat_3]}"


def layer(name: str, kind: str, tactic: str = "", fmt: str = "N/A due to dynamic shapes") -> dict:
    return {
        "Name": name,
        "LayerType": kind,
        "Inputs": [{"Name": "x", "Format/Datatype": fmt}],
        "Outputs": [],
        "TacticName": tactic,
        "TacticValue": "0x1",
    }


QDQ_ENGINE = inspector_document(
    [
        layer(STEM, "CaskConvolution", FP32_KERNEL),
        layer(STEM_Q, "Scale"),
        layer(REFORMAT, "Reformat"),
        layer(CONV1, "CaskConvolution", INT8_KERNEL),
        layer(CONV2, "CaskConvolution", FP16_KERNEL),
        layer(POOL, "CaskPooling", "sm50_xmma_pooling_max_nhwc_int8"),
        layer(HEAD, "CaskConvolution", TF32_KERNEL),
        layer(MYELIN, "Myelin"),
        layer("/model.3/Add", "NoOp"),  # no time reported
    ]
)
TIMES = {STEM: 1.17, STEM_Q: 0.91, REFORMAT: 0.2, CONV1: 0.3, CONV2: 0.25, POOL: 0.05, HEAD: 0.4, MYELIN: 0.8}


def fake_profile(text: str = QDQ_ENGINE, times: dict[str, float] = TIMES, batch: int = 32) -> EngineProfile:
    layers, detailed = layer_profiles(text, times)
    env = {"tensorrt_version": "8.6.1", "tensorrt_library_version": "8.6.0", "gpu": "NVIDIA H200"}
    return EngineProfile("trt-int8-qdq-abc.engine", batch, 50, 10, detailed, tuple(layers), env)


# -- precision from kernel names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "precision"),
    [
        (INT8_KERNEL, "INT8"),
        ("sm75_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_imma", "INT8"),
        ("sm90_xmma_fprop_implicit_gemm_indexed_wo_smem_int8_first_layer", "INT8"),
        # measured on the H200 (TensorRT 8.6): INT8 input, int32 accumulate, FP16 output; was read as FP32
        ("sm80_xmma_fprop_implicit_gemm_interleaved_i8f16_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32_nchw", "INT8"),
        (FP16_KERNEL, "FP16"),
        ("volta_h884cudnn_256x128_ldg8_relu_exp_medium_nhwc_tn_v1", "FP16"),
        ("turing_h1688cudnn_128x128_ldg8_relu_exp_interior_nhwc_tn_v1", "FP16"),
        ("sm90_xmma_fprop_hmma_nhwc", "FP16"),
        ("trt_turing_cutlass_fp16_s1688gemm", "FP16"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_bf16", "BF16"),
        ("sm90_xmma_fprop_e4m3e4m3_f32", "FP8"),
        (TF32_KERNEL, "TF32"),
        (FP32_KERNEL, "FP32"),
        ("trt_maxwell_scudnn_128x64_relu_medium_nn_v1", "FP32"),
        ("some_kernel_without_a_type_tag", None),
    ],
)
def test_precision_of_kernel_names(kernel, precision):
    assert precision_of_kernel(kernel) == precision


def test_conv_precision_falls_back_to_fp32_then_to_the_tensor_format_then_unknown():
    assert conv_precision(InspectedLayer("c", "CaskConvolution", "some_kernel_without_a_type_tag", "")) == "FP32"
    int8_format = "Thirty-two wide channel vectorized row major Int8 format"
    assert conv_precision(InspectedLayer("c", "CaskConvolution", "", int8_format)) == "INT8"
    assert conv_precision(InspectedLayer("c", "CaskConvolution", "", "Channel major FP16 format")) == "FP16"
    assert conv_precision(InspectedLayer("c", "CaskConvolution", "", "N/A due to dynamic shapes")) == "unknown"
    assert conv_precision(InspectedLayer("c", "unknown", "", "")) == "unknown"


# -- names, kinds and blocks ---------------------------------------------------------------------------------------


def test_fused_names_are_split_and_pointwise_fusions_unwrapped():
    assert name_parts(STEM) == ["/model.0/conv/Conv", "/model.0/act/Sigmoid", "/model.0/act/Mul"]
    assert name_parts(MYELIN) == ["/model.24/Reshape", "/model.24/Concat_3"]


@pytest.mark.parametrize(
    ("name", "block"),
    [
        (STEM, "model.0"),
        (CONV1, "model.1"),  # the weight's name comes first: model.1.conv.weight
        (REFORMAT, "model.1"),
        ("PWN(/model.12/Add, /model.13/cv1/act/Mul)", "model.12"),  # the first name's block
        (MYELIN, "model.24"),
        ("images_QuantizeLinear", "other"),
        ("/submodel.3/Conv", "other"),
    ],
)
def test_a_layer_belongs_to_the_block_of_its_first_name(name, block):
    assert block_of(name) == block


def test_layer_kinds():
    def kind(name: str, layer_type: str) -> str:
        return layer_kind(InspectedLayer(name, layer_type, "", ""))

    assert kind(REFORMAT, "Reformat") == "reformat"
    assert kind(CONV1, "CaskConvolution") == "conv"  # a DQ fused into a conv is part of the conv
    assert kind(STEM_Q, "Scale") == "qdq"
    assert kind("PWN(/model.0/act/Mul) + /model.0/act/Mul_output_0_QuantizeLinear", "PointWiseV2") == "qdq"
    assert kind("/model.5/conv/input_quantizer/QuantizeLinear", "Quantize") == "qdq"  # ModelOpt's naming
    assert kind("/model.2/m.0/Gemm", "CaskGemmMatrixMultiply") == "conv"
    assert kind(MYELIN, "Myelin") == "other"
    assert kind(POOL, "CaskPooling") == "other"
    assert kind("/model.0/conv/Conv + /model.0/act/Mul", "unknown") == "conv"  # names only: guessed from the op


# -- layers, summary, metrics ---------------------------------------------------------------------------------------


def test_layer_profiles_join_inspector_layers_and_profiler_times():
    layers, detailed = layer_profiles(QDQ_ENGINE, {**TIMES, "PWN(/model.3/Add)": 0.01})
    assert detailed
    by_name = {p.name: p for p in layers}
    assert [p.name for p in layers][:2] == [STEM, STEM_Q]  # engine order
    assert by_name[STEM].precision == "FP32" and by_name[STEM].ms == 1.17 and by_name[STEM].block == "model.0"
    assert by_name[CONV1].precision == "INT8" and by_name[CONV2].precision == "FP16"
    assert by_name[HEAD].precision == "TF32" and by_name[POOL].precision is None
    assert by_name["/model.3/Add"].ms == 0.0  # in the engine, not reported by the profiler
    extra = by_name["PWN(/model.3/Add)"]  # reported, unknown to the inspector
    assert (extra.layer_type, extra.kind, extra.block, extra.ms) == ("unknown", "other", "model.3", 0.01)


def test_engines_without_detailed_verbosity_still_give_times_and_say_so():
    names_only = inspector_document([STEM, REFORMAT, POOL])
    profile = fake_profile(names_only)
    assert not profile.detailed
    stem = profile.layers[0]
    assert (stem.kind, stem.precision, stem.layer_type) == ("conv", "unknown", "unknown")
    assert profile.layers[1].kind == "reformat"
    assert "ProfilingVerbosity.DETAILED" in findings(profile, summarize(profile))[0]


def test_summary_totals_precisions_reformats_qdq_blocks_and_top_layers():
    summary = summarize(fake_profile(), top=3)
    assert summary.total_ms == pytest.approx(sum(TIMES.values()))
    assert summary.images_per_s == pytest.approx(32 * 1000 / sum(TIMES.values()))
    assert {p: (b.count, round(b.ms, 3)) for p, b in summary.convs.items()} == {
        "INT8": (1, 0.3),
        "FP16": (1, 0.25),
        "TF32": (1, 0.4),
        "FP32": (1, 1.17),
    }
    assert list(summary.convs) == ["INT8", "FP16", "TF32", "FP32"]  # PRECISIONS order
    assert (summary.reformat.count, summary.reformat.ms) == (1, 0.2)
    assert (summary.qdq.count, summary.qdq.ms) == (1, 0.91)
    assert summary.other.count == 3 and summary.other.ms == pytest.approx(0.85)  # pool, Myelin, no-op
    assert list(summary.blocks) == ["model.0", "model.1", "model.2", "model.3", "model.9", "model.24"]
    assert summary.blocks["model.0"] == {"FP32 conv": 1.17, "Q/DQ": 0.91}
    assert summary.blocks["model.1"] == {"reformat": 0.2, "INT8 conv": 0.3}
    assert summary.blocks["model.24"] == pytest.approx({"TF32 conv": 0.4, "other": 0.8})
    assert [layer.name for layer in summary.top] == [STEM, STEM_Q, MYELIN]


def test_metrics_name_the_key_numbers():
    metrics = profile_metrics(summarize(fake_profile()))
    assert metrics["profile.total_ms"] == pytest.approx(sum(TIMES.values()))
    assert (metrics["profile.reformat_count"], metrics["profile.reformat_ms"]) == (1.0, 0.2)
    assert (metrics["profile.qdq_count"], metrics["profile.qdq_ms"]) == (1.0, 0.91)
    assert (metrics["profile.int8_convs"], metrics["profile.fp16_convs"], metrics["profile.fp32_convs"]) == (1, 1, 1)
    assert metrics["profile.tf32_convs"] == 1 and metrics["profile.unknown_convs"] == 0
    assert metrics["profile.fp32_conv_ms"] == 1.17
    assert "profile.bf16_convs" not in metrics  # rarer precisions only when present
    total = sum(TIMES.values())
    assert profile_line(metrics) == f"{total:.3f} ms per batch, 1/1/1 INT8/FP16/FP32 convs, 1 reformats (0.200 ms)"


def test_findings_name_float_convs_reformats_and_qdq():
    profile = fake_profile()
    lines = findings(profile, summarize(profile))
    assert lines[0].startswith("2 conv layers run FP32/TF32 kernels: 1.570 ms") and STEM in lines[0]
    assert any("1 reformat layers" in line for line in lines)
    assert any("1 Q/DQ layers not fused into a conv cost 0.910 ms" in line for line in lines)
    fp16_only = fake_profile(inspector_document([layer(CONV2, "CaskConvolution", FP16_KERNEL)]), {CONV2: 1.0})
    assert findings(fp16_only, summarize(fp16_only)) == ["no conv layer runs an INT8 kernel"]


def test_report_files_markdown_plot_and_json(tmp_path):
    files = write_profile(fake_profile(), tmp_path / "profile", top=5)
    assert [p.name for p in files.paths] == ["profile.md", "profile.png", "profile.json"]
    text = files.markdown.read_text()
    assert text == files.text + "\n"
    assert "# TensorRT profile: trt-int8-qdq-abc.engine" in text and "TensorRT 8.6.1 (library 8.6.0)" in text
    assert "| FP32 convs | 1 | 1.170 |" in text and "| reformats | 1 | 0.200 |" in text
    assert "## What to look at" in text and "## Slowest 5 layers" in text and "| model.24 |" in text
    assert files.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(files.json.read_text())
    assert document["batch"] == 32 and document["detailed"] and len(document["layers"]) == 9
    assert document["metrics"] == files.metrics and document["convs"]["INT8"] == {"count": 1, "ms": 0.3}
    assert not list(tmp_path.rglob("*.tmp"))


def test_long_layer_names_are_shortened_and_pipes_escaped_in_tables(tmp_path):
    name = "/model.4/" + "x" * 200 + "|y"
    profile = fake_profile(inspector_document([layer(name, "PointWiseV2")]), {name: 1.0})
    text = write_profile(profile, tmp_path).text
    assert "x" * 200 not in text and "…" in text


# -- collection through fake TensorRT modules ---------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "trt-int8-qdq-abc.engine"
    path.write_bytes(b"engine bytes")
    return path


def test_layer_times_are_averaged_after_warmup(monkeypatch, engine):
    device = install(monkeypatch, FakeDevice(layers=[("a", 1.0), ("b", 0.5)], slow_executions=3))
    with TensorRTRunner(engine) as runner:
        times = collect_layer_times(runner, runner_batch(runner, 4), iterations=4, warmup=3)
    assert times == {"a": 1.0, "b": 0.5} and device.executions == 7  # the 3 slow warm-up runs are not counted


def runner_batch(runner: TensorRTRunner, size: int):
    import numpy as np

    return np.zeros((size, *runner.sample_shape), dtype=np.float32)


def test_profile_engine_runs_the_profiler_reads_the_inspector_and_frees_the_gpu(monkeypatch, engine):
    device = install(monkeypatch, FakeDevice(layers=list(TIMES.items()), inspector_json=QDQ_ENGINE))
    profile = profile_engine(engine, None, iterations=5, warmup=2, environment={"gpu": "NVIDIA H200"})
    assert profile.batch == 32 and profile.detailed and device.executions == 7
    assert device.inspected_with_context  # concrete shapes for the inspector
    assert summarize(profile).total_ms == pytest.approx(sum(TIMES.values()))
    assert device.allocated == {} and device.streams_open == 0
    with pytest.raises(InputError, match=r"batch 64 is outside the engine's profile 1..32"):
        profile_engine(engine, 64, iterations=5, warmup=2)
    assert device.allocated == {} and device.streams_open == 0


def test_an_engine_whose_profiler_reports_nothing_is_an_error(monkeypatch, engine):
    install(monkeypatch, FakeDevice(layers=[]))
    with pytest.raises(RuntimeError, match="no layer times"):
        profile_engine(engine, 8, iterations=2, warmup=0)


# -- yoloq profile ------------------------------------------------------------------------------------------------


def test_yoloq_profile_without_an_engine_file_exits_2(tmp_path, capsys):
    from flows.cli import main

    assert main(["profile", str(tmp_path / "missing.engine")]) == 2
    assert "missing.engine not found" in capsys.readouterr().err


def test_yoloq_profile_without_tensorrt_exits_2_with_the_reason(monkeypatch, engine, capsys):
    from flows.cli import main

    monkeypatch.setattr(environment_module, "cuda_devices", lambda: [])  # no GPU, whatever this machine has
    assert main(["profile", str(engine)]) == 2
    err = capsys.readouterr().err
    assert "backend 'tensorrt' is not available" in err and "no GPU" in err


def fake_gpu(monkeypatch) -> None:
    monkeypatch.setattr(environment_module, "cuda_devices", lambda: [GpuInfo(0, "NVIDIA H200", "9.0", 143771)])
    monkeypatch.setattr(environment_module, "library_version", lambda major: None)


def test_yoloq_profile_prints_the_markdown_and_writes_the_files(monkeypatch, engine, tmp_path, capsys):
    from flows.cli import main

    install(monkeypatch, FakeDevice(layers=list(TIMES.items()), inspector_json=QDQ_ENGINE))
    fake_gpu(monkeypatch)
    out = tmp_path / "out"
    assert main(["profile", str(engine), "--batch", "8", "--iterations", "3", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "# TensorRT profile: trt-int8-qdq-abc.engine" in printed and "Batch 8, 3 profiled executions" in printed
    assert "on NVIDIA H200" in printed
    assert sorted(p.name for p in out.iterdir()) == ["profile.json", "profile.md", "profile.png"]


def test_yoloq_profile_of_a_file_tensorrt_cannot_load_exits_2(monkeypatch, tmp_path, capsys):
    from flows.cli import main

    install(monkeypatch)
    fake_gpu(monkeypatch)
    junk = tmp_path / "junk.engine"
    junk.write_bytes(b"not an engine")
    assert main(["profile", str(junk), "--out", str(tmp_path / "out")]) == 2
    assert "TensorRT cannot load" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_profile_step_of_the_flow(monkeypatch, engine, tmp_path):
    import logging

    import tasks.profile
    from yoloq.backends import BuiltModel
    from yoloq.config import Params, VariantConfig

    install(monkeypatch, FakeDevice(layers=list(TIMES.items()), inspector_json=QDQ_ENGINE))
    fake_gpu(monkeypatch)
    monkeypatch.setattr(tasks.profile, "get_run_logger", lambda: logging.getLogger("test"))
    params = types.SimpleNamespace(tensorrt=Params.model_fields["tensorrt"].default)
    variant = VariantConfig(name="int8-qdq", precision="int8", quantization="qdq", backend="tensorrt")
    outcome = tasks.profile.profile_task.fn(BuiltModel(variant, engine, 1.0, 1.0), params, tmp_path / "p")
    assert outcome.error is None and [p.name for p in outcome.files] == ["profile.md", "profile.png", "profile.json"]
    assert outcome.metrics["profile.fp32_convs"] == 1 and outcome.metrics["profile.reformat_count"] == 1
    onnx_variant = BuiltModel(VariantConfig(name="fp32", backend="onnxruntime"), tmp_path / "m.onnx", 1.0, 0.0)
    assert tasks.profile.profile_task.fn(onnx_variant, params, tmp_path / "q").files == []  # not profiled
    junk = tmp_path / "junk.engine"
    junk.write_bytes(b"junk")
    failed = tasks.profile.profile_task.fn(BuiltModel(variant, junk, 1.0, 1.0), params, tmp_path / "r")
    assert failed.files == [] and "TensorRT cannot load" in (failed.error or "")
