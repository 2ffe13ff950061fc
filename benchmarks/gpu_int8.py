"""INT8 that pays on TensorRT: FP16, TensorRT implicit INT8, yoloq Q/DQ INT8 and NVIDIA ModelOpt Q/DQ, one table.

Two steps (the GPU machine has TensorRT but no exporter; see ../shared/gpu/README.md for the kit):

    # 1. here, on the CPU: FP32 ONNX + Q/DQ models of each model into DEST (speed-only models travel without
    #    their weights, which step 2 refills with seeded random values: kernel choice does not depend on them)
    python benchmarks/gpu_int8.py prepare --dest .trt-inputs \\
        --model yolov5n=data/models/yolov5n.pt --model yolov8n=data/models/yolov8n.pt --model yolov8s=yolov8s.yaml \\
        [--modelopt-python /path/to/modelopt-venv/bin/python]

    # 2. on the GPU machine, from the project root, with the kit's Python
    python benchmarks/gpu_int8.py run --inputs .trt-inputs --out $OUT --level 2 \\
        --tactics EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS --cache /tmp/trt-cache --budget-s 540

Per model, `run` builds (or reuses, by content key) one engine per row at one builder optimization level, with
one persisted timing cache, the same profile (batch 1/8/32) and FP16 fallback for every INT8 row; then times all
of a model's engines in one process, interleaved round by round (yoloq.speed; CUDA events, batch 32 and batch 1),
so the ratios are not the machine's load; profiles each engine per layer (yoloq profile); and, for models with
real weights, scores COCO mAP on --val. Builds that would not finish inside --budget-s are skipped and listed.
Outputs in OUT: table.md (printed), results.json, profiles.tar.gz (every profile's md/json/png) and the timing
cache, so a later call (a fresh machine) starts warm.

Rows: fp16 (FP16 flag), int8-implicit (TensorRT's MinMax calibrator on --calib images, FP16 fallback), qdq (yoloq's
Q/DQ model: every placement rule, the stem and head convs in float: the search's `.default` candidates), qdq-all
(every placement rule, no conv in float: the search's `top0` candidates, the fastest it can ship), qdq-conv
(only rule 1, conv inputs: yoloq's placement before the rules, for the ablation), qdq-stem (only the stem conv in
float), modelopt (NVIDIA ModelOpt ONNX PTQ, INT8, default settings; made in a throwaway venv), and any qdq-NAME
row that `prepare --row` added (a Q/DQ model made elsewhere, e.g. a search candidate: `--row
yolov8n:qdq-top4=PATH`). `prepare --s2d` adds NAME-s2d: the model with its stride-2 stem rewritten (yoloq.stem,
`simplify.stem_space_to_depth`), whose rows fp16-base and int8-implicit-base
are built from the unrewritten FP32 model, so both forms are timed in one interleaved group.

`run --val A --val B ...` scores mAP on A (the table's column) and, with --detections, writes every row's
detections on A + B + ... (one set, in that order) to OUT/detections/MODEL-ROW.npz, to be scored on the CPU
machine (yoloq.cache.load_detections): TensorRT's accuracy on many images without spending GPU time on COCO eval.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from yoloq.artifacts import atomic_write_json, atomic_write_text, read_json  # noqa: E402

MANIFEST = "manifest.json"
BASE_ROWS = {"fp16-base": "fp16", "int8-implicit-base": "int8-implicit"}  # built from the entry's unrewritten model
ROWS = ("fp16", "int8-implicit", "qdq", "qdq-all", "qdq-stem", "qdq-conv", "modelopt", *BASE_ROWS)
EXTRA_ROW_PREFIX = "qdq-"  # prepare --row MODEL:qdq-NAME=PATH: more Q/DQ rows, built like qdq


def is_row(row: str) -> bool:
    return row in ROWS or (row.startswith(EXTRA_ROW_PREFIX) and len(row) > len(EXTRA_ROW_PREFIX))


def extra_rows(specs: list[str]) -> dict[str, dict[str, Path]]:
    """`MODEL:ROW=PATH` specs of `prepare --row` -> {model: {row: path}}; raises SystemExit on a bad spec."""
    rows: dict[str, dict[str, Path]] = {}
    for spec in specs:
        model, _, rest = spec.partition(":")
        row, _, path = rest.partition("=")
        if not (model and path and is_row(row) and row not in ROWS):
            raise SystemExit(f"--row {spec!r}: give MODEL:{EXTRA_ROW_PREFIX}NAME=PATH, e.g. yolov8n:qdq-top4=m.onnx")
        rows.setdefault(model, {})[row] = Path(path)
    return rows


STRIP_BYTES = 4096  # speed-only models travel without initializers larger than this
TENSORRT_86_MAX_OPSET = 17  # the newest ONNX opset TensorRT 8.6's parser reads


# -- step 1: on the CPU ------------------------------------------------------------------------------------------


def strip_weights(source: Path, dest: Path) -> int:
    """Copy `source` to `dest` without its large initializers (their dims and types stay): returns bytes saved."""
    model = onnx.load(str(source))
    saved = 0
    for init in model.graph.initializer:
        size = len(init.raw_data)
        if size > STRIP_BYTES:
            saved += size
            init.ClearField("raw_data")
            init.doc_string = "yoloq:stripped"
    onnx.save(model, str(dest))
    return saved


def refill_weights(source: Path, dest: Path, seed: int = 0) -> Path:
    """`source` with every stripped initializer filled with seeded random values of its type (speed only)."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for index, init in enumerate(model.graph.initializer):
        if init.doc_string != "yoloq:stripped":
            continue
        shape = tuple(init.dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        if np.issubdtype(dtype, np.integer):
            values = rng.integers(-127, 128, shape).astype(dtype)
        else:
            values = (rng.standard_normal(shape) * 0.02).astype(dtype)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(dest))
    return dest


def relabel_opset(path: Path, target: int = TENSORRT_86_MAX_OPSET) -> None:
    """Relabel a newer-opset model (ModelOpt writes opset 19) as `target` when every node is valid there: the same
    op with no attribute that `target` lacks (TensorRT 8.6's ONNX parser reads opsets up to 17)."""
    model = onnx.load(str(path))
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current <= target:
        return
    for node in model.graph.node:
        schema = onnx.defs.get_schema(node.op_type, target, node.domain)
        unknown = {a.name for a in node.attribute} - set(schema.attributes)
        if unknown:
            raise ValueError(f"{path}: {node.op_type} {node.name} has attributes {unknown} that opset {target} lacks")
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def modelopt_model(args: argparse.Namespace, fp32: Path, input_name: str, images: list[Path], folder: Path) -> Path:
    """NVIDIA ModelOpt's ONNX PTQ of `fp32` (INT8, max calibration), made by the throwaway venv's Python."""
    from yoloq.calibration_data import CalibrationDataLoader

    calib_npy = folder / "calib.npy"
    loader = CalibrationDataLoader(images[: args.calib_images], input_name, 640, 8)
    np.save(calib_npy, np.concatenate([batch[input_name] for batch in loader]))
    target = folder / "modelopt.onnx"
    script = PROJECT / "benchmarks" / "modelopt_ptq.py"
    command = [str(args.modelopt_python), str(script), "--onnx", str(fp32), "--calib", str(calib_npy)]
    subprocess.run([*command, "--out", str(target), "--method", "max"], check=True)
    relabel_opset(target)
    return target


def manifest_entry(dest: Path, name: str, source: str, real: bool, files: dict[str, Path]) -> dict[str, Any]:
    """Copy `files` (weights stripped from speed-only models) to DEST/name/ROW.onnx; the manifest's entry."""
    entry: dict[str, Any] = {"name": name, "source": source, "real_weights": real, "files": {}}
    for row, path in files.items():
        target = dest / name / f"{row}.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        if real:
            shutil.copyfile(path, target)
        else:
            strip_weights(path, target)
        entry["files"][row] = str(target.relative_to(dest))
    sizes = ", ".join(f"{k} {(dest / v).stat().st_size / 1e6:.1f} MB" for k, v in entry["files"].items())
    print(f"{name}: {sizes}")
    return entry


def prepare(args: argparse.Namespace) -> int:
    from yoloq.calibrate import calibration_statistics, write_qdq_model
    from yoloq.config import CalibrationConfig, ExportConfig, ModelConfig, SimplifyConfig
    from yoloq.export import export_model
    from yoloq.preprocess import list_images
    from yoloq.quant.graph import analyze_head, default_float_convs, prepare_model
    from yoloq.quant.placement import place_qdq
    from yoloq.quant.qdq import insert_qdq
    from yoloq.quant.ranges import amax_for
    from yoloq.simplify import simplify_model

    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    cache = args.cache
    calib_images = list_images(args.calib)
    calibration = CalibrationConfig(images=args.calib, num_images=args.calib_images)
    overrides = dict(item.split("=", 1) for item in args.qdq)
    added = extra_rows(args.row)
    models = []
    for spec in args.model:
        name, source = spec.split("=", 1)
        forms = [(name, SimplifyConfig())]
        if args.s2d:
            forms.append((f"{name}-s2d", SimplifyConfig(stem_space_to_depth=True)))
        base: Path | None = None
        for entry_name, simplify_config in forms:
            real = not source.endswith((".yaml", ".yml"))
            exported = export_model(ModelConfig(path=Path(source)), ExportConfig(), cache / name / "export")
            simplified = simplify_model(
                exported.onnx_path,
                calib_images[:4],
                exported.input_name,
                640,
                simplify_config,
                cache / entry_name / "simplify",
            )
            print(f"{entry_name}: {simplified.message}")
            if entry_name != name and "SpaceToDepth" not in simplified.message:
                continue  # no stride-2 stem to rewrite (YOLOv8): no second entry
            fp32 = simplified.onnx_path
            stats = calibration_statistics(
                fp32, exported.input_name, 640, calibration, [], cache / entry_name, args.calib_images
            )
            files: dict[str, Path] = {"fp32": fp32}
            if base is not None:
                files["base"] = base  # the unrewritten FP32 model: rows fp16-base and int8-implicit-base
            if entry_name in overrides:
                files["qdq"] = Path(overrides[entry_name])
            else:
                files["qdq"] = write_qdq_model(fp32, stats, args.algorithm, 99.99, None, cache / entry_name, 640).path
            files["qdq-all"] = write_qdq_model(fp32, stats, args.algorithm, 99.99, [], cache / entry_name, 640).path
            model = prepare_model(fp32)
            head = analyze_head(model)
            stem = write_qdq_model(fp32, stats, args.algorithm, 99.99, head.stem_convs, cache / entry_name, 640)
            files["qdq-stem"] = stem.path
            conv_only = place_qdq(model, head, default_float_convs(head), rules=["conv input"])
            files["qdq-conv"] = cache / entry_name / "qdq-conv.onnx"
            onnx.save(
                insert_qdq(model, conv_only, amax_for(stats.stats, args.algorithm, 99.99)), str(files["qdq-conv"])
            )
            files.update(added.get(entry_name, {}))
            if args.modelopt_python:
                files["modelopt"] = modelopt_model(args, fp32, exported.input_name, calib_images, cache / entry_name)
            models.append(manifest_entry(dest, entry_name, source, real, files))
            base = base or fp32
    atomic_write_json(dest / MANIFEST, {"models": models, "algorithm": args.algorithm, "calib": str(args.calib)})
    return 0


# -- step 2: on the GPU ------------------------------------------------------------------------------------------


def build_overrides(args: argparse.Namespace, cache: Path, extra: list[str]) -> list[str]:
    """params.yaml overrides of a GPU benchmark's builds: level, tactics, calibration, and one timing cache in
    `cache` (seeded from --timing-cache, an earlier call's, when it has none yet)."""
    timing_cache = cache / "timing.cache"
    if args.timing_cache and args.timing_cache.is_file() and not timing_cache.is_file():
        shutil.copyfile(args.timing_cache, timing_cache)
    overrides = [
        f"tensorrt.builder_optimization_level={args.level}",
        f"tensorrt.timing_cache={timing_cache}",
        f"calibration.images={args.calib}",
        f"calibration.num_images={args.calib_images}",
        f"output_dir={cache}",
        *extra,
    ]
    if args.tactics:
        overrides.append(f"tensorrt.tactic_sources=[{args.tactics}]")
    return overrides


def run(args: argparse.Namespace) -> int:
    from yoloq.backends.base import closing_runner
    from yoloq.backends.tensorrt.profile import profile_engine, profile_metrics, summarize
    from yoloq.backends.tensorrt.profile_report import write_profile
    from yoloq.backends.tensorrt.runner import TensorRTRunner
    from yoloq.backends.tensorrt.timing import time_device
    from yoloq.build import build_variant_with_deadline
    from yoloq.cache import save_detections
    from yoloq.config import LabelledSet, ValidationConfig, VariantConfig, load_params
    from yoloq.export import read_facts
    from yoloq.metrics import coco_map
    from yoloq.preprocess import list_images, load_preprocessed
    from yoloq.speed import tile_batch, time_interleaved
    from yoloq.validate import detect, load_validation_set

    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    manifest = read_json(args.inputs / MANIFEST)
    timing_cache = cache / "timing.cache"
    params = load_params(PROJECT / "params.yaml", build_overrides(args, cache, args.param))
    variants = {
        "fp16": VariantConfig(name="fp16", precision="fp16", backend="tensorrt"),
        "int8-implicit": VariantConfig(
            name="int8-implicit", precision="int8", quantization="implicit", backend="tensorrt"
        ),
        **{
            row: VariantConfig(name=row, precision="int8", quantization="qdq", backend="tensorrt")
            for row in ("qdq", "qdq-all", "qdq-stem", "qdq-conv", "modelopt")
        },
    }
    for row, like in BASE_ROWS.items():
        variants[row] = variants[like].model_copy(update={"name": row})
    wanted = [row for row in args.rows.split(",") if row]
    unknown = sorted(row for row in wanted if not is_row(row))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)} or {EXTRA_ROW_PREFIX}NAME")
    for row in wanted:
        if row not in variants:  # a prepare --row Q/DQ model: built like qdq
            variants[row] = variants["qdq"].model_copy(update={"name": row})
    results_path = out / "results.json"
    results: dict[str, Any] = read_json(results_path) if results_path.is_file() else {"models": {}}
    results["settings"] = {
        "builder_optimization_level": args.level,
        "tactic_sources": args.tactics,
        "profile": "1/8/32",
        "timing": f"{args.rounds} interleaved rounds x {args.iterations} executions (CUDA events)",
    }
    profiles = out / "profiles"
    skipped: list[str] = []

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    order = args.models.split(",") if args.models else [entry["name"] for entry in manifest["models"]]
    entries = {entry["name"]: entry for entry in manifest["models"]}
    for name in order:
        entry = entries[name]
        folder = cache / name
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for row, relative in entry["files"].items():
            source = args.inputs / relative
            files[row] = source if entry["real_weights"] else refill_weights(source, folder / source.name)
        facts = read_facts(files["fp32"]) if entry["real_weights"] else None
        built: dict[str, Any] = {}
        model_results = results["models"].setdefault(name, {"real_weights": entry["real_weights"], "rows": {}})
        for row in wanted:
            source_key = "base" if row in BASE_ROWS else "fp32"
            if source_key not in files or (row not in files and row not in ("fp16", "int8-implicit", *BASE_ROWS)):
                continue
            deadline = left() - args.reserve_s  # what is left after measuring the engines built so far
            if deadline < args.min_build_s:
                skipped.append(f"{name}/{row}: {left():.0f} s of the budget left")
                continue
            qdq = files.get(row) if row.startswith(("qdq", "modelopt")) else None
            limited = params.model_copy(deep=True)
            limited.build.timeout_s = deadline  # a build that would overrun the call is killed, the rest is kept
            try:
                built[row] = build_variant_with_deadline(
                    variants[row], limited, files[source_key], qdq, folder / "engines", lambda m: print(m, flush=True)
                )
            except Exception as exc:  # record and go on: one failed build must not lose the others
                model_results["rows"][row] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
                print(f"{name}/{row}: build FAILED: {exc}", flush=True)
            if timing_cache.is_file():
                shutil.copyfile(timing_cache, out / "timing.cache")
        if not built:
            continue
        images = list_images(args.val[0] / "images")
        frames = [f[0] for p in images[:32] if (f := load_preprocessed(p, 640)) is not None]
        batches = {size: tile_batch(np.stack(frames), size) for size in (1, 32)}
        with ExitStack() as stack:  # every runner is closed, also when a later one fails to load
            runners = {row: stack.enter_context(closing_runner(TensorRTRunner(b.path))) for row, b in built.items()}
            speeds = {}
            for size, batch in batches.items():

                def measure(runner: Any, batch: np.ndarray = batch) -> Any:
                    return lambda: time_device(runner, batch, args.iterations, 5).throughput_ms_per_batch

                speeds[size] = time_interleaved(
                    {row: measure(r) for row, r in runners.items()}, size, args.rounds if size == 32 else 5
                )
            dataset = None
            if facts is not None:
                main, *more = args.val
                extra = [LabelledSet(images=f / "images", labels=f / "labels") for f in more] if args.detections else []
                config = ValidationConfig(
                    images=main / "images", labels=main / "labels", extra_sets=extra, batch_size=32
                )
                dataset = load_validation_set(config, len(facts.names))
                first = len(images)  # the images of args.val[0], listed above
            for row, runner in runners.items():
                b32, b1 = speeds[32][row], speeds[1][row]
                record = {
                    "images_per_s_b32": b32.images_per_s,
                    "ms_b32": b32.median_ms,
                    "ms_b1": b1.median_ms,
                    "x_fp16_b32": b32.speedup_over(speeds[32]["fp16"]) if "fp16" in runners else None,
                    "build_s": built[row].build_seconds,
                    "engine_mb": built[row].size_mb,
                    "reused": built[row].details.get("reused"),
                }
                if dataset is not None:
                    found = detect(runner, [t.path for t in dataset.truths], facts.head_format, 640, config)
                    record["map50_95_val"] = coco_map(dataset.truths[:first], found[:first], facts.names).map50_95
                    if args.detections:
                        save_detections(out / "detections" / f"{name}-{row}.npz", found)
                        record["detections_images"] = len(found)
                model_results["rows"][row] = record
        for row, b in built.items():
            try:
                profile = profile_engine(b.path, 32, args.profile_iterations, 5)
                write_profile(profile, profiles / f"{name}-{row}")
                model_results["rows"][row]["profile"] = profile_metrics(summarize(profile))
            except Exception as exc:
                model_results["rows"][row]["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        atomic_write_json(results_path, results)
    results["skipped"] = skipped
    atomic_write_json(results_path, results)
    table_text = table(results)
    atomic_write_text(out / "table.md", table_text + "\n")
    if profiles.is_dir():
        with tarfile.open(out / "profiles.tar.gz", "w:gz") as archive:
            archive.add(profiles, arcname="profiles")
        shutil.rmtree(profiles)
    print(table_text)
    print(f"skipped: {skipped or 'none'}; {time.perf_counter() - started:.0f} s")
    return 0


def table(results: dict[str, Any]) -> str:
    settings = results.get("settings", {})
    lines = [
        f"Builder level {settings.get('builder_optimization_level')}, tactic sources {settings.get('tactic_sources')}, "
        f"profile {settings.get('profile')}, {settings.get('timing')}.",
        "",
        "| model | row | images/s b32 | × FP16 | ms b1 | mAP50-95 val | build s | INT8/FP16/FP32 convs | reformat ms |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, model in results.get("models", {}).items():
        for row, r in model["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | {row} | failed: {r['error'][:120]} | | | | | | |")
                continue
            profile = r.get("profile", {})
            counts = "/".join(f"{profile.get(f'profile.{p}_convs', 0):.0f}" for p in ("int8", "fp16", "fp32"))
            x16 = f"{r['x_fp16_b32']:.2f}" if r.get("x_fp16_b32") else ""
            ap = f"{r['map50_95_val']:.4f}" if "map50_95_val" in r else "random weights"
            reformat = f"{profile['profile.reformat_ms']:.2f}" if "profile.reformat_ms" in profile else ""
            lines.append(
                f"| {name} | {row} | {r['images_per_s_b32']:,.0f} | {x16} | {r['ms_b1']:.3f} | {ap} | "
                f"{r['build_s']:.0f} | {counts} | {reformat} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("prepare")
    p.add_argument("--dest", type=Path, default=PROJECT / ".trt-inputs")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help=".pt/.onnx, or .yaml")
    p.add_argument("--qdq", action="append", default=[], metavar="NAME=PATH", help="use this Q/DQ model as 'qdq'")
    p.add_argument("--row", action="append", default=[], metavar="MODEL:qdq-NAME=PATH", help="one more Q/DQ row")
    p.add_argument("--calib", type=Path, default=PROJECT / "data/coco/calib/images")
    p.add_argument("--calib-images", type=int, default=128)
    p.add_argument("--algorithm", default="mse")
    p.add_argument("--cache", type=Path, default=PROJECT / "runs/gpu-int8-prepare")
    p.add_argument("--modelopt-python", type=Path, help="python of a venv with nvidia-modelopt[onnx]")
    p.add_argument("--s2d", action="store_true", help="also NAME-s2d: the stride-2 stem rewritten (yoloq.stem)")
    r = steps.add_parser("run")
    r.add_argument("--inputs", type=Path, default=PROJECT / ".trt-inputs")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--cache", type=Path, default=Path("/tmp/yoloq-gpu-int8"))
    r.add_argument("--timing-cache", type=Path, help="a timing cache from an earlier call")
    r.add_argument("--level", type=int, default=2)
    r.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml override")
    r.add_argument("--tactics", default="")
    r.add_argument("--rows", default="fp16,qdq-all,qdq,int8-implicit,modelopt", help="in the order to build")
    r.add_argument("--models", default="", help="comma-separated models of the manifest, in the order to run them")
    r.add_argument("--calib", type=Path, default=PROJECT / "data/coco/calib/images")
    r.add_argument("--calib-images", type=int, default=128)
    r.add_argument("--val", type=Path, action="append", help="folder with images/, labels/ (default data/coco/val)")
    r.add_argument("--detections", action="store_true", help="write each row's detections on every --val folder")
    r.add_argument("--rounds", type=int, default=15)
    r.add_argument("--iterations", type=int, default=50)
    r.add_argument("--profile-iterations", type=int, default=20)
    r.add_argument("--budget-s", type=float, default=540)
    r.add_argument("--min-build-s", type=float, default=60, help="skip a build when less budget than this is left")
    r.add_argument("--reserve-s", type=float, default=60, help="kept for timing, profiling and mAP of a model")
    args = parser.parse_args()
    if args.step == "run" and not args.val:
        args.val = [PROJECT / "data/coco/val"]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return prepare(args) if args.step == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
