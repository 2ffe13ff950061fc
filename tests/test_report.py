from __future__ import annotations

from pathlib import Path

from yoloq.report import VariantResult, check_gate, comparison_plot, results_document, results_table, with_deltas


def result(name: str, precision: str, map50_95: float) -> VariantResult:
    return VariantResult(name, precision, "onnxruntime", map50_95, map50_95 + 0.15, 20.0, 40.0, 8, 7.9, Path("m.onnx"))


def test_deltas_are_measured_against_the_fp32_reference():
    results = with_deltas([result("fp32", "fp32", 0.3367), result("int8", "int8", 0.3301)], "fp32")
    assert results[0].delta_map50_95 == 0.0
    assert round(results[1].delta_map50_95, 4) == -0.0066


def test_gate_passes_within_and_fails_beyond_the_allowed_drop():
    results = with_deltas([result("fp32", "fp32", 0.3367), result("int8", "int8", 0.3201)], "fp32")
    assert check_gate(results, 0.02).passed
    verdict = check_gate(results, 0.01)
    assert not verdict.passed
    assert verdict.reasons == ["int8: mAP50-95 0.3201 is 1.66 points below FP32 (gate allows 1.00)"]


def test_table_json_and_plot(tmp_path):
    results = with_deltas([result("fp32", "fp32", 0.3367), result("int8", "int8", 0.3301)], "fp32")
    table = results_table(results)
    assert "| int8 | int8 | onnxruntime | 0.3301 | 0.4801 | -0.66 |" in table
    document = results_document(results, "abc", "sqlite:///x.db", check_gate(results, 0.015))
    assert set(document["variants"][0]) >= {
        "name",
        "precision",
        "backend",
        "map50_95",
        "map50",
        "latency_ms_b1",
        "throughput_ips",
        "size_mb",
    }
    assert document["mlflow_run_id"] == "abc" and document["gate_passed"]
    plot = comparison_plot(results, tmp_path / "plot.png", "test")
    assert plot.read_bytes()[:4] == b"\x89PNG"
