"""TensorRT variants on a GPU: mAP, device latency and throughput, build time and engine size, in one table.

Two steps, because the GPU machine has no PyTorch-free exporter and no ONNX Runtime quantizer:

    # 1. here, on the CPU: export + simplify + explicit INT8 Q/DQ (reused from runs/cache), copied to DEST
    python benchmarks/gpu_tensorrt.py prepare --dest .trt-inputs

    # 2. on the GPU (TensorRT 8.6 kit: ../shared/gpu/README.md), from the project root
    python benchmarks/gpu_tensorrt.py run --inputs .trt-inputs --out OUT \\
        --set output_dir=/tmp/yoloq-trt --set tensorrt.builder_optimization_level=0 \\
        --set "tensorrt.tactic_sources=[EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS]"

With `prepare --search-json runs/<run>/search-int8/search.json` (a CPU flow run's INT8 search), step 1 also
writes that search's winning calibration with the k most sensitive convs in float for every k of
search.float_steps, and `run --search` runs yoloq's search (yoloq.search.run_search) on TensorRT: those
candidates, built and judged against the fp32 and fp16 engines by the gate of params.yaml (mAP vs FP32 and FP16,
throughput vs FP16 at the profile's max batch). `--implicit-search` does the same for implicit MinMax INT8 with
the convs held in FP16 by layer precision constraints.

`run` builds (or reuses, from output_dir/cache/tensorrt) the engines of fp32, fp16, int8 implicit with the
MinMax and Entropy2 calibrators (FP16 fallback per tensorrt.fp16_fallback) and int8-qdq (the Q/DQ ONNX from
step 1); measures COCO mAP on validation.images, device time (CUDA events, tensorrt.timing.iterations after
warm-up) at batch 1 and at the profile's max batch, and end-to-end time per image (read + letterbox + infer +
decode/NMS, batch 1). After each variant it rewrites OUT/results.json and OUT/table.md, and keeps every result
in output_dir/gpu_tensorrt_results.json, so a run split over several calls (--variants) ends with one table.
With `--profile`, each engine's per-layer profile (yoloq profile: time, kernel precision, reformats, Q/DQ per layer
and per block, at the profile's max batch) goes to OUT/profile-<variant>/ and its key numbers into the row.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from yoloq.artifacts import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from yoloq.config import Params, VariantConfig, load_params  # noqa: E402

FP32_NAME, QDQ_NAME, MANIFEST_NAME = "model.onnx", "model.int8-qdq.onnx", "inputs.json"
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "int8-minmax": {"precision": "int8", "quantization": "implicit", "calibrator": "minmax"},
    "int8-entropy2": {"precision": "int8", "quantization": "implicit", "calibrator": "entropy2"},
    "int8-qdq": {"precision": "int8", "quantization": "qdq"},
}


def prepare(params: Params, dest: Path, search_json: Path | None = None) -> None:
    """CPU: the simplified FP32 ONNX and the Q/DQ ONNX that the GPU run builds from, copied into `dest`; with
    `search_json`, the precision-stage candidates of that search's winning calibration too."""
    from yoloq.calibrate import calibrate
    from yoloq.export import export_model
    from yoloq.preprocess import list_images
    from yoloq.simplify import simplify_model

    cache = params.output_dir / "cache"
    exported = export_model(params.model, params.export, cache / "export")
    calib_images = list_images(params.calibration.images)
    simplified = simplify_model(
        exported.onnx_path, calib_images, exported.input_name, exported.facts.imgsz, params.simplify, cache / "simplify"
    )
    calibration = calibrate(
        simplified.onnx_path,
        exported.input_name,
        exported.facts.imgsz,
        params.calibration,
        list_images(params.validation.images),
        cache / "calibration",
        progress=print,
    )
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(simplified.onnx_path, dest / FP32_NAME)
    shutil.copyfile(calibration.qdq_path, dest / QDQ_NAME)
    manifest = {
        "model": params.model.path.name,
        "fp32_onnx": simplified.onnx_path.name,
        "qdq_onnx": calibration.qdq_path.name,
        "simplify": simplified.message,
        "qdq_calibration": {"algorithm": calibration.algorithm, "images": calibration.num_images},
    }
    if search_json is not None:
        manifest["search"] = prepare_search(
            params,
            simplified.onnx_path,
            exported.input_name,
            exported.facts.imgsz,
            exported.facts.head_format,
            search_json,
            dest,
        )
    atomic_write_json(dest / MANIFEST_NAME, manifest)
    print(f"prepared {dest}: {FP32_NAME} ({simplified.onnx_path.name}), {QDQ_NAME} ({calibration.qdq_path.name})")


def prepare_search(
    params: Params, fp32_onnx: Path, input_name: str, imgsz: int, head_format: str, search_json: Path, dest: Path
) -> dict[str, Any]:
    """The winning calibration of a CPU search, written with the k most sensitive convs in float for every k."""
    from yoloq.calibrate import calibration_statistics, write_qdq_model
    from yoloq.preprocess import list_images
    from yoloq.search import precision_candidates
    from yoloq.sensitivity import analyze_sensitivity

    found = read_json(search_json)
    calibration = [c for c in found["candidates"] if c["stage"] == "calibration"]
    winner = max(calibration, key=lambda c: c["map50_95"])  # the calibration stage's pick (first of equals)
    algorithm, size = winner["algorithm"], int(winner["num_images"])
    cache = params.output_dir / "cache" / "calibration"
    stats = calibration_statistics(
        fp32_onnx, input_name, imgsz, params.calibration, list_images(params.validation.images), cache, size, print
    )
    ranking = analyze_sensitivity(
        fp32_onnx,
        stats,
        algorithm,
        params.calibration.percentile,
        params.search.sensitivity_images,
        imgsz,
        head_format,
        cache,
        print,
    ).layers
    files = {}
    default = write_qdq_model(fp32_onnx, stats, algorithm, params.calibration.percentile, None, cache, imgsz)
    files["default"] = _copy(default.path, dest / f"qdq-{algorithm}-{size}-default.onnx")
    from yoloq.quant.graph import analyze_head, prepare_model

    stem = analyze_head(prepare_model(fp32_onnx)).stem_convs
    for candidate in precision_candidates("int8", algorithm, size, ranking, params.search.float_steps, stem):
        floats = list(candidate.float_nodes)
        model = write_qdq_model(fp32_onnx, stats, algorithm, params.calibration.percentile, floats, cache, imgsz)
        k = candidate.name.rsplit(".top", 1)[1]
        files[f"top{k}"] = _copy(model.path, dest / f"qdq-{algorithm}-{size}-top{k}.onnx")
    return {
        "algorithm": algorithm,
        "num_images": size,
        "float_steps": params.search.float_steps,
        "keep_float": stem,
        "default_float": default.float_nodes,
        "ranking": [layer.as_json() for layer in ranking],
        "files": files,
        "cpu_search": str(search_json),
    }


def _copy(source: Path, target: Path) -> str:
    shutil.copyfile(source, target)
    return target.name


def run(
    params: Params,
    inputs: Path,
    out: Path,
    names: list[str],
    search: bool = False,
    implicit_search: bool = False,
    profile: bool = False,
) -> int:
    """GPU: build, validate and time each variant; write the table after each; then the searches asked for."""
    from yoloq.backends import get_backend, tensorrt_availability
    from yoloq.backends.tensorrt.build import TensorRTBackend
    from yoloq.export import read_facts
    from yoloq.validate import load_validation_set

    availability = tensorrt_availability()
    if not availability.available:
        print(availability.message(), file=sys.stderr)
        return 2
    fp32_onnx, qdq_onnx = inputs / FP32_NAME, inputs / QDQ_NAME
    for path in (fp32_onnx, qdq_onnx):
        if not path.is_file():
            print(
                f"{path} missing: run `python benchmarks/gpu_tensorrt.py prepare --dest {inputs}` first",
                file=sys.stderr,
            )
            return 2
    manifest = read_json(inputs / MANIFEST_NAME)
    if (search or implicit_search) and "search" not in manifest:
        print(f"{inputs} has no search candidates: run prepare with --search-json", file=sys.stderr)
        return 2
    facts = read_facts(fp32_onnx)
    dataset = load_validation_set(params.validation, len(facts.names))
    backend = get_backend("tensorrt", params)
    assert isinstance(backend, TensorRTBackend)
    backend.progress = print
    bench = _Bench(params, backend, facts, dataset, fp32_onnx, out, profile)
    print(f"validation: {len(dataset.truths)} images, {dataset.stats.num_boxes} boxes", flush=True)
    for name in names:
        bench.measure(name, VariantConfig(name=name, backend="tensorrt", **VARIANTS[name]), qdq_onnx)
    if search:
        bench.search(manifest["search"], inputs, implicit=False)
    if implicit_search:
        bench.search(manifest["search"], inputs, implicit=True)
    print()
    print((out / "table.md").read_text())
    return 0


class _Bench:
    """Builds, scores and times variants on TensorRT; keeps every row in output_dir/gpu_tensorrt_results.json."""

    def __init__(
        self, params: Params, backend: Any, facts: Any, dataset: Any, fp32_onnx: Path, out: Path, profile: bool = False
    ) -> None:
        self.profile = profile
        self.params, self.backend, self.facts, self.dataset, self.fp32_onnx, self.out = (
            params,
            backend,
            facts,
            dataset,
            fp32_onnx,
            out,
        )
        self.build_dir = params.output_dir / "cache" / "tensorrt"
        self.history_path = params.output_dir / "gpu_tensorrt_results.json"
        self.history: dict[str, Any] = read_json(self.history_path) if self.history_path.is_file() else {}
        self.level = params.tensorrt.builder_optimization_level
        self.sample_paths = [t.path for t in dataset.truths]
        self.sample = _sample_batch(self.sample_paths, facts.imgsz, 8)
        out.mkdir(parents=True, exist_ok=True)

    def key(self, name: str) -> str:
        return f"{name}@level{self.level}@{len(self.dataset.truths)}img"

    def measure(self, name: str, variant: VariantConfig, qdq_onnx: Path | None) -> dict[str, Any]:
        from yoloq.backends.tensorrt.timing import measure_device_timing, measure_end_to_end
        from yoloq.validate import evaluate

        params, facts, settings = self.params, self.facts, self.params.tensorrt
        print(f"\n=== {name} (builder optimization level {self.level}) ===", flush=True)
        built = self.backend.build(variant, self.fp32_onnx, qdq_onnx, self.build_dir)
        with self.backend.load(built) as runner:
            start = time.perf_counter()
            result = evaluate(
                runner, self.dataset, facts.head_format, facts.imgsz, facts.names, params.validation, print
            )
            eval_seconds = time.perf_counter() - start
            b1, bmax = measure_device_timing(
                runner, self.sample, [1, settings.profile.max_batch], settings.timing.iterations, settings.timing.warmup
            )
            e2e_ms = measure_end_to_end(runner, self.sample_paths, facts.imgsz, facts.head_format, params.validation)
        row = {
            "variant": name,
            "map50_95": result.map50_95,
            "map50": result.map50,
            "latency_ms_b1": b1.latency_ms_median,
            "latency_ms_b1_p90": b1.latency_ms_p90,
            "images_per_s_b1": b1.images_per_s,
            "max_batch": bmax.batch,
            "latency_ms_bmax": bmax.latency_ms_median,
            "images_per_s_bmax": bmax.images_per_s,
            "end_to_end_ms_per_image": e2e_ms,
            "timing_iterations": b1.iterations,
            "build_seconds": built.build_seconds,
            "engine_mb": built.size_mb,
            "engine": built.path.name,
            "validation_images": len(self.dataset.truths),
            "validation_seconds": eval_seconds,
            "details": built.details,
        }
        if self.profile:
            row["profile"] = self.profile_layers(name, built)
        self.history[self.key(name)] = row
        atomic_write_json(self.history_path, self.history)
        _write_outputs(self.history, self.out)
        print(
            f"{name}: mAP50-95 {result.map50_95:.4f}, mAP50 {result.map50:.4f}, "
            f"{b1.latency_ms_median:.3f} ms at batch 1, "
            f"{bmax.images_per_s:.0f} images/s at batch {bmax.batch}, e2e {e2e_ms:.2f} ms/image, "
            f"build {built.build_seconds:.0f} s ({'reused' if built.details.get('reused') == 'true' else 'built'})",
            flush=True,
        )
        return row

    def profile_layers(self, name: str, built: Any) -> dict[str, float]:
        """The engine's per-layer profile in OUT/profile-<name>/ (as `yoloq profile` writes it); its key numbers."""
        from yoloq.backends.tensorrt.profile import profile_engine
        from yoloq.backends.tensorrt.profile_report import write_profile

        settings = self.params.tensorrt.layer_profile
        keys = ("tensorrt_version", "tensorrt_library_version", "gpu")
        environment = {k: built.details.get(k, "?") for k in keys}
        profiled = profile_engine(built.path, None, settings.iterations, settings.warmup, environment)
        files = write_profile(profiled, self.out / f"profile-{name}")
        print(files.text, flush=True)
        return files.metrics

    def result_of(self, name: str) -> Any:
        from yoloq.report import VariantResult

        row = self.history.get(self.key(name))
        if row is None:
            raise SystemExit(f"the search needs the {name} row at this level and image count: add it to --variants")
        precision = "int8" if name not in ("fp32", "fp16") else name
        return VariantResult(
            name, precision, "tensorrt", row["map50_95"], row["map50"], row["latency_ms_b1"],
            row["images_per_s_bmax"], row["max_batch"], row["engine_mb"], Path(row["engine"]),
        )  # fmt: skip

    def search(self, prepared: dict[str, Any], inputs: Path, implicit: bool) -> None:
        """yoloq's search on TensorRT over the prepared candidates, judged by params.yaml's gate."""
        import dataclasses

        from yoloq.errors import EngineBuildError
        from yoloq.report import gate_reasons
        from yoloq.search import Candidate, CandidateFailed, candidates_table, run_search
        from yoloq.sensitivity import LayerSensitivity

        fp32, fp16 = self.result_of("fp32"), self.result_of("fp16")
        ranking = [
            LayerSensitivity(r["node"], int(r["position"]), float(r["error"]), float(r["gain"]))
            for r in prepared["ranking"]
        ]
        prefix = "int8-implicit" if implicit else "int8-qdq"

        keep_float = prepared.get("keep_float", [])

        def evaluate(candidate: Candidate) -> Any:
            k = None if candidate.stage == "calibration" else candidate.name.rsplit(".top", 1)[1]
            if implicit:
                variant = VariantConfig(
                    name=candidate.name,
                    precision="int8",
                    quantization="implicit",
                    backend="tensorrt",
                    calibrator="minmax",
                    float_layers=list(candidate.float_nodes or ()),
                )
                qdq = None
            else:
                variant = VariantConfig(name=candidate.name, precision="int8", quantization="qdq", backend="tensorrt")
                qdq = inputs / prepared["files"]["default" if k is None else f"top{k}"]
            try:
                self.measure(candidate.name, variant, qdq)
            except EngineBuildError as exc:
                raise CandidateFailed(str(exc).split(". Build log")[0]) from exc
            result = self.result_of(candidate.name)
            return dataclasses.replace(result, delta_map50_95=result.map50_95 - fp32.map50_95)

        algorithm = "minmax" if implicit else prepared["algorithm"]
        size = self.params.calibration.num_images if implicit else int(prepared["num_images"])
        outcome = run_search(
            prefix,
            [algorithm],
            [size],
            self.params.search.float_steps,
            evaluate,
            lambda r: gate_reasons(r, fp32, fp16, self.params.gate),
            lambda _algorithm, _size: ranking,
            print,
            keep_float,
            [] if implicit else prepared.get("default_float", []),
        )
        text = f"## TensorRT search: {prefix}\n\n{outcome.summary}\n\n{candidates_table(outcome)}\n"
        atomic_write_text(self.out / f"search-{prefix}.md", text)
        print("\n" + text, flush=True)


def _sample_batch(paths: list[Path], imgsz: int, count: int) -> Any:
    import numpy as np

    from yoloq.preprocess import load_preprocessed

    frames = [load_preprocessed(p, imgsz) for p in paths[:count]]
    return np.stack([f[0] for f in frames if f is not None])


def table(rows: list[dict[str, Any]]) -> str:
    """The results as markdown: one line per variant and builder optimization level."""
    batch = str(rows[0]["max_batch"]) if rows else "max"
    lines = [
        f"| variant | mAP50-95 | mAP50 | latency ms (b1) | images/s (b{batch}) | e2e ms/image | build s | engine MB | "
        "card | TensorRT | opt level | images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        d = r["details"]
        lines.append(
            f"| {r['variant']} | {r['map50_95']:.4f} | {r['map50']:.4f} | {r['latency_ms_b1']:.3f} | "
            f"{r['images_per_s_bmax']:,.0f} | {r['end_to_end_ms_per_image']:.2f} | {r['build_seconds']:.0f} | "
            f"{r['engine_mb']:.1f} | {d.get('gpu', '?')} | {d.get('tensorrt_version', '?')} "
            f"(lib {d.get('tensorrt_library_version', '?')}) | {d.get('builder_optimization_level', '?')} | "
            f"{r.get('validation_images', '?')} |"
        )
    return "\n".join(lines)


def _write_outputs(history: dict[str, Any], out: Path) -> None:
    order = {name: index for index, name in enumerate(VARIANTS)}
    rows = sorted(
        history.values(),
        key=lambda r: (
            r["details"].get("builder_optimization_level", ""),
            r.get("validation_images", 0),
            order.get(r["variant"], len(order)),
        ),
    )
    atomic_write_json(out / "results.json", {"rows": rows})
    atomic_write_text(out / "table.md", table(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("-p", "--params", type=Path, default=PROJECT / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--dest", "--inputs", dest="inputs", type=Path, default=PROJECT / ".trt-inputs")
    parser.add_argument("--out", type=Path, default=Path("gpu-results"), help="results.json and table.md")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--search-json", type=Path, help="prepare: a CPU flow run's search-<variant>/search.json")
    parser.add_argument("--search", action="store_true", help="run: yoloq's search over the Q/DQ candidates")
    parser.add_argument("--implicit-search", action="store_true", help="run: the search for implicit MinMax INT8")
    parser.add_argument("--profile", action="store_true", help="run: per-layer profile of each engine in OUT")
    parser.add_argument("--float-steps", help="run: comma-separated k values instead of the prepared float_steps")
    args = parser.parse_args()
    params = load_params(args.params, args.overrides)
    if args.float_steps:
        params.search.float_steps = [int(k) for k in args.float_steps.split(",")]
    if args.step == "prepare":
        prepare(params, args.inputs, args.search_json)
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    return run(params, args.inputs, args.out, names, args.search, args.implicit_search, args.profile)


if __name__ == "__main__":
    sys.exit(main())
