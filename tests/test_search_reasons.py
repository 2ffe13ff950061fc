"""The search's speed reason on TensorRT quotes the candidate's per-layer profile (flows/search.py)."""

from __future__ import annotations

from pathlib import Path

from flows.search import too_slow
from yoloq.report import VariantResult

SLOW = VariantResult("int8.mse-128.top4", "int8", "tensorrt", 0.959, 0.6, 0.75, 8514.0, 32, 7.2, Path("e.engine"))
PROFILE = {
    "profile.total_ms": 3.42,
    "profile.int8_convs": 48.0,
    "profile.fp16_convs": 5.0,
    "profile.fp32_convs": 11.0,
    "profile.reformat_count": 61.0,
    "profile.reformat_ms": 1.42,
}


def test_a_too_slow_candidate_says_why_per_layer() -> None:
    reason = too_slow(SLOW, 0.94, 1.0, PROFILE)
    assert reason == (
        "int8.mse-128.top4: 0.94x the FP16 throughput at batch 32 (gate wants at least 1.00x; why, per layer: "
        "3.420 ms per batch, 48/5/11 INT8/FP16/FP32 convs, 61 reformats (1.420 ms))"
    )


def test_without_a_profile_the_reason_is_the_speed_alone() -> None:
    assert too_slow(SLOW, 0.94, 1.0, {}).endswith("(gate wants at least 1.00x)")
