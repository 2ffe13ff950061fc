"""An engine's per-layer profile as files: profile.md (tables), profile.png (ms per model block, stacked by
precision) and profile.json (every layer, the summary and the metrics), all written atomically."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from yoloq.artifacts import atomic_write_json, atomic_write_text, save_figure
from yoloq.backends.tensorrt.profile import (
    PRECISIONS,
    UNKNOWN,
    EngineProfile,
    ProfileSummary,
    findings,
    profile_metrics,
    summarize,
)

NAME_WIDTH = 90
# Stacks of the plot, bottom to top, with fixed colours so engines compare at a glance.
CATEGORY_COLOURS: dict[str, str] = {
    "INT8 conv": "#2ca02c",
    "FP8 conv": "#17becf",
    "BF16 conv": "#9edae5",
    "FP16 conv": "#1f77b4",
    "TF32 conv": "#ff7f0e",
    "FP32 conv": "#d62728",
    f"{UNKNOWN} conv": "#7f7f7f",
    "reformat": "#9467bd",
    "Q/DQ": "#8c564b",
    "other": "#c7c7c7",
}


@dataclass(frozen=True)
class ProfileFiles:
    markdown: Path
    plot: Path
    json: Path
    text: str  # the markdown itself
    metrics: dict[str, float]

    @property
    def paths(self) -> list[Path]:
        return [self.markdown, self.plot, self.json]


def write_profile(profile: EngineProfile, out_dir: Path, top: int = 10) -> ProfileFiles:
    """profile.md, profile.png and profile.json of `profile` in `out_dir`."""
    summary = summarize(profile, top)
    text = profile_markdown(profile, summary)
    markdown = atomic_write_text(out_dir / "profile.md", text + "\n")
    document = atomic_write_json(out_dir / "profile.json", profile_document(profile, summary))
    plot = profile_plot(  # last: the text and numbers stay written when plotting fails
        summary, out_dir / "profile.png", f"{Path(profile.engine).name}: ms per block, batch {profile.batch}"
    )
    return ProfileFiles(markdown, plot, document, text, profile_metrics(summary))


def profile_document(profile: EngineProfile, summary: ProfileSummary) -> dict[str, Any]:
    return {
        "engine": profile.engine,
        "batch": profile.batch,
        "iterations": profile.iterations,
        "warmup": profile.warmup,
        "detailed": profile.detailed,
        "environment": profile.environment,
        "metrics": profile_metrics(summary),
        "findings": findings(profile, summary),
        "convs": {precision: asdict(bucket) for precision, bucket in summary.convs.items()},
        "reformat": asdict(summary.reformat),
        "qdq": asdict(summary.qdq),
        "other": asdict(summary.other),
        "blocks": summary.blocks,
        "layers": [asdict(layer) for layer in profile.layers],
    }


def profile_markdown(profile: EngineProfile, summary: ProfileSummary) -> str:
    total = summary.total_ms or 1.0
    env = profile.environment
    where = ""
    if env:
        where = (
            f"; TensorRT {env.get('tensorrt_version', '?')} (library {env.get('tensorrt_library_version', '?')}) "
            f"on {env.get('gpu', '?')}"
        )
    lines = [
        f"# TensorRT profile: {Path(profile.engine).name}",
        "",
        f"Batch {profile.batch}, {profile.iterations} profiled executions after {profile.warmup} warm-up{where}. "
        f"{len(profile.layers)} engine layers, {summary.total_ms:.3f} ms per batch "
        f"({summary.images_per_s:,.0f} images/s as profiled).",
        "",
        "Per-layer times come from TensorRT's IProfiler, which synchronises after every layer: the total is above the",
        "engine's device time (`yoloq validate`). Compare layers, and engines profiled the same way.",
        "",
        "## Where the time goes",
        "",
        "| layers | count | ms per batch | share |",
        "|---|---:|---:|---:|",
    ]
    for precision in PRECISIONS:
        bucket = summary.convs.get(precision)
        if bucket:
            lines.append(f"| {precision} convs | {bucket.count} | {bucket.ms:.3f} | {bucket.ms / total:.1%} |")
    for label, bucket in (
        ("reformats", summary.reformat),
        ("Q/DQ not fused into a conv", summary.qdq),
        ("other layers", summary.other),
    ):
        lines.append(f"| {label} | {bucket.count} | {bucket.ms:.3f} | {bucket.ms / total:.1%} |")
    lines.append(f"| **all** | {len(profile.layers)} | {summary.total_ms:.3f} | 100% |")
    notes = findings(profile, summary)
    if notes:
        lines += ["", "## What to look at", "", *(f"- {note}" for note in notes)]
    lines += [
        "",
        f"## Slowest {len(summary.top)} layers",
        "",
        "| # | layer | type | precision | ms | share |",
        "|---:|---|---|---|---:|---:|",
    ]
    for rank, layer in enumerate(summary.top, 1):
        lines.append(
            f"| {rank} | {_cell(layer.name)} | {_cell(layer.layer_type)} | {layer.precision or '-'} | "
            f"{layer.ms:.3f} | {layer.ms / total:.1%} |"
        )
    categories = [c for c in CATEGORY_COLOURS if any(c in stacks for stacks in summary.blocks.values())]
    lines += [
        "",
        "## Per model block (ms per batch)",
        "",
        "| block | ms | " + " | ".join(categories) + " |",
        "|---|---:|" + "---:|" * len(categories),
    ]
    for block, stacks in summary.blocks.items():
        cells = " | ".join(f"{stacks[c]:.3f}" if c in stacks else "" for c in categories)
        lines.append(f"| {block} | {sum(stacks.values()):.3f} | {cells} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A layer name fit for a table cell: pipes escaped, long fused names shortened."""
    short = text if len(text) <= NAME_WIDTH else text[: NAME_WIDTH - 1] + "…"
    return short.replace("|", "\\|")


def profile_plot(summary: ProfileSummary, path: Path, title: str) -> Path:
    """Bars of ms per model block, stacked by conv precision, reformats, Q/DQ and other layers (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(summary.blocks)
    figure, axes = plt.subplots(figsize=(max(7.0, 0.35 * len(blocks) + 2), 4.5), dpi=120)
    bottoms = [0.0] * len(blocks)
    for name, colour in CATEGORY_COLOURS.items():
        values = [summary.blocks[block].get(name, 0.0) for block in blocks]
        if any(values):
            axes.bar(range(len(blocks)), values, bottom=bottoms, color=colour, label=name, width=0.8)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    axes.set_xticks(range(len(blocks)))
    axes.set_xticklabels([b.removeprefix("model.") for b in blocks], fontsize=7)
    axes.set_xlabel("model block (/model.N/)")
    axes.set_ylabel("ms per batch")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7)
    return save_figure(figure, path)
