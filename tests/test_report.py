from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from yoloq.config import GateConfig
from yoloq.report import VariantResult, check_gate, comparison_plot, results_document, results_table, with_deltas


def result(name: str, precision: str, map50_95: float) -> VariantResult:
    return VariantResult(name, precision, "onnxruntime", map50_95, map50_95 + 0.15, 20.0, 40.0, 8, 7.9, Path("m.onnx"))


def test_deltas_are_measured_against_the_fp32_reference():
    results = with_deltas([result("fp32", "fp32", 0.3367), result("int8", "int8", 0.3301)], "fp32")
    assert results[0].delta_map50_95 == 0.0
    assert round(results[1].delta_map50_95, 4) == -0.0066


def test_gate_passes_within_and_fails_beyond_the_allowed_drop():
    results = with_deltas([result("fp32", "fp32", 0.3367), result("int8", "int8", 0.3201)], "fp32")
    assert check_gate(results, GateConfig(max_map_drop=0.02)).passed
    verdict = check_gate(results, GateConfig(max_map_drop=0.01))
    assert not verdict.passed
    assert verdict.reasons == ["int8: mAP50-95 0.3201 is 1.66 points below FP32 (gate allows 1.00)"]


def test_table_json_and_plot(tmp_path):
    results = with_deltas([result("fp32", "fp32", 0.3367), result("int8", "int8", 0.3301)], "fp32")
    table = results_table(results)
    assert "| int8 | int8 | onnxruntime | 0.3301 | 0.4801 | -0.66 |" in table
    document = results_document(results, "abc", "sqlite:///x.db", check_gate(results, GateConfig(max_map_drop=0.015)))
    assert set(document["variants"][0]) >= {
        "name",
        "precision",
        "backend",
        "map50_95",
        "map50",
        "latency_ms_b1",
        "throughput_ips",
        "size_mb",
        "model_sha256",
    }
    assert document["mlflow_run_id"] == "abc" and document["gate_passed"]
    plot = comparison_plot(results, tmp_path / "plot.png", "test")
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_int8_is_judged_against_fp16_for_accuracy_and_speed():
    def timed(name: str, precision: str, map50_95: float, ips: float) -> VariantResult:
        return VariantResult(name, precision, "tensorrt", map50_95, 0.5, 1.0, ips, 32, 5.0, Path("m.engine"))

    fp32, fp16 = timed("fp32", "fp32", 0.3400, 3000.0), timed("fp16", "fp16", 0.3402, 7000.0)
    gate = GateConfig(max_map_drop=0.005, max_map_drop_vs_fp16=0.003, min_speedup_vs_fp16=1.4)
    fast_and_close = timed("int8", "int8", 0.3380, 10_000.0)
    assert check_gate([fp32, fp16, fast_and_close], gate).passed
    slow_and_lossy = timed("int8", "int8", 0.3360, 7_700.0)
    verdict = check_gate([fp32, fp16, slow_and_lossy], gate)
    assert verdict.reasons == [
        "int8: mAP50-95 0.3360 is 0.42 points below FP16 (gate allows 0.30)",
        "int8: 1.10x the FP16 throughput at batch 32 (gate wants at least 1.40x)",
    ]
    no_speed_gate = gate.model_copy(update={"min_speedup_vs_fp16": 0.0, "max_map_drop_vs_fp16": 0.005})
    assert check_gate([fp32, fp16, slow_and_lossy], no_speed_gate).passed
    # without an FP16 variant (the CPU path) only the FP32 drop counts
    assert check_gate([fp32, slow_and_lossy], gate).passed


def test_a_result_reads_back_from_its_json_row_and_from_a_target_row():
    result = VariantResult("int8", "int8", "tensorrt", 0.33456, 0.5, 1.2345, 5000.5, 32, 2.5, Path("m.engine"), -0.0051)
    assert result.as_json()["model_sha256"] is None  # no such file here
    back = VariantResult.from_json(result.as_json())  # results.json has no model path
    assert back == VariantResult("int8", "int8", "tensorrt", 0.33456, 0.5, 1.234, 5000.5, 32, 2.5, Path(), -0.0051)
    target_row = {**result.as_json(), "model_path": "/shared/m.engine"}
    del target_row["delta_map50_95_vs_fp32"]  # a build target's row: the parent computes the deltas
    assert VariantResult.from_json(target_row).model_path == Path("/shared/m.engine")
    assert VariantResult.from_json(target_row).delta_map50_95 == 0.0


def test_results_name_the_scored_file_by_its_content(tmp_path):
    model = tmp_path / "m.int8-qdq.onnx"
    model.write_bytes(b"model bytes")
    row = replace(result("int8", "int8", 0.33), model_path=model)
    assert row.as_json()["model_sha256"] == hashlib.sha256(b"model bytes").hexdigest()
