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
from yoloq.checkpoint_sniff import check_onnx  # noqa: E402
from yoloq.config import LabelledSet, ValidationConfig  # noqa: E402
from yoloq.errors import YoloqError  # noqa: E402
from yoloq.export import read_facts  # noqa: E402
from yoloq.metrics import coco_map  # noqa: E402
from yoloq.preprocess import list_images  # noqa: E402
from yoloq.validate import load_validation_set  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported ONNX (class names)")
    parser.add_argument("--set", type=Path, action="append", required=True, help="folder with images/, labels/")
    parser.add_argument("--reference", default="fp16", help="the row the others are compared with")
    parser.add_argument("detections", type=Path, nargs="+")
    args = parser.parse_args()
    missing = [str(p) for p in (args.model, *args.detections) if not p.is_file()]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)}")
    if not any(is_reference(p.stem, args.reference) for p in args.detections):
        raise SystemExit(f"--reference {args.reference}: none of the files is named *-{args.reference}.npz; give one")
    try:
        return score(args)
    except YoloqError as exc:  # a model, folder or label file that is not what --model / --set need
        raise SystemExit(str(exc)) from None


def is_reference(stem: str, reference: str) -> bool:
    """Whether a detections file (its stem, MODEL-ROW) holds the --reference row."""
    return stem == reference or stem.endswith(f"-{reference}")


def score(args: argparse.Namespace) -> int:
    check_onnx(args.model)
    names = read_facts(args.model).names
    main_set, *more = args.set
    config = ValidationConfig(
        images=main_set / "images",
        labels=main_set / "labels",
        extra_sets=[LabelledSet(images=f / "images", labels=f / "labels") for f in more],
    )
    truths = load_validation_set(config, len(names)).truths  # as `gpu_int8.py run --val A --val B` ordered them
    first = len(list_images(main_set / "images"))
    parts = {"all": slice(None), "first": slice(0, first), "rest": slice(first, None)}
    scores: dict[str, dict[str, float]] = {}
    for path in args.detections:
        found = load_detections(path)
        if len(found) != len(truths):
            raise SystemExit(f"{path}: detections of {len(found)} images, the sets hold {len(truths)}")
        scores[path.stem] = {k: coco_map(truths[s], found[s], names).map50_95 * 100 for k, s in parts.items()}
    reference = next(v for k, v in scores.items() if is_reference(k, args.reference))
    n = {k: len(truths[s]) for k, s in parts.items()}
    print(f"| detections | all {n['all']} | Δ | first {n['first']} | Δ | rest {n['rest']} | Δ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row, v in scores.items():
        d = {k: f"{v[k] - reference[k]:+.2f}" for k in parts}
        print(
            f"| {row} | {v['all']:.2f} | {d['all']} | {v['first']:.2f} | {d['first']} | {v['rest']:.2f} | {d['rest']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
