"""The deployment's custom-run form: one typed field per chosen params.yaml key, showing the value params.yaml gives it.

Prefect's UI draws the "Custom run" form from the deployment's parameter schema. The schema that Prefect derives from
the flow's signature would show every field as a `str | None` toggle ("Property is type None"), so yoloq writes it
from the pydantic config instead (`parameter_schema`): each field has its key's type (enums as dropdowns, ranges as
checked number fields) and description, and as default the value params.yaml gives it when the deployment is served
or deployed. The Prefect server checks a run's parameters against this schema before the run exists.

The form submits every field. A field still at the value it showed (`form_values`, kept in the deployment's
environment) keeps params.yaml's current value, so editing one field changes only its key (`changed_fields`); a run
started through the API with some parameters gets params.yaml's values for all the others (unset = None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yoloq.config import Params

ALL_IMAGES = 0
"""validation_images 0 = validation.num_images null (every image): the form shows a number, never a null toggle."""


@dataclass(frozen=True)
class FormField:
    key: str  # the params.yaml key the field overrides
    description: str | None = None  # None: the config field's own description


FORM_FIELDS: dict[str, FormField] = {
    "model_path": FormField(
        "model.path", "checkpoint (.pt, .yaml or .onnx); one other than params.yaml's must be in the watched folder"
    ),
    "backend": FormField("backend"),
    "calibration_algorithm": FormField("calibration.algorithm"),
    "calibration_images": FormField("calibration.num_images"),
    "validation_images": FormField("validation.num_images", "first N validation images (sorted by name); 0 = all"),
    "max_map_drop": FormField("gate.max_map_drop"),
    "max_map_drop_vs_fp16": FormField("gate.max_map_drop_vs_fp16"),
    "min_speedup_vs_fp16": FormField(
        "gate.min_speedup_vs_fp16", "smallest INT8 / fp16 throughput (runs with an fp16 variant); 0 = no speed gate"
    ),
    "search_enabled": FormField("search.enabled"),
    "output_dir": FormField("output_dir"),
}
"""Form field -> params.yaml key, in the form's order (after params_path)."""

_KEPT = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "items")


def config_schema(key: str) -> dict[str, Any]:
    """The JSON schema pydantic gives params.yaml key `key` (e.g. "gate.max_map_drop"), `$ref`s followed."""
    schema = Params.model_json_schema()
    node: dict[str, Any] = schema
    for part in key.split("."):
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        node = node["properties"][part]
    return node


def config_value(params: Params, key: str) -> Any:
    """The value of `key` in `params`, as JSON (paths as strings, absolute: params are resolved)."""
    value: Any = params.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    return value


def form_values(params: Params) -> dict[str, Any]:
    """What each form field shows for `params` (null validation.num_images shows as ALL_IMAGES)."""
    values = {name: config_value(params, field.key) for name, field in FORM_FIELDS.items()}
    if values["validation_images"] is None:
        values["validation_images"] = ALL_IMAGES
    return values


def field_schema(name: str, field: FormField, default: Any, position: int) -> dict[str, Any]:
    """One form field: the config key's type, enum and range (the non-null branch of an optional key), its
    description, and `default`."""
    schema = config_schema(field.key)
    typed = next((s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"), schema)
    out = {k: typed[k] for k in _KEPT if k in typed}
    if name == "validation_images":
        out["minimum"] = ALL_IMAGES
    description = field.description or schema.get("description") or typed.get("description") or field.key
    return {
        "title": name,
        "description": f"{field.key}: {description}",
        "default": default,
        "position": position,
        **out,
    }


def parameter_schema(params: Params, params_path: Path) -> dict[str, Any]:
    """The deployment's parameter schema (Prefect's ParameterSchema as a dict): params_path, the FORM_FIELDS with
    `params`' values as defaults, skip_if_done and extra_overrides."""
    shown = form_values(params)
    properties: dict[str, Any] = {
        "params_path": {
            "title": "params_path",
            "type": "string",
            "default": str(params_path),
            "description": "the params file this deployment runs with (a run cannot change it)",
            "readOnly": True,
            "position": 0,
        }
    }
    for position, (name, field) in enumerate(FORM_FIELDS.items(), start=1):
        properties[name] = field_schema(name, field, shown[name], position)
    properties["skip_if_done"] = {
        "title": "skip_if_done",
        "type": "boolean",
        "default": False,
        "description": "return the finished MLflow run of the same model content and parameters instead of a new run",
        "position": len(properties),
    }
    properties["extra_overrides"] = {
        "title": "extra_overrides",
        "type": "array",
        "items": {"type": "string"},
        "default": [],
        "description": "more section.key=value overrides, e.g. validation.batch_size=4",
        "position": len(properties),
    }
    return {"title": "Parameters", "type": "object", "properties": properties, "required": [], "definitions": {}}


def changed_fields(values: dict[str, Any], shown: dict[str, Any]) -> dict[str, Any]:
    """`values` (form field -> what the run got), with None where a field is unset or still at the value the form
    `shown`: those keep params.yaml's current value."""
    return {name: None if value is None or shown.get(name) == value else value for name, value in values.items()}
