"""Cold vs warm `yoloq run`: how much of a re-run the content-hash caches save.

    python benchmarks/cold_warm.py [-p params.yaml] [--set KEY=VALUE ...] [--warm-set validation.num_images=32]

Runs `yoloq run` twice in a fresh temporary output_dir and MLflow store: a cold run (nothing cached) and a warm
run that changes only validation settings (default: validation.num_images=32). Export, simplify, calibration and
engine builds must be reused in the warm run; the script prints both wall times, which stages said "reused",
and fails when a stage that should have been reused was redone.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
STAGES = {  # stage: (log pattern of a reuse, log pattern of fresh work)
    "export": (r"export: reused", r"export: wrote"),
    "simplify": (r"simplify: reused", r"simplify: simplified|simplify: kept"),
    "calibrate": (r"calibrate: reused", r"calibrate: wrote"),
}


def run_once(params: Path, overrides: list[str], env: dict[str, str]) -> tuple[float, str, int]:
    command = [sys.executable, "-m", "flows.cli", "run", "-p", str(params)]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout + done.stderr, done.returncode


LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \| \w+ +\| Task run '([a-z0-9]+)-", re.MULTILINE)


def stage_seconds(log: str) -> dict[str, float]:
    """Seconds each stage took, from the Prefect task log timestamps: a stage ends at its last line and starts
    where the previous stage ended (export: at its first line). Builds and validations count as one stage."""
    last: dict[str, float] = {}
    first_line: float | None = None
    for hours, minutes, seconds, stage in LOG_LINE.findall(log):
        stamp = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        first_line = stamp if first_line is None else first_line
        last["build+validate" if stage in ("build", "validate") else stage] = stamp
    spans, previous = {}, first_line
    for stage, end in sorted(last.items(), key=lambda item: item[1]):
        spans[stage] = end - (previous if previous is not None else end)
        previous = end
    return spans


def stage_states(log: str) -> dict[str, str]:
    states = {}
    for stage, (reused, fresh) in STAGES.items():
        states[stage] = "reused" if re.search(reused, log) else "ran" if re.search(fresh, log) else "-"
    return states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--params", type=Path, default=PROJECT / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--warm-set", action="append", default=None, metavar="SECTION.KEY=VALUE")
    parser.add_argument("--logs", type=Path, help="write each run's log to this folder (cold.log, warm.log)")
    args = parser.parse_args()
    warm_changes = args.warm_set or ["validation.num_images=32"]
    with tempfile.TemporaryDirectory(prefix="yoloq-coldwarm-") as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": str(PROJECT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        base = [f"output_dir={tmp}/runs", *args.overrides]
        rows = []
        for label, overrides in (("cold", base), ("warm", [*base, *warm_changes])):
            print(f"{label} run: yoloq run -p {args.params} " + " ".join(f"--set {o}" for o in overrides), flush=True)
            seconds, log, code = run_once(args.params, overrides, env)
            if code not in (0, 3):
                print(log[-4000:], file=sys.stderr)
                print(f"{label} run failed with exit code {code}", file=sys.stderr)
                return 1
            rows.append((label, seconds, stage_states(log), stage_seconds(log)))
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                (args.logs / f"{label}.log").write_text(log)
    timed = ("export", "simplify", "calibrate", "build+validate")
    print()
    print("| run | wall s | " + " | ".join(STAGES) + " | " + " | ".join(f"{t} s" for t in timed) + " |")
    print("|---|---:|" + "---|" * len(STAGES) + "---:|" * len(timed))
    for label, seconds, states, spans in rows:
        cells = [states[s] for s in STAGES] + [f"{spans.get(t, 0.0):.1f}" for t in timed]
        print(f"| {label} | {seconds:.1f} | " + " | ".join(cells) + " |")
    redone = [stage for stage, state in rows[1][2].items() if state == "ran"]
    if redone:
        print(f"warm run redid: {', '.join(redone)} (expected reuse)", file=sys.stderr)
        return 1
    print(f"\nwarm run ({', '.join(warm_changes)}) took {rows[1][1] / rows[0][1]:.0%} of the cold run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
