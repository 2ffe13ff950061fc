"""How far is a printed INT8-vs-FP32 delta from what the same model scores on images nobody looked at?

    python benchmarks/selection.py --model data/models/yolov5n.pt --select ../shared/data/coco/select \\
        --report ../shared/data/coco/val --report ../shared/data/coco/val-extra --out runs/selection-v5
    python benchmarks/report_noise.py --out runs/selection-v5 --select ../shared/data/coco/select \\
        --report ../shared/data/coco/val --report ../shared/data/coco/val-extra

Reads the detections `benchmarks/selection.py` cached under --out (its `candidates.json`), the same --select and
--report folders in the same order. The pool is every labelled image the shipped search never selects on: the
selection folder's images after the first --selected (the shipped data/coco/select) and every report folder.

Printed:
1. each candidate's delta vs FP32 on each part, and on the shipped report set (the first report folder + the
   next --shipped selection images: data/coco/report) against the rest of the pool (held apart);
2. for --candidate, random report sets of each --sizes drawn from the pool: how far their delta lies from the
   delta on the rest of the pool (median, 90th percentile, share within 0.3 points), and how often the rest's
   delta lies inside the report set's bootstrap interval (`yoloq.interval`, the interval `yoloq run` prints).
Scores are yoloq.interval's re-accumulation of pycocotools' matching (0/1 image weights: a subset's mAP).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from yoloq.cache import load_detections  # noqa: E402
from yoloq.interval import Matches, delta_interval, map50_95  # noqa: E402
from yoloq.labels import ImageTruth, load_ground_truth  # noqa: E402
from yoloq.metrics import coco_map  # noqa: E402
from yoloq.preprocess import list_images  # noqa: E402

NAMES = [str(i) for i in range(80)]


def truths_of(folder: Path) -> list[ImageTruth]:
    return load_ground_truth(list_images(folder / "images"), folder / "labels", len(NAMES))[0]


def subset(matches: Matches, index: np.ndarray) -> Matches:
    """The matching restricted to the images `index` (renumbered 0..len-1), for a paired bootstrap on them."""
    position = np.full(matches.num_images, -1)
    position[index] = np.arange(len(index))
    keep = position[matches.image] >= 0
    return Matches(
        position[matches.image][keep],
        matches.category[keep],
        matches.score[keep],
        matches.true_positive[keep],
        matches.false_positive[keep],
        matches.ground_truth[index],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="benchmarks/selection.py's --out")
    parser.add_argument("--select", type=Path, required=True)
    parser.add_argument("--report", type=Path, action="append", required=True)
    parser.add_argument("--selected", type=int, default=128, help="first N selection images: the shipped ones")
    parser.add_argument("--shipped", type=int, default=256, help="next N selection images in data/coco/report")
    parser.add_argument("--candidate", default="mse-64.default")
    parser.add_argument("--sizes", default="64,128,192,256,320,448")
    parser.add_argument("--splits", type=int, default=100)
    parser.add_argument("--coverage-sizes", default="64,320", help="sizes whose bootstrap coverage is measured")
    parser.add_argument("--coverage-splits", type=int, default=20)
    parser.add_argument("--draws", type=int, default=100, help="bootstrap resamples per coverage split")
    args = parser.parse_args()
    names_file = args.out / "candidates.json"
    if not names_file.is_file():
        print(
            f"report_noise: {names_file} not found: run benchmarks/selection.py --out {args.out} first", file=sys.stderr
        )
        return 2
    candidates: dict[str, str] = json.loads(names_file.read_text())
    select = truths_of(args.select)
    report_parts = [truths_of(folder) for folder in args.report]
    truths = select + [t for part in report_parts for t in part]
    matches: dict[str, Matches] = {}
    for name, stem in candidates.items():
        found = load_detections(args.out / f"det-{stem}-select.npz")
        found += load_detections(args.out / f"det-{stem}-report.npz")
        matches[name] = coco_map(truths, found, NAMES, keep_matches=True).matches
    n = len(truths)
    parts = {f"select[:{args.selected}] (selection)": np.arange(args.selected)}
    parts[f"select[{args.selected}:]"] = np.arange(args.selected, len(select))
    start = len(select)
    for folder, part in zip(args.report, report_parts, strict=True):
        parts[folder.name] = np.arange(start, start + len(part))
        start += len(part)
    pool = np.arange(args.selected, n)
    shipped = np.concatenate([parts[args.report[0].name], np.arange(args.selected, args.selected + args.shipped)])
    held = np.setdiff1d(pool, shipped)
    parts[f"shipped report ({len(shipped)})"] = shipped
    parts[f"held apart ({len(held)})"] = held
    parts[f"pool ({len(pool)})"] = pool

    def delta(name: str, index: np.ndarray) -> float:
        weights = np.zeros(n)
        weights[index] = 1
        return (map50_95(matches[name], weights) - map50_95(matches["fp32"], weights)) * 100

    print("Δ vs FP32 (points), images per part: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))
    print("| candidate | " + " | ".join(parts) + " |")
    print("|---|" + "---:|" * len(parts))
    for name in sorted(c for c in candidates if c != "fp32"):
        print(f"| {name} | " + " | ".join(f"{delta(name, index):+.2f}" for index in parts.values()) + " |", flush=True)

    rng = np.random.default_rng(0)
    print(f"\n{args.candidate}: random report sets from the pool of {len(pool)}, against the rest of the pool")
    print("| report images | median gap | 90th percentile | within 0.3 | rest inside the 90 % interval |")
    print("|---:|---:|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        gaps, inside = [], []
        for split in range(args.splits):
            order = rng.permutation(pool)
            report, rest = np.sort(order[:size]), order[size:]
            rest_delta = delta(args.candidate, rest)
            gaps.append(abs(delta(args.candidate, report) - rest_delta))
            if split < args.coverage_splits and str(size) in args.coverage_sizes.split(","):
                a, b = subset(matches["fp32"], report), subset(matches[args.candidate], report)
                interval = delta_interval(a, b, args.draws, 0.9, seed=split)
                inside.append(interval.low * 100 <= rest_delta <= interval.high * 100)
        gap = np.array(gaps)
        covered = f"{np.mean(inside):.0%} ({len(inside)} splits)" if inside else "–"
        print(
            f"| {size} | {np.median(gap):.2f} | {np.quantile(gap, 0.9):.2f} | {np.mean(gap <= 0.3):.0%} | {covered} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
