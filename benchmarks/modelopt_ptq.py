"""Peer baseline: NVIDIA ModelOpt's ONNX post-training INT8 quantization of a yoloq FP32 ONNX, on the CPU.

    /work/modelopt-venv/bin/python benchmarks/modelopt_ptq.py --onnx FP32.onnx --calib CALIB.npy --out OUT.onnx \\
        [--method max|entropy] [--high-precision fp32|fp16] [--calib-batch 1]

This is a comparison point for the benchmark, not a yoloq dependency: it runs with a throwaway virtualenv's
python, imports neither yoloq nor anything of the project, and nothing in yoloq imports it. Make the venv once
(about 6.5 GB: nvidia-modelopt pulls torch, onnxruntime-gpu, cupy and pins its own onnx, which is why it stays out
of the project's environment):

    python3.11 -m venv /work/modelopt-venv
    /work/modelopt-venv/bin/python -m pip install --upgrade pip
    /work/modelopt-venv/bin/pip install 'nvidia-modelopt[onnx]'      # measured: 0.47.0

CALIB.npy is an NCHW float32 array of preprocessed calibration images (letterboxed to the model's size, RGB, /255),
made with yoloq's own loader in the project's venv, so both tools calibrate on the same pixels, e.g.

    .venv/bin/python -c "import numpy as np; from pathlib import Path; \\
        from yoloq.calibration_data import CalibrationDataLoader; from yoloq.preprocess import list_images; \\
        ims = list_images(Path('data/coco/calib/images'))[:128]; \\
        np.save('calib128.npy', np.concatenate([b['images'] for b in CalibrationDataLoader(ims, 'images', 640, 8)]))"

What is ModelOpt's own choice and what is set here:
  * ModelOpt's defaults: quantize_mode "int8", its pattern-based Q/DQ placement, its default op types, passes and
    opset upgrade, no node or op-type exclusions (we want what ModelOpt does on its own).
  * calibration_method: "max" or "entropy" (ModelOpt's default is entropy; --method picks).
  * calibration_eps=["cpu"]: calibrate with ONNX Runtime's CPU provider (ModelOpt's default tries cuda and trt).
  * calibration_shapes: one calibration step is --calib-batch images of the array's C x H x W (ModelOpt would
    otherwise fill the model's unknown dims with 1, which breaks a model whose height/width are dynamic).
  * high_precision_dtype: "fp32" by default here (--high-precision fp16 gives ModelOpt's own default, which also
    casts the un-quantized float part of the graph to FP16). FP32 keeps the comparison with yoloq's Q/DQ models,
    whose float part stays FP32, about Q/DQ placement and calibration alone; TensorRT picks FP16 for the float
    layers itself when its fp16 flag is on.
Prints the quantization time, the Q/DQ node counts and the op types fed by DequantizeLinear; writes OUT.onnx.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import onnx


def qdq_summary(path: Path) -> dict[str, object]:
    """Q/DQ node counts and, per op type, how many nodes read a DequantizeLinear output."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = model.graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    dq_outputs = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    consumers = collections.Counter(n.op_type for n in nodes if any(i in dq_outputs for i in n.input))
    image_tensors = {i.name for i in model.graph.input}  # the input, and any Cast of it (fp16 mode adds one)
    image_tensors |= {n.output[0] for n in nodes if n.op_type == "Cast" and n.input[0] in image_tensors}
    input_quantized = any(n.op_type == "QuantizeLinear" and n.input[0] in image_tensors for n in nodes)
    return {
        "QuantizeLinear": ops["QuantizeLinear"],
        "DequantizeLinear": ops["DequantizeLinear"],
        "nodes": len(nodes),
        "dq_consumers": dict(consumers.most_common()),
        "input_quantized": input_quantized,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True, help="FP32 ONNX (yoloq's exported, simplified model)")
    parser.add_argument("--calib", type=Path, required=True, help="NCHW float32 .npy of preprocessed images")
    parser.add_argument("--out", type=Path, required=True, help="where to write the Q/DQ ONNX")
    parser.add_argument("--method", choices=["max", "entropy"], default="max", help="ModelOpt calibration_method")
    parser.add_argument(
        "--high-precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="dtype of the un-quantized part (ModelOpt's own default is fp16; see the module docstring)",
    )
    parser.add_argument("--calib-batch", type=int, default=1, help="images per calibration step")
    args = parser.parse_args()

    try:
        from modelopt import __version__ as modelopt_version
        from modelopt.onnx.quantization import quantize
    except ImportError:
        print("nvidia-modelopt is not installed: run this with the throwaway venv's python (see --help)")
        return 2

    calib = np.load(args.calib)
    if calib.ndim != 4 or calib.dtype != np.float32:
        print(f"{args.calib}: expected an NCHW float32 array, got {calib.dtype} {calib.shape}")
        return 2
    if calib.shape[0] % args.calib_batch:
        print(f"{args.calib}: {calib.shape[0]} images is not a multiple of --calib-batch {args.calib_batch}")
        return 2
    model = onnx.load(str(args.onnx), load_external_data=False)
    if len(model.graph.input) != 1:
        print(f"{args.onnx}: expected one input, got {len(model.graph.input)}")
        return 2
    input_name = model.graph.input[0].name
    _, c, h, w = calib.shape
    args.out.parent.mkdir(parents=True, exist_ok=True)

    print(f"modelopt {modelopt_version}: {args.onnx} -> {args.out}")
    print(
        f"int8, calibration {args.method} on {calib.shape[0]} images {c}x{h}x{w} (cpu), "
        f"float part {args.high_precision}"
    )
    start = time.perf_counter()
    quantize(
        onnx_path=str(args.onnx),
        quantize_mode="int8",
        calibration_data={input_name: calib},
        calibration_method=args.method,
        calibration_shapes=f"{input_name}:{args.calib_batch}x{c}x{h}x{w}",
        calibration_eps=["cpu"],
        high_precision_dtype=args.high_precision,
        output_path=str(args.out),
        log_level="WARNING",
    )
    seconds = time.perf_counter() - start
    if not args.out.is_file():
        print(f"ModelOpt wrote no {args.out}")
        return 1

    summary = qdq_summary(args.out)
    print(f"quantized in {seconds:.1f} s")
    print(
        f"Q/DQ nodes: {summary['QuantizeLinear']} QuantizeLinear, {summary['DequantizeLinear']} DequantizeLinear "
        f"({summary['nodes']} nodes in all); image input quantized: {summary['input_quantized']}"
    )
    print(
        "ops reading a DequantizeLinear output: " + ", ".join(f"{op} {n}" for op, n in summary["dq_consumers"].items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
