from __future__ import annotations

import onnx
import pytest

from tests.conftest import CALIB_IMAGES
from yoloq.config import SimplifyConfig
from yoloq.preprocess import list_images
from yoloq.simplify import simplify_model


def test_onnxsim_result_is_proven_equivalent_on_real_images(simplified):
    assert simplified.simplified and simplified.equivalent
    assert simplified.nodes_after < simplified.nodes_before
    assert simplified.max_abs_error <= 1e-3
    assert onnx.load(str(simplified.onnx_path)).metadata_props  # model facts survive simplification


def test_simplify_is_reused_from_its_record(exported, simplified):
    again = simplify_model(
        exported.onnx_path,
        list_images(CALIB_IMAGES),
        exported.input_name,
        640,
        SimplifyConfig(),
        simplified.onnx_path.parent,
    )
    assert again.reused and again.onnx_path == simplified.onnx_path


def test_onnxsim_failure_falls_back_to_the_unsimplified_model(exported, tmp_path, monkeypatch):
    import onnxsim

    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxsim crash")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    result = simplify_model(
        exported.onnx_path, list_images(CALIB_IMAGES), exported.input_name, 640, SimplifyConfig(), tmp_path
    )
    assert result.onnx_path == exported.onnx_path and not result.simplified
    assert "onnxsim failed" in result.message and "unsimplified" in result.message


def test_disabled_simplify_passes_the_model_through(exported, tmp_path):
    result = simplify_model(exported.onnx_path, [], "images", 640, SimplifyConfig(enabled=False), tmp_path)
    assert result.onnx_path == exported.onnx_path and not result.simplified


@pytest.mark.parametrize("tolerance", [1e-12])
def test_tolerance_is_applied(exported, tmp_path, tolerance):
    config = SimplifyConfig(atol=tolerance, rtol=tolerance, check_images=1)
    result = simplify_model(exported.onnx_path, list_images(CALIB_IMAGES), exported.input_name, 640, config, tmp_path)
    # either bit-identical (equivalent) or rejected with the numbers in the message
    assert result.equivalent or "differs" in result.message


def test_the_stem_rewrite_is_checked_with_the_simplification(exported, tmp_path):
    config = SimplifyConfig(stem_space_to_depth=True)
    result = simplify_model(exported.onnx_path, list_images(CALIB_IMAGES), exported.input_name, 640, config, tmp_path)
    assert result.simplified and result.equivalent and result.max_rel_error <= 1e-3  # float summation order only
    assert "stem /model.0/conv/Conv as SpaceToDepth" in result.message
    model = onnx.load(str(result.onnx_path))
    depth = next(node for node in model.graph.node if node.op_type == "SpaceToDepth")
    assert depth.input[0] == exported.input_name and model.metadata_props
