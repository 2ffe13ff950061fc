"""The cross-machine tools: benchmarks/fingerprint.py names the first stage at which two runs part, and
benchmarks/range_stability.py perturbs histograms as last-bit differences do."""

from __future__ import annotations

from benchmarks.fingerprint import compare


def fingerprint(qdq: str = "q1", int8: dict[str, str] | None = None) -> dict[str, object]:
    detections = {"a.jpg": "1", "b.jpg": "2"}
    return {
        "cpu": "x",
        "fp32_model_sha256": "m",
        "stats_sha256": "s",
        "qdq_model_sha256": qdq,
        "int8": {"map50_95": 0.3, "map50": 0.5, "detections_sha256": int8 or detections},
        "fp32": {"map50_95": 0.3, "map50": 0.5, "detections_sha256": detections},
    }


def test_the_first_differing_stage_is_named():
    assert compare(fingerprint(), fingerprint(qdq="q2")) == "first difference: qdq_model_sha256 (q1 vs q2)"


def test_equal_models_list_the_images_whose_detections_differ():
    report = compare(fingerprint(), fingerprint(int8={"a.jpg": "1", "b.jpg": "3"}))
    assert report.splitlines() == [
        "models and statistics equal",
        "int8: detections differ on 1 of 2 images ['b.jpg']",
        "fp32: detections differ on 0 of 2 images []",
    ]


def test_perturbed_histograms_keep_their_count_and_move_little():
    import numpy as np

    from benchmarks.range_stability import perturbed

    hist = np.full(2048, 1000, dtype=np.int64)
    moved = perturbed(hist, 1e-6, np.random.default_rng(0))
    assert moved.sum() == hist.sum() and (moved >= 0).all()
    assert 0 < np.abs(moved - hist).sum() < hist.sum() * 1e-2
