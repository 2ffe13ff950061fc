"""Which selector predicts held-apart mAP: labelled mAP on a selection set, or label-free agreement with FP32?

    python benchmarks/selection.py --model data/models/yolov5n.pt --select ../shared/data/coco/select \\
        --report ../shared/data/coco/val --report ../shared/data/coco/val-extra --out runs/selection-v5

Every INT8 candidate the search can produce (each algorithm x calibration size with the default float convs,
then the k most sensitive convs in float, for k in --float-steps) is run once on three image sets:
the selection set (labelled), the calibration images, and the report sets (labelled, never used to choose). For
each selector and selection-set size (random subsets, --draws of them), the candidate with the best selector
score is "picked"; what matters is that pick's mAP50-95 on the report images, against FP32 on the same images.

Selectors:
- `map`: mAP50-95 against the selection set's labels (the paired delta vs FP32 on the same images);
- `agree`: label-free, mAP50-95 of the candidate's detections against FP32's confident ones (yoloq.agreement,
  score >= 0.25) on the selection images; `agree@S` for each S of --min-scores: the same with FP32's detections of
  score >= S as the pseudo labels;
- `agree-calib`: the same on the calibration images (needs no extra images at all; they are never reported on).

Printed: per candidate, every score; per selector and size, the Spearman rank correlation with the report delta
and the mean report delta of its picks (and the regret: best candidate's report delta minus the pick's).
Detections are cached under --out, so a re-run only recomputes the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
os.environ.setdefault("YOLO_OFFLINE", "1")

from yoloq.agreement import agreement  # noqa: E402
from yoloq.backends.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from yoloq.cache import load_detections, save_detections  # noqa: E402
from yoloq.calibrate import calibration_statistics, write_qdq_model  # noqa: E402
from yoloq.config import (  # noqa: E402
    CalibrationConfig,
    ExportConfig,
    ModelConfig,
    SearchConfig,
    SimplifyConfig,
    ValidationConfig,
)
from yoloq.export import export_model  # noqa: E402
from yoloq.heads import Detections  # noqa: E402
from yoloq.labels import ImageTruth, load_ground_truth  # noqa: E402
from yoloq.metrics import coco_map  # noqa: E402
from yoloq.preprocess import list_images  # noqa: E402
from yoloq.quant.graph import analyze_head, default_float_convs, prepare_model  # noqa: E402
from yoloq.sensitivity import analyze_sensitivity  # noqa: E402
from yoloq.simplify import simplify_model  # noqa: E402
from yoloq.validate import detect  # noqa: E402


@dataclass(frozen=True)
class Candidate:
    name: str
    path: Path


def score_list(text: str) -> list[float]:
    """--min-scores: comma-separated scores in (0, 1)."""
    try:
        scores = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 0.1,0.05") from None
    if not all(0.0 < score < 1.0 for score in scores):
        raise argparse.ArgumentTypeError(f"{text!r}: every score must lie between 0 and 1")
    return scores


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", type=Path, default=PROJECT / "data/coco/calib/images")
    parser.add_argument("--select", type=Path, required=True, help="folder with images/ and labels/")
    parser.add_argument("--report", type=Path, action="append", required=True, help="folder with images/, labels/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--algorithms", default="minmax,percentile,mse,entropy")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--float-steps", default="0,2,4,8")
    parser.add_argument("--ranking", default="mse", help="algorithm whose sensitivity ranking the precision steps use")
    parser.add_argument(
        "--sensitivity-images",
        type=int,
        default=SearchConfig().sensitivity_images,
        help="calibration images of the sensitivity ranking (default: search.sensitivity_images's default)",
    )
    parser.add_argument("--subsets", default="64,128,256,512")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument(
        "--min-scores",
        type=score_list,
        default=[],
        help="also agreement with FP32's detections of at least these scores, e.g. 0.1,0.05",
    )
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    exported = export_model(ModelConfig(path=args.model), ExportConfig(), out / "export")
    facts = exported.facts
    calib_images = list_images(args.calib)
    simplified = simplify_model(
        exported.onnx_path, calib_images[:4], exported.input_name, facts.imgsz, SimplifyConfig(), out / "simplify"
    )
    fp32 = simplified.onnx_path
    config = ValidationConfig(images=args.select / "images", labels=args.select / "labels")
    names = facts.names
    select_truths, _ = load_ground_truth(list_images(args.select / "images"), args.select / "labels", len(names))
    report_truths: list[ImageTruth] = []
    for folder in args.report:
        more, _ = load_ground_truth(list_images(folder / "images"), folder / "labels", len(names))
        report_truths += more
    calib_truths, _ = load_ground_truth(calib_images, args.calib.parent / "labels", len(names))
    sets = {"select": select_truths, "report": report_truths, "calib": calib_truths}
    print(f"sets: select {len(select_truths)}, report {len(report_truths)}, calib {len(calib_truths)} images")

    calibration = CalibrationConfig(images=args.calib, num_images=max(int(s) for s in args.sizes.split(",")))
    held = [t.path for t in (*select_truths, *report_truths)]
    candidates = [Candidate("fp32", fp32)]
    stats = {}
    for size in (int(s) for s in args.sizes.split(",")):
        stats[size] = calibration_statistics(fp32, exported.input_name, facts.imgsz, calibration, held, out, size)
        for algorithm in args.algorithms.split(","):
            model = write_qdq_model(fp32, stats[size], algorithm, args.percentile, None, out, facts.imgsz)
            candidates.append(Candidate(f"{algorithm}-{size}.default", model.path))
    size = max(stats)
    ranking = analyze_sensitivity(
        fp32,
        stats[size],
        args.ranking,
        args.percentile,
        args.sensitivity_images,
        facts.imgsz,
        facts.head_format,
        out,
        print,
    ).layers
    order = [layer.node for layer in ranking]  # as the search does: the stem is ranked like any other conv
    for k in (int(s) for s in args.float_steps.split(",") if s):
        model = write_qdq_model(fp32, stats[size], args.ranking, args.percentile, order[:k], out, facts.imgsz)
        candidates.append(Candidate(f"{args.ranking}-{size}.top{k}", model.path))
    default_floats = default_float_convs(analyze_head(prepare_model(fp32)))
    print(f"{len(candidates) - 1} candidates; default float convs: {default_floats}")
    names = {c.name: c.path.stem for c in candidates}  # benchmarks/report_noise.py reads the detections by these
    (out / "candidates.json").write_text(json.dumps(names, indent=2))

    detections: dict[tuple[str, str], list[Detections]] = {}
    for candidate in candidates:
        runner = None
        for set_name, truths in sets.items():
            cache = out / f"det-{candidate.path.stem}-{set_name}.npz"
            if not cache.is_file():
                runner = runner or OnnxRuntimeRunner(candidate.path)
                t0 = time.perf_counter()
                found = detect(runner, [t.path for t in truths], facts.head_format, facts.imgsz, config)
                save_detections(cache, found)
                print(f"  {candidate.name} on {set_name}: {time.perf_counter() - t0:.0f} s", flush=True)
            detections[(candidate.name, set_name)] = load_detections(cache)

    def labelled(name: str, set_name: str, index: np.ndarray | None = None) -> float:
        truths, found = sets[set_name], detections[(name, set_name)]
        if index is not None:
            truths, found = [truths[i] for i in index], [found[i] for i in index]
        return coco_map(truths, found, names).map50_95

    def agree(name: str, set_name: str, index: np.ndarray | None = None, min_score: float = 0.25) -> float:
        truths, found, ref = sets[set_name], detections[(name, set_name)], detections[("fp32", set_name)]
        if index is not None:
            truths, found, ref = [truths[i] for i in index], [found[i] for i in index], [ref[i] for i in index]
        return agreement(truths, ref, found, names, min_score).map50_95

    quantized = [c.name for c in candidates if c.name != "fp32"]
    fp32_report = labelled("fp32", "report")
    report_delta = {name: (labelled(name, "report") - fp32_report) * 100 for name in quantized}
    fp32_select = labelled("fp32", "select")
    rows = []
    for name in quantized:
        rows.append(
            {
                "candidate": name,
                "report_delta": report_delta[name],
                "select_delta": (labelled(name, "select") - fp32_select) * 100,
                "agree_select": agree(name, "select") * 100,
                "agree_calib": agree(name, "calib") * 100,
            }
        )
    print(f"\nFP32: report {fp32_report:.4f} ({len(report_truths)} images), select {fp32_select:.4f}\n")
    print("| candidate | Δ report (points) | Δ select (labels) | agreement select | agreement calib |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['candidate']} | {r['report_delta']:+.2f} | {r['select_delta']:+.2f} | {r['agree_select']:.2f} | "
            f"{r['agree_calib']:.2f} |"
        )

    truth = [report_delta[name] for name in quantized]
    best = max(truth)
    rng = np.random.default_rng(0)
    summary = []
    total = len(select_truths)
    sizes = [s for s in (int(x) for x in args.subsets.split(",")) if s <= total]
    selectors = {
        "map": lambda name, index: labelled(name, "select", index),
        "agree": lambda name, index: agree(name, "select", index),
    }
    for min_score in args.min_scores:
        selectors[f"agree@{min_score:g}"] = lambda name, index, m=min_score: agree(name, "select", index, m)
    for selector, score in selectors.items():
        for n in sizes:
            draws = 1 if n == total else args.draws
            rhos, picks = [], []
            for _ in range(draws):
                index = None if n == total else np.sort(rng.choice(total, n, replace=False))
                scores = [score(name, index) for name in quantized]
                rhos.append(spearman(scores, truth))
                picks.append(report_delta[quantized[int(np.argmax(scores))]])
            summary.append((selector, n, float(np.mean(rhos)), float(np.mean(picks)), best - float(np.mean(picks))))
    calib_scores = [agree(name, "calib") for name in quantized]
    calib_pick = report_delta[quantized[int(np.argmax(calib_scores))]]
    summary.append(("agree-calib", len(calib_truths), spearman(calib_scores, truth), calib_pick, best - calib_pick))
    print(f"\nbest possible pick: {best:+.2f} points on the report set\n")
    print("| selector | images | Spearman vs report Δ | pick's report Δ (mean) | regret (points) |")
    print("|---|---:|---:|---:|---:|")
    for selector, n, rho, pick, regret in summary:
        print(f"| {selector} | {n} | {rho:+.2f} | {pick:+.2f} | {regret:.2f} |")
    (out / "selection.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print(f"\n{time.perf_counter() - started:.0f} s; details in {out / 'selection.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
