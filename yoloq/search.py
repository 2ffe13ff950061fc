"""Automatic INT8 search: which calibration, and which convs stay in float.

    1. calibration stage: every (algorithm, calibration size) of `search`, each with the default float convs
       (Q/DQ: stem + head convs; implicit: none), is scored; the best selection score picks the calibration.
    2. sensitivity: with that calibration, every quantizable conv is ranked by how much keeping it float helps
       the all-INT8 model (yoloq.sensitivity).
    3. precision stage: candidates keep the k convs with the largest gain in float, for every k in
       `search.float_steps` up to the default's number of float convs; larger k only when none of those passes.
    The reference is the best selection score of the candidates that keep no more convs in float than the default
    (the calibration candidates and the top-k with k up to that count): the most faithful model the search found
    within the default's float budget. A candidate passes when its selection score is at most `selection.tolerance`
    below the reference (and, with an FP16 variant and a speed gate, when it is fast enough). The chosen candidate
    is the passing one with the highest selection score (ties: the fewer convs in float): without a speed gate the
    reference itself, with one the most faithful candidate that is fast enough. Until 2026-12-03 it was the passing
    one with the fewest convs in float; with 32 sensitivity images that let yolov5n ship `top2`, 0.16 agreement
    points below the default-float reference and 0.22 mAP points below it on 589 held-apart images (-0.45 vs -0.23
    against FP32; README, "INT8 search"). Judging against the best calibration alone (before 2026-12-01) let an
    all-INT8 candidate pass that scored like the default-float model but well below what the same number of float
    convs reaches when the sensitivity ranking picks them: yolov8n shipped `top0` at -0.71 points on 525 held-apart
    images where `top4` scored -0.35 (README, "INT8 search"). Candidates with more float convs than the default do
    not set the reference: their scores approach FP32's as k grows, and no model with fewer float convs would pass
    (measured: yolov8n's `top16` set it and was the only candidate to pass).
    The gate then judges the chosen model on the report set.

The candidates are judged on the selection set (yoloq.selection), never on the validation set that the run
reports and gates on: picking the best of a dozen candidates on the reported images would overfit them. Calibration
and the sensitivity ranking use calibration images only.
This module only decides; evaluating a candidate (write the Q/DQ model, build it, score it) is a callback, so
the same search runs in the Prefect flow, in benchmarks and in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from yoloq.report import VariantResult
from yoloq.sensitivity import LayerSensitivity

Stage = Literal["calibration", "precision"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    name: str
    stage: Stage
    algorithm: str
    num_images: int
    float_nodes: tuple[str, ...]  # convs kept out of INT8 (the decoding tail always is)
    why: str  # how the float convs were chosen, for the report

    @property
    def num_float(self) -> str:
        return str(len(self.float_nodes))


class CandidateFailed(Exception):
    """A candidate could not be built or scored (e.g. the engine builder failed): the search records it and goes on."""


@dataclass(frozen=True)
class CandidateResult:
    candidate: Candidate
    result: VariantResult | None  # None: it failed to build or score (reasons say why)
    reasons: list[str]  # why the search does not pass it (empty: it passes)

    @property
    def passed(self) -> bool:
        return self.result is not None and not self.reasons

    @property
    def map50_95(self) -> float:
        return self.result.map50_95 if self.result is not None else -1.0


@dataclass(frozen=True)
class SearchOutcome:
    evaluated: list[CandidateResult]
    calibration: Candidate  # the calibration stage's winner
    reference: Candidate  # the best score within the default's float budget: what a passing one must nearly match
    sensitivity: list[LayerSensitivity]
    chosen: CandidateResult
    passed: bool
    summary: str


Evaluate = Callable[[Candidate], VariantResult]
Judge = Callable[[VariantResult, VariantResult], list[str]]
Rank = Callable[[str, int], list[LayerSensitivity]]


def effective_sizes(sizes: Sequence[int], available: int) -> list[int]:
    """Calibration sizes capped at the images the folder has, without repeats (order kept)."""
    return list(dict.fromkeys(min(size, available) for size in sizes))


def calibration_candidates(
    prefix: str, algorithms: Sequence[str], sizes: Sequence[int], default_float: Sequence[str] = ()
) -> list[Candidate]:
    return [
        Candidate(
            f"{prefix}.{algorithm}-{size}.default",
            "calibration",
            algorithm,
            size,
            tuple(default_float),
            "the default float convs (stem + head convs)" if default_float else "no convs held out of INT8",
        )
        for algorithm in algorithms
        for size in sizes
    ]


def precision_candidates(
    prefix: str,
    algorithm: str,
    num_images: int,
    ranking: Sequence[LayerSensitivity],
    steps: Sequence[int],
) -> list[Candidate]:
    """One candidate per step k: the k convs of `ranking` with the largest gain in float."""
    names = [layer.node for layer in ranking]
    ks = list(dict.fromkeys(min(k, len(names)) for k in steps))
    return [
        Candidate(
            f"{prefix}.{algorithm}-{num_images}.top{k}",
            "precision",
            algorithm,
            num_images,
            tuple(names[:k]),
            f"the {k} convs with the largest sensitivity gain",
        )
        for k in ks
    ]


def pick_passing(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """The passing candidate with the highest selection score; ties: the fewer convs in float (the more INT8),
    then the order tried. Without a speed gate that is the reference itself; with one, the most faithful
    candidate that is fast enough."""
    passing = [r for r in results if r.passed]
    return max(passing, key=lambda r: (r.map50_95, -len(r.candidate.float_nodes)), default=None)


def run_search(
    prefix: str,
    algorithms: Sequence[str],
    sizes: Sequence[int],
    float_steps: Sequence[int],
    evaluate: Evaluate,
    judge: Judge,
    rank: Rank,
    progress: Progress | None = None,
    default_float: Sequence[str] = (),
) -> SearchOutcome:
    """The three stages above; `prefix` names the candidates (the variant's name). `algorithms` are calibration
    algorithms (yoloq's for Q/DQ variants, the TensorRT calibrator for implicit ones). Calibration candidates keep
    `default_float` in float, precision candidates their top-k convs.

    `judge(result, reference)` says why a candidate may not be chosen, given the reference: the best selection
    score among the candidates with at most len(default_float) convs in float (see the module docstring)."""
    say = progress or (lambda _: None)
    scored: list[tuple[Candidate, VariantResult | None]] = []
    failures: dict[str, str] = {}

    def attempt(candidate: Candidate) -> VariantResult | None:
        try:
            result = evaluate(candidate)
        except CandidateFailed as exc:
            failures[candidate.name] = f"{candidate.name}: failed: {exc}"
            say(f"search: {candidate.name}: FAILED ({exc}); going on with the next candidate")
            result = None
        else:
            say(f"search: {candidate.name}: selection score {result.map50_95:.4f}")
        scored.append((candidate, result))
        return result

    calibrations = [(c, attempt(c)) for c in calibration_candidates(prefix, algorithms, sizes, default_float)]
    ok = [(c, r) for c, r in calibrations if r is not None]
    if not ok:
        raise CandidateFailed("every calibration candidate failed: " + "; ".join(failures.values()))
    best_candidate, _ = max(ok, key=lambda item: item[1].map50_95)  # the first listed wins a tie
    say(f"search: best calibration {best_candidate.algorithm} on {best_candidate.num_images} images")
    ranking = rank(best_candidate.algorithm, best_candidate.num_images)
    budget = len(default_float)
    precision = precision_candidates(prefix, best_candidate.algorithm, best_candidate.num_images, ranking, float_steps)
    beyond = [c for c in precision if len(c.float_nodes) > budget]
    for candidate in precision:
        if len(candidate.float_nodes) <= budget:
            attempt(candidate)
    reference_candidate, reference = max(
        ((c, r) for c, r in scored if r is not None), key=lambda item: item[1].map50_95
    )  # the first listed wins a tie; every candidate scored so far keeps at most `budget` convs in float
    say(
        f"search: reference: {reference_candidate.name}, selection score {reference.map50_95:.4f} (the best with "
        f"at most {budget} convs in float)"
    )
    evaluated: list[CandidateResult] = []

    def verdict(candidate: Candidate, result: VariantResult | None) -> CandidateResult:
        outcome = CandidateResult(
            candidate, result, judge(result, reference) if result is not None else [failures[candidate.name]]
        )
        if result is not None:
            why = "; ".join(reason.split(": ", 1)[-1] for reason in outcome.reasons)  # without the repeated name
            say(f"search: {candidate.name}: {'passes' if outcome.passed else 'fails: ' + why}")
        evaluated.append(outcome)
        return outcome

    for candidate, result in scored:
        verdict(candidate, result)
    if pick_passing(evaluated) is None:  # nothing within the budget passes (too slow?): try more float convs
        for candidate in beyond:
            if verdict(candidate, attempt(candidate)).passed:
                break
    elif beyond:  # beyond the default's float budget: built only when nothing within it passes
        names = ", ".join(c.name for c in beyond)
        say(f"search: not tried: {names} (more than {budget} convs in float; one with fewer passes)")
    chosen = pick_passing(evaluated)
    if chosen is not None:
        passing = sum(r.passed for r in evaluated)
        why = "the only one that passes" if passing == 1 else f"the best selection score of the {passing} that pass"
        summary = f"{chosen.candidate.name} passes the search with {chosen.candidate.num_float} convs in float ({why})"
    else:
        chosen = max(evaluated, key=lambda r: r.map50_95)
        summary = f"no candidate passes the search; the best was {chosen.candidate.name}: " + "; ".join(chosen.reasons)
    say("search: " + summary)
    return SearchOutcome(evaluated, best_candidate, reference_candidate, ranking, chosen, chosen.passed, summary)


def candidates_table(outcome: SearchOutcome) -> str:
    """Every evaluated candidate, in the order tried, as a markdown table."""
    lines = [
        "| candidate | stage | calibration | images | float convs | selection score | Δ vs FP32 | images/s | search |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in outcome.evaluated:
        c, v = r.candidate, r.result
        if v is None:
            lines.append(
                f"| {c.name} | {c.stage} | {c.algorithm} | {c.num_images} | {c.num_float} | | | | "
                f"{'; '.join(r.reasons)} |"
            )
            continue
        speed = f"{v.throughput_ips:.1f}" if v.throughput_ips > 0 else "not timed"
        mark = " **chosen**" if r is outcome.chosen else ""
        gate = ("pass" if r.passed else "fail: " + "; ".join(x.split(": ", 1)[-1] for x in r.reasons)) + mark
        lines.append(
            f"| {c.name} | {c.stage} | {c.algorithm} | {c.num_images} | {c.num_float} | {v.map50_95:.4f} | "
            f"{v.delta_map50_95 * 100:+.2f} | {speed} | {gate} |"
        )
    return "\n".join(lines)
