"""`yoloq compare` against a real MLflow sqlite store holding runs shaped like the quantize flow's."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.compare import compare_runs, latest_parent_runs
from yoloq.errors import InputError

VARIANTS = {  # name: (precision, backend, map50_95, delta vs fp32, latency ms, images/s)
    "fp32": ("fp32", "tensorrt", 0.3356, 0.0, 1.458, 3450.0),
    "fp16": ("fp16", "tensorrt", 0.3361, 0.0005, 0.572, 9877.0),
    "int8-qdq": ("int8", "tensorrt", 0.3419, 0.0063, 0.683, 7620.0),
}


def log_flow_run(client: MlflowClient, experiment_id: str, name: str) -> str:
    parent = client.create_run(experiment_id, tags={"mlflow.runName": name}).info.run_id
    for variant, (precision, backend, map50_95, delta, latency, ips) in VARIANTS.items():
        tags = {"mlflow.parentRunId": parent, "mlflow.runName": variant}
        if variant != "fp16":  # the flow tags variant runs yoloq.kind=variant; older runs have no such tag
            tags["yoloq.kind"] = "variant"
        child = client.create_run(experiment_id, tags=tags)
        run_id = child.info.run_id
        client.log_param(run_id, "precision", precision)
        client.log_param(run_id, "backend", backend)
        for key, value in {
            "map50_95": map50_95,
            "delta_map50_95_vs_fp32": delta,
            "latency_ms_b1": latency,
            "throughput_ips": ips,
            "size_mb": 5.6,
        }.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id, "FINISHED")
    log_search_candidates(client, experiment_id, parent)
    client.set_terminated(parent, "FINISHED")
    return parent


def log_search_candidates(client: MlflowClient, experiment_id: str, parent: str) -> None:
    """Child runs like the INT8 search's (flows/search.py): tagged yoloq.kind=candidate, no precision param."""
    for name, map50_95 in (("int8.minmax-64.default", 0.33), ("int8.minmax-64.top4", 0.335)):
        run_id = client.create_run(
            experiment_id, tags={"mlflow.parentRunId": parent, "mlflow.runName": name, "yoloq.kind": "candidate"}
        ).info.run_id
        client.log_param(run_id, "search.stage", "precision")
        client.log_param(run_id, "calibration.algorithm", "minmax")
        client.log_metric(run_id, "map50_95", map50_95)
        client.set_terminated(run_id, "FINISHED")
    failed = client.create_run(  # a candidate whose build failed: only its stage
        experiment_id, tags={"mlflow.parentRunId": parent, "mlflow.runName": "int8.mse-64.default"}
    ).info.run_id
    client.log_param(failed, "search.stage", "calibration")
    client.set_tag(failed, "yoloq.kind", "candidate")
    client.set_terminated(failed, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("yoloq", artifact_location=(root / "artifacts").as_uri())
    runs = [log_flow_run(client, experiment_id, f"yolov5n-{i}") for i in range(3)]
    return uri, client, runs


def test_compare_two_runs_table_plot_and_comparison_run(store, tmp_path):
    uri, client, runs = store
    table, plot, comparison_id = compare_runs(uri, runs[:2], "yoloq", tmp_path)
    lines = table.splitlines()
    assert len(lines) == 2 + 2 * len(VARIANTS)  # the search's candidate runs are not variants
    assert " ? " not in table and "int8.minmax-64" not in table
    assert "| yolov5n-0 | int8-qdq | int8 | tensorrt | 0.3419 | +0.63 | +0.58 | 0.68 | 7620.0 | 5.60 |" in table
    assert "| yolov5n-1 | fp32 | fp32 | tensorrt | 0.3356 | +0.00 | -0.05 |" in table
    assert plot.read_bytes()[:4] == b"\x89PNG"
    comparison = client.get_run(comparison_id)
    assert comparison.data.tags["yoloq.kind"] == "comparison"
    assert comparison.data.tags["yoloq.compared_runs"] == ",".join(runs[:2])
    assert {f.path for f in client.list_artifacts(comparison_id)} == {"compare.md", "compare.png"}


def test_default_is_the_two_latest_flow_runs_not_comparisons(store, tmp_path):
    uri, client, runs = store
    compare_runs(uri, [], "yoloq", tmp_path)  # logs a comparison run, which must not count as a flow run
    assert latest_parent_runs(client, "yoloq", 2) == [runs[2], runs[1]]


def test_a_run_with_only_search_candidates_has_no_variant_runs(store, tmp_path):
    uri, client, runs = store
    experiment_id = client.get_run(runs[0]).info.experiment_id
    parent = client.create_run(experiment_id, tags={"mlflow.runName": "interrupted"}).info.run_id
    log_search_candidates(client, experiment_id, parent)
    with pytest.raises(InputError, match="has no variant runs"):
        compare_runs(uri, [parent], "yoloq", tmp_path)


def test_unknown_run_and_experiment_are_clear_errors(store, tmp_path):
    uri, client, runs = store
    with pytest.raises(InputError, match="not found"):
        compare_runs(uri, ["0" * 32], "yoloq", tmp_path)
    child = client.search_runs([client.get_run(runs[0]).info.experiment_id], f"tags.mlflow.parentRunId = '{runs[0]}'")
    with pytest.raises(InputError, match="has no variant runs"):
        compare_runs(uri, [child[0].info.run_id], "yoloq", tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        compare_runs(uri, [], "no-such-experiment", tmp_path)


def test_cli_compare_prints_the_table(store, tmp_path, capsys):
    uri, _, runs = store
    assert main(["compare", runs[0], "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| yolov5n-0 | fp16 |" in out and "MLflow comparison run:" in out
    assert main(["compare", "--tracking-uri", uri, "--experiment", "missing", "--out", str(tmp_path)]) == 2
