"""Where YOLOv5's SpaceToDepth stem should happen: in the engine, fused into the uint8 input, or on the host.

yolov5n's Q/DQ INT8 engine (stem rewritten as SpaceToDepth + 3x3 conv, `simplify.stem_space_to_depth`) is 0.87x
TensorRT's implicit INT8 on TensorRT 8.6; its profile puts the gap in the stem: the SpaceToDepth shuffle (FP32,
0.34 ms per batch of 32) and the reformat that quantizes its output (0.32 ms), against an INT8 conv of 0.23 ms
(benchmarks/results/int8-h200.md). This benchmark builds the same Q/DQ model with four input forms and times them
interleaved with the FP16 and implicit INT8 engines of the unrewritten model, all in one process:

    qdq-float     float NCHW (N, 3, 640, 640) input, SpaceToDepth in the engine (today's rewritten model)
    qdq-uint8     uint8 NHWC (N, 640, 640, 3) frames (`tensorrt.input: uint8`): Cast, Transpose, Div, SpaceToDepth
    qdq-uint8-s2d uint8 NHWC frames, the NHWC -> NCHW transpose and SpaceToDepth merged into one Reshape-Transpose-
                  Reshape (`merged_uint8_s2d`): one shuffle instead of two
    qdq-planar    uint8 (N, 12, 320, 320): the host (or the GPU letterbox kernel) writes the space-to-depth frame;
                  the engine only casts and divides (`planar_s2d_input`)
    qdq-fp16-stem the unrewritten model, its 6x6 stem left float and typed FP16 by Cast nodes (`fp16_stem`): the
                  stem as the implicit engine runs it
    fp16 / fp16-uint8 / int8-implicit: the unrewritten FP32 model (what ships today), float or uint8 input

Every SpaceToDepth form computes the same numbers (`prepare` checks that in ONNX Runtime). Two steps:

    python benchmarks/stem_input.py prepare --inputs .trt-inputs --dest .xcpu/stem   # gpu_int8.py prepare --s2d
    bash benchmarks/kit.sh benchmarks/stem_input.py run --dest .xcpu/stem --out $OUT --level 2 \\
        --tactics EDGE_MASK_CONVOLUTIONS,JIT_CONVOLUTIONS --calib .xcpu/stem/calib
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from yoloq.artifacts import atomic_write_json, read_json  # noqa: E402

BLOCK = 2
_PREFIX = "/yoloq_stem_input/"


def _split_space_to_depth(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.ValueInfoProto]:
    """The SpaceToDepth node that reads the image input, and that input."""
    image = model.graph.input[0]
    for node in model.graph.node:
        if node.op_type == "SpaceToDepth" and node.input[0] == image.name:
            return node, image
    raise SystemExit("the model has no SpaceToDepth on its input: prepare with gpu_int8.py prepare --s2d")


def _replace_input(
    model: onnx.ModelProto,
    drop: onnx.NodeProto,
    nodes: list[onnx.NodeProto],
    new_input: onnx.ValueInfoProto,
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    """A copy of `model` whose input is `new_input`, with `nodes` in front and `drop` (the SpaceToDepth) removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    graph.initializer.extend(initializers)
    kept = [n for n in graph.node if n.name != drop.name]
    del graph.node[:]
    graph.node.extend(nodes + kept)
    graph.input.remove(graph.input[0])
    graph.input.insert(0, new_input)
    return out


def merged_uint8_s2d(model: onnx.ModelProto) -> onnx.ModelProto:
    """uint8 NHWC frames -> Cast -> one Reshape-Transpose-Reshape (NHWC -> space-to-depth NCHW) -> Div 255."""
    s2d, image = _split_space_to_depth(model)
    _, channels, height, width = (d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim)
    batch = image.type.tensor_type.shape.dim[0].dim_param or image.type.tensor_type.shape.dim[0].dim_value
    h, w = int(height) // BLOCK, int(width) // BLOCK
    six = numpy_helper.from_array(np.array([0, h, BLOCK, w, BLOCK, channels], np.int64), _PREFIX + "six")
    four = numpy_helper.from_array(np.array([0, BLOCK * BLOCK * int(channels), h, w], np.int64), _PREFIX + "four")
    scale = numpy_helper.from_array(np.array(255.0, np.float32), _PREFIX + "255")
    name = image.name
    nodes = [
        helper.make_node("Cast", [name], [_PREFIX + "cast"], to=TensorProto.FLOAT, name=_PREFIX + "Cast"),
        helper.make_node("Reshape", [_PREFIX + "cast", six.name], [_PREFIX + "r6"], name=_PREFIX + "Reshape6"),
        # (N, h, bh, w, bw, C) -> (N, bh, bw, C, h, w): channel (bh * 2 + bw) * C + c, ONNX SpaceToDepth's order
        helper.make_node("Transpose", [_PREFIX + "r6"], [_PREFIX + "t"], perm=[0, 2, 4, 5, 1, 3], name=_PREFIX + "T"),
        helper.make_node("Reshape", [_PREFIX + "t", four.name], [_PREFIX + "r4"], name=_PREFIX + "Reshape4"),
        helper.make_node("Div", [_PREFIX + "r4", scale.name], [s2d.output[0]], name=_PREFIX + "Div"),
    ]
    new_input = helper.make_tensor_value_info(name, TensorProto.UINT8, [batch, int(height), int(width), channels])
    return _replace_input(model, s2d, nodes, new_input, [six, four, scale])


def planar_s2d_input(model: onnx.ModelProto, dtype: int) -> onnx.ModelProto:
    """The space-to-depth frame (N, 4C, H/2, W/2) as the input: uint8 (then Cast + Div 255 in the engine) or float."""
    s2d, image = _split_space_to_depth(model)
    dims = image.type.tensor_type.shape.dim
    batch = dims[0].dim_param or dims[0].dim_value
    shape = [batch, BLOCK * BLOCK * dims[1].dim_value, dims[2].dim_value // BLOCK, dims[3].dim_value // BLOCK]
    name = image.name
    scale = numpy_helper.from_array(np.array(255.0, np.float32), _PREFIX + "255")
    if dtype == TensorProto.FLOAT:
        nodes, initializers = [helper.make_node("Identity", [name], [s2d.output[0]], name=_PREFIX + "Identity")], []
    else:
        initializers = [scale]
        nodes = [
            helper.make_node("Cast", [name], [_PREFIX + "cast"], to=TensorProto.FLOAT, name=_PREFIX + "Cast"),
            helper.make_node("Div", [_PREFIX + "cast", scale.name], [s2d.output[0]], name=_PREFIX + "Div"),
        ]
    return _replace_input(model, s2d, nodes, helper.make_tensor_value_info(name, dtype, shape), initializers)


def fp16_stem(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float stem (the conv on the image input and its SiLU, up to the first Quantize) typed FP16 in the graph.

    In a Q/DQ network TensorRT 8.6 runs a float stem on an FP32 kernel even with FP16 preferred by precision
    constraints (1.17 ms for yolov5n's 6x6 stem, FP16 0.29 ms in the implicit engine): Cast nodes make the stem's
    tensors FP16, so the parser creates FP16 layers. Use on a Q/DQ model whose stem conv is left float (qdq-stem).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    image = graph.input[0].name
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    stem = next(n for n in consumers[image] if n.op_type == "Conv")
    if stem.input[1] not in {t.name for t in graph.initializer}:
        raise SystemExit("the stem conv's weights are quantized: use the qdq-stem model (stem left float)")
    region, frontier = [stem], [stem.output[0]]
    while frontier:  # the elementwise nodes after the conv up to the first QuantizeLinear
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type in {"Sigmoid", "Mul", "Relu", "HardSwish", "LeakyRelu"} and node not in region:
                region.append(node)
                frontier.extend(node.output)
    produced = {o for n in region for o in n.output}
    exits = sorted({o for o in produced if any(c not in region for c in consumers.get(o, []))})
    initializers = {t.name: t for t in graph.initializer}
    for name in stem.input[1:]:
        half = numpy_helper.from_array(numpy_helper.to_array(initializers[name]).astype(np.float16), name + "_fp16")
        graph.initializer.append(half)
    stem.input[1:] = [name + "_fp16" for name in stem.input[1:]]
    casts = [helper.make_node("Cast", [image], [_PREFIX + "image16"], to=TensorProto.FLOAT16, name=_PREFIX + "In")]
    stem.input[0] = _PREFIX + "image16"
    for name in exits:
        half = name + "_fp16"
        for node in region:
            node.output[:] = [half if o == name else o for o in node.output]
            node.input[:] = [half if i == name else i for i in node.input]
        casts.append(helper.make_node("Cast", [half], [name], to=TensorProto.FLOAT, name=_PREFIX + "Out" + name))
    inner = produced - set(exits)
    kept_info = [v for v in graph.value_info if v.name not in inner]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    nodes = [n for n in graph.node if n not in region]
    position = next(i for i, n in enumerate(nodes) if n.op_type != "Constant")
    del graph.node[:]
    graph.node.extend(nodes[:position] + casts[:1] + region + casts[1:] + nodes[position:])
    return out


def host_space_to_depth(frames_nhwc: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, 4C, H/2, W/2) in ONNX SpaceToDepth's channel order: what the host would send."""
    n, height, width, channels = frames_nhwc.shape
    six = frames_nhwc.reshape(n, height // BLOCK, BLOCK, width // BLOCK, BLOCK, channels)
    return np.ascontiguousarray(six.transpose(0, 2, 4, 5, 1, 3)).reshape(
        n, BLOCK * BLOCK * channels, height // BLOCK, width // BLOCK
    )


def prepare(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from yoloq.backends.tensorrt.uint8_input import add_uint8_input

    if not (args.inputs / "manifest.json").is_file():
        raise SystemExit(f"{args.inputs} has no manifest.json: make it with benchmarks/gpu_int8.py prepare --s2d")
    manifest = read_json(args.inputs / "manifest.json")
    entries = {e["name"]: e for e in manifest["models"]}
    base_name = args.model.removesuffix("-s2d")
    if args.model not in entries or base_name not in entries:
        raise SystemExit(f"{args.inputs} lacks {args.model} or {base_name} (it has {', '.join(entries)}): use --model")
    entry, base_entry = entries[args.model], entries[base_name]
    qdq = onnx.load(str(args.inputs / entry["files"]["qdq-all"]))
    dest: Path = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.inputs / entry["files"]["base"], dest / "base.onnx")
    forms = {
        "qdq-fp16-stem": fp16_stem(onnx.load(str(args.inputs / base_entry["files"]["qdq-stem"]))),
        "qdq-float": qdq,
        "qdq-uint8": add_uint8_input(qdq),
        "qdq-uint8-s2d": merged_uint8_s2d(qdq),
        "qdq-planar": planar_s2d_input(qdq, TensorProto.UINT8),
    }
    for row, model in forms.items():
        onnx.checker.check_model(model)
        onnx.save(model, str(dest / f"{row}.onnx"))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 640, 640, 3), dtype=np.uint8)
    feeds = {
        "qdq-fp16-stem": frames.transpose(0, 3, 1, 2).astype(np.float32) / 255.0,
        "qdq-float": frames.transpose(0, 3, 1, 2).astype(np.float32) / 255.0,
        "qdq-uint8": frames,
        "qdq-uint8-s2d": frames,
        "qdq-planar": host_space_to_depth(frames),
    }
    outputs = {}
    for row, feed in feeds.items():
        session = ort.InferenceSession(str(dest / f"{row}.onnx"), providers=["CPUExecutionProvider"])
        outputs[row] = session.run(None, {session.get_inputs()[0].name: feed})[0]
    for row, output in outputs.items():
        if row == "qdq-fp16-stem":  # the unrewritten model with its stem in FP16: close to it in float, not equal
            reference = ort.InferenceSession(str(args.inputs / base_entry["files"]["qdq-stem"]))
            expected = reference.run(None, {reference.get_inputs()[0].name: feeds[row]})[0]
            boxes = np.abs(output[..., :4] - expected[..., :4]).max()
            scores = np.abs(output[..., 4:] - expected[..., 4:]).max()
            print(f"{row}: largest difference from its float-stem model: boxes {boxes:.3g} px, scores {scores:.3g}")
            continue
        diff = float(np.abs(output - outputs["qdq-float"]).max())
        print(f"{row}: output {output.shape}, largest difference from qdq-float {diff:g}")
        if diff > 1e-3:
            raise SystemExit(f"{row} does not compute what qdq-float computes")
    calib = dest / "calib"
    calib.mkdir(exist_ok=True)
    for path in sorted(Path(manifest["calib"]).iterdir())[: args.calib_images]:
        shutil.copyfile(path, calib / path.name)
    atomic_write_json(dest / "forms.json", {"model": args.model, "rows": [*forms]})
    return 0


def run(args: argparse.Namespace) -> int:
    from benchmarks.gpu_int8 import build_overrides
    from yoloq.backends.base import closing_runner
    from yoloq.backends.tensorrt.profile import profile_engine, profile_metrics, summarize
    from yoloq.backends.tensorrt.profile_report import write_profile
    from yoloq.backends.tensorrt.runner import TensorRTRunner
    from yoloq.backends.tensorrt.timing import time_device
    from yoloq.build import build_variant_with_deadline
    from yoloq.config import VariantConfig, load_params
    from yoloq.speed import time_interleaved

    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    timing_cache = args.cache / "timing.cache"
    float_params = load_params(PROJECT / "params.yaml", build_overrides(args, args.cache, []))
    uint8_params = load_params(PROJECT / "params.yaml", build_overrides(args, args.cache, ["tensorrt.input=uint8"]))
    dest: Path = args.dest
    base = dest / "base.onnx"
    fp16 = VariantConfig(name="fp16", precision="fp16", backend="tensorrt")
    implicit = VariantConfig(name="int8-implicit", precision="int8", quantization="implicit", backend="tensorrt")
    qdq = VariantConfig(name="qdq", precision="int8", quantization="qdq", backend="tensorrt")
    plans: dict[str, tuple[VariantConfig, Any, Path | None]] = {
        "fp16": (fp16, float_params, None),
        "fp16-uint8": (fp16.model_copy(update={"name": "fp16-uint8"}), uint8_params, None),
        "int8-implicit": (implicit, float_params, None),
        "qdq-float": (qdq.model_copy(update={"name": "qdq-float"}), float_params, dest / "qdq-float.onnx"),
        "qdq-uint8": (qdq.model_copy(update={"name": "qdq-uint8"}), uint8_params, dest / "qdq-float.onnx"),
        "qdq-uint8-s2d": (qdq.model_copy(update={"name": "qdq-uint8-s2d"}), float_params, dest / "qdq-uint8-s2d.onnx"),
        "qdq-planar": (qdq.model_copy(update={"name": "qdq-planar"}), float_params, dest / "qdq-planar.onnx"),
        "qdq-fp16-stem": (qdq.model_copy(update={"name": "qdq-fp16-stem"}), float_params, dest / "qdq-fp16-stem.onnx"),
    }
    rows = [row for row in args.rows.split(",") if row]
    built = {}
    results: dict[str, Any] = {"rows": {}, "settings": {"level": args.level, "tactics": args.tactics}}
    for row in rows:
        variant, params, model = plans[row]
        left = args.budget_s - (time.perf_counter() - started) - 90
        if left < 40:
            results["rows"][row] = {"error": "skipped: budget"}
            continue
        params = params.model_copy(deep=True)
        params.build.timeout_s = left
        try:
            built[row] = build_variant_with_deadline(
                variant, params, base, model, args.cache / "engines", lambda m: print(m, flush=True)
            )
        except Exception as exc:
            results["rows"][row] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
            print(f"{row}: build FAILED: {exc}", flush=True)
        if timing_cache.is_file():
            shutil.copyfile(timing_cache, out / "timing.cache")
    if not built:
        atomic_write_json(out / "results.json", results)
        for row, record in results["rows"].items():
            print(f"{row}: {record['error']}", file=sys.stderr)
        print("no engine was built (above): nothing to time; this runs where TensorRT and a GPU are", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    with ExitStack() as stack:
        runners = {row: stack.enter_context(closing_runner(TensorRTRunner(b.path))) for row, b in built.items()}
        batches = {}
        for row, runner in runners.items():
            shape = (32, *runner.sample_shape)
            uint8 = runner.input_layout == "nhwc-uint8"
            batches[row] = rng.integers(0, 256, shape, dtype=np.uint8) if uint8 else rng.random(shape, np.float32)

        def measure(row: str) -> Any:
            return lambda: time_device(runners[row], batches[row], args.iterations, 5).throughput_ms_per_batch

        speeds = time_interleaved({row: measure(row) for row in runners}, 32, args.rounds)
    for row, b in built.items():
        record: dict[str, Any] = {
            "images_per_s_b32": speeds[row].images_per_s,
            "ms_b32": speeds[row].median_ms,
            "x_fp16": speeds[row].speedup_over(speeds["fp16"]) if "fp16" in speeds else None,
            "x_implicit": speeds[row].speedup_over(speeds["int8-implicit"]) if "int8-implicit" in speeds else None,
            "build_s": b.build_seconds,
        }
        try:
            profile = profile_engine(b.path, 32, args.profile_iterations, 5)
            write_profile(profile, out / "profiles" / row)
            record["profile"] = profile_metrics(summarize(profile))
        except Exception as exc:
            record["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        results["rows"][row] = record
    atomic_write_json(out / "results.json", results)
    print("| row | images/s b32 | x FP16 | x implicit INT8 |\n|---|---:|---:|---:|")
    for row, record in results["rows"].items():
        if "error" in record:
            print(f"| {row} | {record['error']} | | |")
            continue
        x_fp16 = f"{record['x_fp16']:.2f}" if record["x_fp16"] else "–"
        x_imp = f"{record['x_implicit']:.2f}" if record["x_implicit"] else "–"
        print(f"| {row} | {record['images_per_s_b32']:,.0f} | {x_fp16} | {x_imp} |")
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("prepare")
    p.add_argument("--inputs", type=Path, default=PROJECT / ".trt-inputs", help="gpu_int8.py prepare --s2d's dest")
    p.add_argument("--model", default="yolov5n-s2d")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--calib-images", type=int, default=32, help="copied beside the models for implicit INT8")
    r = steps.add_parser("run")
    r.add_argument("--dest", type=Path, required=True, help="prepare's --dest")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--cache", type=Path, default=Path("/tmp/yoloq-stem-input"))
    r.add_argument("--timing-cache", type=Path)
    r.add_argument("--level", type=int, default=2)
    r.add_argument("--tactics", default="")
    r.add_argument("--calib", type=Path, required=True)
    r.add_argument("--calib-images", type=int, default=32)
    r.add_argument("--rows", default="fp16,int8-implicit,qdq-float,qdq-uint8,qdq-uint8-s2d,qdq-planar,fp16-uint8")
    r.add_argument("--rounds", type=int, default=10)
    r.add_argument("--iterations", type=int, default=50)
    r.add_argument("--profile-iterations", type=int, default=20)
    r.add_argument("--budget-s", type=float, default=560)
    args = parser.parse_args()
    return prepare(args) if args.step == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
