"""MLflow model registry: after the gate, each non-reference variant's model file becomes a registered version.

A variant that passes the gate gets alias `champion`; one that fails gets `challenger`, and its run is tagged
with the reason. Each variant (and build target) is its own registered model, `<name>-<variant>` or
`<name>-<target>-<variant>` (name: registry.model_name, default `yoloq-<model file stem>`), so an alias always
names one file: the INT8 engine built for an H100 is never confused with the FP16 one or with an L4's engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from yoloq.config import Params
from yoloq.report import GateVerdict, ShipDecision, VariantResult

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class RegisteredVariant:
    model_name: str
    version: str
    alias: str
    run_id: str
    reason: str


def registered_model_name(params: Params, variant: str, target: str | None = None) -> str:
    base = params.registry.model_name or f"yoloq-{params.model.path.stem}"
    return "-".join(part for part in (base, target, variant) if part)


def variant_gate_reason(gate: GateVerdict, variant: str) -> str:
    """Why `variant` failed the gate ('' when it passed). A failed gate that names no variant fails them all."""
    mine = [r for r in gate.reasons if r.startswith(f"{variant}:")]
    if mine:
        return "; ".join(mine)
    if not gate.passed and not any(":" in r for r in gate.reasons):
        return "; ".join(gate.reasons) or "gate failed"
    return ""


def register_variants(
    client: MlflowClient,
    params: Params,
    results: list[VariantResult],
    gate: GateVerdict,
    child_runs: dict[str, str],
    target: str | None = None,
) -> list[RegisteredVariant]:
    """Register the model file logged in each non-reference variant's child run; set its alias and gate tags.

    `child_runs` maps variant name -> MLflow run id whose artifacts hold the model file at its file name."""
    if not params.registry.enabled:
        return []
    reference = params.reference_variant.name
    registered = []
    for result in results:
        if result.name == reference:
            continue
        run_id = child_runs[result.name]
        reason = variant_gate_reason(gate, result.name)
        alias = CHALLENGER if reason else CHAMPION
        name = registered_model_name(params, result.name, target)
        _ensure_registered_model(client, name, params)
        tags = {**_version_tags(result, target), "gate": "failed" if reason else "passed"}
        version = client.create_model_version(
            name, source=f"runs:/{run_id}/{result.model_path.name}", run_id=run_id, tags=tags
        )
        client.set_registered_model_alias(name, alias, version.version)
        run_tags = {"gate": tags["gate"], "registry.model": name, "registry.version": str(version.version)}
        run_tags["registry.alias"] = alias
        if reason:
            run_tags["gate.reason"] = reason[:5000]
        for key, value in run_tags.items():
            client.set_tag(run_id, key, value)
        registered.append(RegisteredVariant(name, str(version.version), alias, run_id, reason))
    return registered


def register_champion(
    client: MlflowClient,
    params: Params,
    ship: ShipDecision,
    results: list[VariantResult],
    child_runs: dict[str, str],
    target: str | None = None,
) -> RegisteredVariant | None:
    """The model a run ships, as a version of one registered model per model (and target), `<name>` or
    `<name>-<target>`, with alias `champion` and the reason as a tag: `models:/<name>@champion` is what to deploy.
    Nothing is registered when no variant passes (the alias stays on the last shipped version)."""
    if not params.registry.enabled or ship.variant is None:
        return None
    result = next(r for r in results if r.name == ship.variant)
    run_id = child_runs[result.name]
    name = registered_model_name(params, "", target)
    _ensure_registered_model(client, name, params)
    tags = {
        **_version_tags(result, target),
        "throughput_ips": f"{result.throughput_ips:.1f}",
        "why": ship.reason[:5000],
    }
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{result.model_path.name}", run_id=run_id, tags=tags
    )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return RegisteredVariant(name, str(version.version), CHAMPION, run_id, "")


def _version_tags(result: VariantResult, target: str | None) -> dict[str, str]:
    """What a registered version says about the variant it holds."""
    return {
        "variant": result.name,
        "precision": result.precision,
        "backend": result.backend,
        "target": target or "local",
        "map50_95": f"{result.map50_95:.4f}",
        "delta_map50_95_vs_fp32": f"{result.delta_map50_95:+.4f}",
    }


def _ensure_registered_model(client: MlflowClient, name: str, params: Params) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            tags={"source_model": params.model.path.name},
            description=f"yoloq variants of {params.model.path.name}; alias champion = latest that passed the gate",
        )
