"""Stage 2, simplify: onnxsim (and the stem rewrite, yoloq.stem), then prove numerical equivalence with
Polygraphy's comparator on real images."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from yoloq.artifacts import atomic_path, atomic_write_json, file_sha256, read_json
from yoloq.cache import cache_path, get_or_create
from yoloq.calibration_data import CalibrationDataLoader
from yoloq.config import SimplifyConfig
from yoloq.stem import space_to_depth_stem


@dataclass(frozen=True)
class SimplifyResult:
    onnx_path: Path
    simplified: bool
    message: str
    nodes_before: int
    nodes_after: int
    max_abs_error: float
    max_rel_error: float
    equivalent: bool
    seconds: float
    reused: bool = False


def simplify_model(
    source: Path, images: list[Path], input_name: str, imgsz: int, config: SimplifyConfig, out_dir: Path
) -> SimplifyResult:
    """Simplify `source` with onnxsim and compare it with the original on `images` (ONNX Runtime, Polygraphy).

    When onnxsim fails or the outputs differ beyond the tolerance, the unsimplified model is used and the
    result says why. The outcome is cached by content hash beside the simplified model.
    """
    nodes_before = len(onnx.load(str(source), load_external_data=False).graph.node)
    if not config.enabled:
        return SimplifyResult(
            source, False, "simplify.enabled is false", nodes_before, nodes_before, 0.0, 0.0, True, 0.0
        )
    check = images[: config.check_images]
    key_parts = ["simplify-v1", file_sha256(source), [file_sha256(p) for p in check], config.model_dump()]
    final = cache_path(out_dir, "model", key_parts, ".sim.onnx")
    record = cache_path(out_dir, "model", key_parts, ".sim.json")
    if record.is_file() and read_json(record)["simplified"] and not final.is_file():
        record.unlink()  # the record, written last, vouches for a model that is gone: simplify again

    def produce(path: Path) -> None:
        _save_record(path, _simplify(source, final, check, input_name, imgsz, config, nodes_before))

    cached = get_or_create(out_dir, "model", key_parts, ".sim.json", produce, read_json)
    onnx_path = final if cached.value["simplified"] else source
    return SimplifyResult(**{**cached.value, "onnx_path": onnx_path, "reused": cached.reused})


def _simplify(
    source: Path,
    final: Path,
    check: list[Path],
    input_name: str,
    imgsz: int,
    config: SimplifyConfig,
    nodes_before: int,
) -> SimplifyResult:
    """onnxsim, then Polygraphy's comparison on `check`: writes `final` when it succeeds (kept when equivalent)."""
    start = time.perf_counter()
    try:
        import onnxsim

        simplified_model, _ = onnxsim.simplify(onnx.load(str(source)))
    except Exception as exc:  # onnxsim raises plain RuntimeErrors/ValueErrors from C++
        return SimplifyResult(
            source,
            False,
            f"onnxsim failed ({type(exc).__name__}: {exc}); continuing with the unsimplified model",
            nodes_before,
            nodes_before,
            0.0,
            0.0,
            True,
            time.perf_counter() - start,
        )
    rewrite = ""
    if config.stem_space_to_depth:
        simplified_model, stem = space_to_depth_stem(simplified_model)
        rewrite = f"; stem {stem} as SpaceToDepth + a stride-1 conv" if stem else "; no stride-2 even-kernel stem"
    with atomic_path(final) as tmp:
        onnx.save(simplified_model, str(tmp))
        loader = CalibrationDataLoader(check, input_name, imgsz, batch_size=1)
        max_abs, max_rel, equivalent = compare_models(source, tmp, loader, config.atol, config.rtol)
    nodes_after = len(simplified_model.graph.node)
    if equivalent:
        message = f"simplified {nodes_before} -> {nodes_after} nodes{rewrite}; outputs equal within atol {config.atol}"
    else:
        message = (
            f"simplified model{rewrite} differs (max abs {max_abs:.3g}, max rel {max_rel:.3g} > atol {config.atol}/"
            f"rtol {config.rtol}); continuing with the unsimplified model"
        )
    return SimplifyResult(
        final if equivalent else source,
        equivalent,
        message,
        nodes_before,
        nodes_after,
        max_abs,
        max_rel,
        equivalent,
        time.perf_counter() - start,
    )


def _save_record(record: Path, result: SimplifyResult) -> None:
    fields = {k: v for k, v in result.__dict__.items() if k not in ("onnx_path", "reused")}
    atomic_write_json(record, fields)


def compare_models(
    reference: Path, candidate: Path, loader: CalibrationDataLoader, atol: float, rtol: float
) -> tuple[float, float, bool]:
    """Run both models on the loader's batches with Polygraphy (ONNX Runtime); (max abs, max rel, equal?)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    runners = [
        OnnxrtRunner(SessionFromOnnx(str(reference)), name="original"),
        OnnxrtRunner(SessionFromOnnx(str(candidate)), name="simplified"),
    ]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=loader)
        accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    max_abs, max_rel = 0.0, 0.0
    (_, reference_iterations), (_, candidate_iterations) = results[0], results[1]
    for expected, actual in zip(reference_iterations, candidate_iterations, strict=True):
        for name in expected.keys():
            diff = np.abs(expected[name].astype(np.float64) - actual[name].astype(np.float64))
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            magnitude = np.abs(expected[name].astype(np.float64))
            significant = magnitude > atol  # relative error of values near zero says nothing
            max_rel = max(max_rel, float((diff[significant] / magnitude[significant]).max(initial=0.0)))
    return max_abs, max_rel, bool(accuracy)
