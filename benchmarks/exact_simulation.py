"""Does a Q/DQ model give the same numbers on every CPU? Output hashes of the model as written and of yoloq's
integer-exact simulation (yoloq.quant.simulate), with ONNX Runtime's graph optimizations on (NCHWc kernels) and
off (im2col + SGEMM): two kernel families that sum in different orders, as different CPUs do.

    python benchmarks/exact_simulation.py prepare --model Q.int8-qdq.onnx [--model ...] --images DIR --out D
    python benchmarks/exact_simulation.py run D        # needs only numpy and onnxruntime: run it on each machine

`prepare` writes each model as written and rewritten, plus 4 letterboxed images, to D; `run` prints one line per
model and optimization level: the sha256 of the output and its sum. Equal hashes on two machines: equal numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
# `run` repeats yoloq.backends.onnxruntime.qdq_session's options and flows.tracking's CPU facts on purpose: it runs
# on machines that have numpy and onnxruntime but not yoloq (the models are rewritten by `prepare`).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


class BadInput(Exception):
    """A --model or --images that cannot be used: one line, exit 2."""


def prepare(models: list[Path], images: Path, out: Path) -> None:
    sys.path.insert(0, str(PROJECT))
    import onnx

    from yoloq.preprocess import letterbox_rgb, list_images, read_image
    from yoloq.quant.simulate import integer_exact

    paths = list_images(images)[:4] if images.is_dir() else []
    if not paths:
        raise BadInput(f"--images {images}: no folder of images there; give one (e.g. data/coco/select/images)")
    loaded = []
    for model in models:
        try:
            loaded.append(onnx.load(str(model)))
        except Exception as exc:  # onnx raises DecodeError and others for a file that is not a model
            raise BadInput(f"--model {model}: not a readable ONNX model ({exc})") from None
    out.mkdir(parents=True, exist_ok=True)
    for model, proto in zip(models, loaded, strict=True):
        shutil.copyfile(model, out / f"{model.stem}.as-written.onnx")
        onnx.save(integer_exact(proto).model, str(out / f"{model.stem}.exact.onnx"))
    frames = [letterbox_rgb(read_image(path), 640)[0] for path in paths]
    np.save(out / "frames.npy", np.stack(frames))
    print(f"wrote {len(models)} models x 2 and {len(frames)} frames to {out}")


def run(folder: Path) -> None:
    import onnxruntime as ort

    frames = np.load(folder / "frames.npy")
    x = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0  # as yoloq.preprocess does
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    print(f"cpu: {cpu} ({' '.join(f for f in ISA_FLAGS if f in flags)}); onnxruntime {ort.__version__}")
    print("| model | graph optimizations | output sha256 | output sum |")
    print("|---|---|---|---:|")
    for path in sorted(folder.glob("*.onnx")):
        for level in ("ENABLE_ALL", "DISABLE_ALL"):
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_" + level)
            options.log_severity_level = 3
            options.add_session_config_entry("session.disable_quant_qdq", "1")
            session = ort.InferenceSession(
                str(path), options, ["CPUExecutionProvider"], disabled_optimizers=["ConvMulFusion"]
            )
            y = session.run(None, {session.get_inputs()[0].name: x})[0]
            digest = hashlib.sha256(y.tobytes()).hexdigest()[:16]
            print(f"| {path.name} | {level.lower()} | {digest} | {float(y.astype(np.float64).sum()):.6f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model", action="append", type=Path, required=True)
    p.add_argument("--images", type=Path, default=PROJECT / "data/coco/select/images")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        missing = [str(m) for m in args.model if not m.is_file()]
        if missing:
            print(f"--model: no such file: {', '.join(missing)}", file=sys.stderr)
            return 2
        try:
            prepare(args.model, args.images, args.out)
        except BadInput as exc:
            print(exc, file=sys.stderr)
            return 2
    else:
        if not (args.folder / "frames.npy").is_file():
            print(f"{args.folder}: no frames.npy: run `prepare` first", file=sys.stderr)
            return 2
        run(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
