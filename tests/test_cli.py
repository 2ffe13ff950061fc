from __future__ import annotations

import json

import yaml

from flows.cli import main
from tests.conftest import PROJECT, VAL_IMAGES, VAL_LABELS


def test_params_typo_exits_2_with_the_valid_keys(tmp_path, capsys):
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    data["validation"]["conf_treshold"] = 0.01
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", "-p", str(path)]) == 2
    err = capsys.readouterr().err
    assert "validation.conf_treshold: unknown key" in err and "conf_threshold" in err


def test_bad_set_value_exits_2(capsys):
    assert main(["run", "-p", str(PROJECT / "params.yaml"), "--set", "calibration.algorithm=entropy2"]) == 2
    assert "'minmax', 'entropy', 'percentile' or 'mse'" in capsys.readouterr().err


def run_shipped(*overrides: str) -> int:
    """`yoloq run` on the shipped params.yaml with these --set overrides."""
    return main(["run", "-p", str(PROJECT / "params.yaml")] + [a for o in overrides for a in ("--set", o)])


def test_tensorrt_variant_on_this_machine_exits_2_with_the_install_hint(tmp_path, capsys):
    assert (
        run_shipped(
            "variants.1.backend=tensorrt", f"output_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"
        )
        == 2
    )
    assert "pip install '.[tensorrt]'" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()  # refused before any work


def test_validate_one_onnx_model_writes_json(simplified, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(
        [
            "validate",
            "--model",
            str(simplified.onnx_path),
            "--images",
            str(VAL_IMAGES),
            "--labels",
            str(VAL_LABELS),
            "--num-images",
            "16",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 16 and 0.2 < result["map50_95"] < 0.6
    assert result["per_class_ap"]


def test_validate_rejects_missing_model_and_engines(tmp_path, capsys):
    assert main(["validate", "--model", str(tmp_path / "x.onnx"), "--images", ".", "--labels", "."]) == 2
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    assert main(["validate", "--model", str(engine), "--images", ".", "--labels", "."]) == 2
    assert "TensorRT" in capsys.readouterr().err


def test_missing_inputs_are_all_named_before_any_work(tmp_path, capsys):
    code = run_shipped(
        "model.path=/nonexistent/model.pt",
        f"calibration.images={tmp_path}/calib",
        f"validation.labels={tmp_path}/labels",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "model.path: /nonexistent/model.pt not found" in err
    assert "calibration.images: folder" in err and "validation.labels:" in err
    assert "Traceback" not in err and not (tmp_path / "m.db").exists()
