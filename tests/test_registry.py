"""Model registry on a real MLflow sqlite store: champion for variants that pass the gate, challenger otherwise."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from flows.registry import register_champion, register_variants, registered_model_name, variant_gate_reason
from tests.conftest import PROJECT
from yoloq.config import GateConfig, load_params
from yoloq.report import GateVerdict, VariantResult, check_gate, ship_decision, with_deltas


def result(name: str, precision: str, map50_95: float, model: Path) -> VariantResult:
    return VariantResult(name, precision, "onnxruntime", map50_95, 0.5, 20.0, 40.0, 8, 3.0, model)


def test_champion_and_challenger_versions_point_at_the_logged_model_files(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("yoloq", artifact_location=(tmp_path / "artifacts").as_uri())
    params = load_params(PROJECT / "params.yaml", ["variants.1.name=int8-minmax"])
    params.variants.append(params.variants[1].model_copy(update={"name": "int8-entropy"}))
    models = {}
    for name in ("fp32", "int8-minmax", "int8-entropy"):
        models[name] = tmp_path / f"{name}.onnx"
        models[name].write_bytes(name.encode() * 100)
    results = with_deltas(
        [
            result("fp32", "fp32", 0.336, models["fp32"]),
            result("int8-minmax", "int8", 0.331, models["int8-minmax"]),
            result("int8-entropy", "int8", 0.314, models["int8-entropy"]),
        ],
        "fp32",
    )
    gate = check_gate(results, GateConfig(max_map_drop=0.015))
    children = {}
    for r in results:
        run_id = client.create_run(experiment, tags={"mlflow.runName": r.name}).info.run_id
        client.log_artifact(run_id, str(r.model_path))
        client.set_terminated(run_id, "FINISHED")
        children[r.name] = run_id

    registered = register_variants(client, params, results, gate, children)

    assert [(v.model_name, v.alias) for v in registered] == [
        ("yoloq-yolov5n-int8-minmax", "champion"),
        ("yoloq-yolov5n-int8-entropy", "challenger"),
    ]
    champion = client.get_model_version_by_alias("yoloq-yolov5n-int8-minmax", "champion")
    assert champion.run_id == children["int8-minmax"] and champion.tags["gate"] == "passed"
    downloaded = client.download_artifacts(champion.run_id, "int8-minmax.onnx", str(tmp_path / "dl"))
    assert Path(downloaded).read_bytes() == models["int8-minmax"].read_bytes()
    challenger_run = client.get_run(children["int8-entropy"])
    assert challenger_run.data.tags["gate"] == "failed" and challenger_run.data.tags["registry.alias"] == "challenger"
    assert "2.20 points below FP32" in challenger_run.data.tags["gate.reason"]

    # the next run's passing variant takes the champion alias; versions accumulate
    again = register_variants(client, params, results, gate, children)
    assert again[0].version == "2"
    assert str(client.get_model_version_by_alias("yoloq-yolov5n-int8-minmax", "champion").version) == "2"


def test_names_and_reasons():
    params = load_params(PROJECT / "params.yaml", ["registry.model_name=det"])
    assert registered_model_name(params, "int8", "h100") == "det-h100-int8"
    assert registered_model_name(params, "int8") == "det-int8"
    gate = GateVerdict(False, ["int8: 2 points below FP32", "int8b: too slow"])
    assert variant_gate_reason(gate, "int8") == "int8: 2 points below FP32"
    assert variant_gate_reason(GateVerdict(True, []), "int8") == ""
    assert variant_gate_reason(GateVerdict(False, ["no FP16 variant to compare with"]), "int8") != ""


def timed(name: str, precision: str, map50_95: float, ips: float) -> VariantResult:
    return VariantResult(name, precision, "tensorrt", map50_95, 0.5, 1.0, ips, 32, 5.0, Path(f"{name}.engine"))


def test_ship_decision_is_the_fastest_variant_that_passes_every_gate():
    gate = GateConfig(max_map_drop=0.005, max_map_drop_vs_fp16=0.003, min_speedup_vs_fp16=1.2)
    fp32, fp16 = timed("fp32", "fp32", 0.3356, 3450.0), timed("fp16", "fp16", 0.3358, 9877.0)
    fast_int8 = timed("int8", "int8", 0.3340, 13_000.0)
    decision = ship_decision(with_deltas([fp32, fp16, fast_int8], "fp32"), gate, "fp32")
    assert decision.variant == "int8" and "also passing but slower: fp32 (0.27x), fp16 (0.76x)" in decision.reason
    slow_int8 = timed("int8", "int8", 0.3340, 10_000.0)  # 1.01x FP16: INT8 does not pay, FP16 ships
    decision = ship_decision(with_deltas([fp32, fp16, slow_int8], "fp32"), gate, "fp32")
    assert decision.variant == "fp16" and "refused: int8: 1.01x the FP16 throughput" in decision.reason
    lossy = timed("int8", "int8", 0.3200, 20_000.0)
    assert ship_decision(with_deltas([fp32, lossy], "fp32"), gate, "fp32").variant == "fp32"  # on a CPU, say


def test_the_champion_of_a_run_is_one_registered_model_with_the_reason(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("yoloq", artifact_location=(tmp_path / "artifacts").as_uri())
    params = load_params(PROJECT / "params.yaml")
    results = with_deltas([timed("fp32", "fp32", 0.3356, 3450.0), timed("int8", "int8", 0.3350, 9000.0)], "fp32")
    children = {}
    for r in results:
        path = tmp_path / r.model_path.name
        path.write_bytes(b"engine")
        run_id = client.create_run(experiment).info.run_id
        client.log_artifact(run_id, str(path))
        children[r.name] = run_id
    decision = ship_decision(results, params.gate, "fp32")
    champion = register_champion(client, params, decision, results, children)
    assert champion is not None and champion.model_name == "yoloq-yolov5n"
    version = client.get_model_version_by_alias("yoloq-yolov5n", "champion")
    assert version.tags["variant"] == "int8" and version.tags["why"].startswith("int8: the fastest variant")
    assert version.source == f"runs:/{children['int8']}/int8.engine"
    nothing = ship_decision(with_deltas([timed("fp32", "fp32", 0.3356, 0.0)], "fp32"), params.gate, "fp32")
    assert nothing.variant is None and register_champion(client, params, nothing, results, children) is None
