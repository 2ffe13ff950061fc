"""COCO mAP of saved detections (`benchmarks/gpu_int8.py run --detections`) on the CPU machine.

    python benchmarks/score_detections.py --model runs/.../fp32.onnx --set data/coco/val \
        --set ../shared/data/coco/val-extra --reference fp16 DETECTIONS.npz [...]

The detections must cover the images of every --set in that order (as `run --val A --val B` wrote them). Prints one
table: mAP50-95 on all images, on the first set and on the rest, and each file's difference to the --reference
file (its stem ends in -NAME) on the same images, in points. The model only names the classes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from yoloq.cache import load_detections  # noqa: E402
from yoloq.export import read_facts  # noqa: E402
from yoloq.labels import ImageTruth, load_ground_truth  # noqa: E402
from yoloq.metrics import coco_map  # noqa: E402
from yoloq.preprocess import list_images  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported ONNX (class names)")
    parser.add_argument("--set", type=Path, action="append", required=True, help="folder with images/, labels/")
    parser.add_argument("--reference", default="fp16", help="the row the others are compared with")
    parser.add_argument("detections", type=Path, nargs="+")
    args = parser.parse_args()
    names = read_facts(args.model).names
    truths: list[ImageTruth] = []
    for folder in args.set:
        more, _ = load_ground_truth(list_images(folder / "images"), folder / "labels", len(names))
        truths += more
    first = len(list_images(args.set[0] / "images"))
    parts = {"all": slice(None), "first": slice(0, first), "rest": slice(first, None)}
    scores: dict[str, dict[str, float]] = {}
    for path in args.detections:
        found = load_detections(path)
        if len(found) != len(truths):
            raise SystemExit(f"{path}: detections of {len(found)} images, the sets hold {len(truths)}")
        scores[path.stem] = {k: coco_map(truths[s], found[s], names).map50_95 * 100 for k, s in parts.items()}
    reference = next((v for k, v in scores.items() if k == args.reference or k.endswith(f"-{args.reference}")), None)
    n = {k: len(truths[s]) for k, s in parts.items()}
    print(f"| detections | all {n['all']} | Δ | first {n['first']} | Δ | rest {n['rest']} | Δ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row, v in scores.items():
        d = {k: f"{v[k] - reference[k]:+.2f}" if reference else "" for k in parts}
        print(
            f"| {row} | {v['all']:.2f} | {d['all']} | {v['first']:.2f} | {d['first']} | {v['rest']:.2f} | {d['rest']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
