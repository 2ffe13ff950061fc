"""How stable are the calibration ranges under last-bit noise? Perturb saved calibration statistics and count the
snapped ranges that move.

    python benchmarks/range_stability.py runs/cache/calibration/stats-*.npz [--noise 1e-6] [--trials 10]

Two CPUs' FP32 convolutions differ in their last bits (about 1e-6 relative), so a value lying within that of a
histogram bin edge may land in the neighbouring bin. The script moves each count one bin up or down with
probability `noise` x (bin index + 1) (the share of a bin's values that lie that close to an edge), recomputes the
MSE and percentile ranges as `yoloq.quant.ranges` picks them, snapped to the range grid, and prints how many
tensors' ranges changed per trial. minmax needs no test: its raw maximum is snapped directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]


def perturbed(hist: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """`hist` with each count moved to a neighbouring bin with probability noise x (bin index + 1)."""
    counts = hist.astype(np.int64)
    moving = rng.binomial(counts, np.minimum(noise * (np.arange(len(counts)) + 1), 1.0))
    up = rng.binomial(moving, 0.5)
    down = moving - up
    down[0] = up[-1] = 0
    out = counts - up - down
    out[1:] += up[:-1]
    out[:-1] += down[1:]
    return out


def main() -> int:
    sys.path.insert(0, str(PROJECT))
    from yoloq.quant.ranges import mse_amax, percentile_amax
    from yoloq.quant.statistics import TensorStats, snap_amax

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stats", type=Path, nargs="+", help="stats-*.npz from runs/cache/calibration/")
    parser.add_argument("--noise", type=float, default=1e-6)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--percentile", type=float, default=99.99)
    args = parser.parse_args()
    if not 0.0 <= args.noise < 1.0:
        print(f"--noise {args.noise}: a probability per bin index, in [0, 1), e.g. 1e-6", file=sys.stderr)
        return 2
    if args.trials < 1:
        print(f"--trials {args.trials}: at least 1", file=sys.stderr)
        return 2
    try:
        loaded = [(path, TensorStats.load(path)) for path in args.stats]
    except (OSError, ValueError, KeyError) as exc:  # missing, not an .npz, or not yoloq's statistics
        print(f"not yoloq calibration statistics (runs/cache/calibration/stats-*.npz): {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)

    def picks(hist: np.ndarray, amax: float) -> tuple[float, float]:
        return snap_amax(mse_amax(hist, amax)), snap_amax(percentile_amax(hist, amax, args.percentile))

    print("| statistics | images | tensors | noise | mse ranges moved per trial | percentile ranges moved per trial |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, stats in loaded:
        names = [name for name in stats.amax if name in stats.hists]
        base = {name: picks(stats.hists[name], stats.amax[name]) for name in names}
        moved = np.zeros(2)
        for _ in range(args.trials):
            for name in names:
                now = picks(perturbed(stats.hists[name], args.noise, rng), stats.amax[name])
                moved += [now[0] != base[name][0], now[1] != base[name][1]]
        per_trial = moved / args.trials
        cells = [path.name, stats.images, len(names), f"{args.noise:g}", f"{per_trial[0]:.1f}", f"{per_trial[1]:.1f}"]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
