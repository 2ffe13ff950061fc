"""Stage 1, export: a PyTorch checkpoint, an Ultralytics model yaml, or an ONNX model -> a checked ONNX model.

Model facts (family, head format, class names, stride, input size) travel inside the ONNX metadata, so every
later stage reads them from the model itself. Torch and the exporters are imported only when a checkpoint must
be exported: a user who starts from ONNX needs neither.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from yoloq.artifacts import atomic_path, file_sha256
from yoloq.cache import get_or_create
from yoloq.checkpoint_sniff import check_onnx, safe_globals_for, sniff_model
from yoloq.config import ExportConfig, ModelConfig
from yoloq.errors import InputError
from yoloq.heads import HeadFormat, detect_head_format
from yoloq.labels import COCO80_NAMES

EXPORT_EXTRA_HINT = "install the export extra: pip install '.[export]' (torch, yolov5, ultralytics)"
_METADATA_KEYS = ("family", "head_format", "names", "stride", "imgsz", "source_sha256")
_YOLOV5_TOP_MODULES = ("models", "utils")  # top-level names classic YOLOv5 pickles import


@dataclass(frozen=True)
class ModelFacts:
    family: str
    head_format: HeadFormat
    names: list[str]
    stride: int
    imgsz: int
    source_sha256: str

    def metadata(self) -> dict[str, str]:
        return {key: json.dumps(value) if key == "names" else str(value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    facts: ModelFacts
    input_name: str
    output_name: str
    reused: bool


def export_model(model: ModelConfig, config: ExportConfig, out_dir: Path) -> ExportResult:
    """Export `model.path` to ONNX under `out_dir`, named by a content hash; reuse an earlier identical export."""
    source = model.path
    if not source.is_file():
        raise InputError(f"model {source} not found: set model.path in params.yaml to a .pt, .yaml or .onnx file")
    sniffed = sniff_model(source)  # what the file is, checked without unpickling it
    kind = sniffed.kind
    source_hash = file_sha256(source)

    def produce(final: Path) -> None:
        with atomic_path(final) as tmp:
            if kind == "onnx":
                shutil.copyfile(source, tmp)
                facts = _facts_from_onnx(tmp, model.imgsz, source_hash)
            elif kind == "yolov5":
                facts = _export_yolov5(source, tmp, model.imgsz, config, source_hash)
            else:
                facts = _export_ultralytics(source, tmp, model.imgsz, config, source_hash)
            _write_metadata(tmp, facts)

    key_parts = ["export-v2", kind, source_hash, model.imgsz, config.model_dump()]
    cached = get_or_create(out_dir, "model", key_parts, ".onnx", produce, lambda path: path)
    return _result(cached.path, reused=cached.reused)


def source_kind(path: Path) -> str:
    """'onnx', 'yolov5' (classic checkpoint, models.yolo) or 'ultralytics' (checkpoint or model yaml)."""
    return sniff_model(path).kind


def read_facts(onnx_path: Path) -> ModelFacts:
    """Model facts stored in an ONNX model's metadata by `export_model`."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {prop.key: prop.value for prop in model.metadata_props}
    missing = [key for key in _METADATA_KEYS if key not in meta]
    if missing:
        raise InputError(
            f"{onnx_path}: ONNX metadata lacks {', '.join(missing)}; run it through the export stage first"
        )
    return ModelFacts(
        family=meta["family"],
        head_format=meta["head_format"],  # type: ignore[arg-type]
        names=json.loads(meta["names"]),
        stride=int(meta["stride"]),
        imgsz=int(meta["imgsz"]),
        source_sha256=meta["source_sha256"],
    )


def facts_for_onnx(onnx_path: Path, imgsz: int) -> ModelFacts:
    """Facts from yoloq's metadata when present, else inferred from the graph (any YOLO ONNX export)."""
    try:
        return read_facts(onnx_path)
    except InputError:
        check_onnx(onnx_path)
        return _facts_from_onnx(onnx_path, imgsz, file_sha256(onnx_path))


def io_names(onnx_path: Path) -> tuple[str, str]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not model.graph.output:
        raise InputError(f"{onnx_path}: expected one image input and a detection output, found inputs {inputs}")
    return inputs[0], model.graph.output[0].name


def _result(path: Path, reused: bool) -> ExportResult:
    input_name, output_name = io_names(path)
    return ExportResult(path, read_facts(path), input_name, output_name, reused)


def _facts_from_onnx(path: Path, imgsz: int, source_hash: str) -> ModelFacts:
    """Infer facts from the graph: run it once on a blank image to learn the true output shape."""
    model = onnx.load(str(path), load_external_data=False)
    meta = {prop.key: prop.value for prop in model.metadata_props}
    input_dims = model.graph.input[0].type.tensor_type.shape.dim
    static_size = input_dims[-1].dim_value if len(input_dims) == 4 else 0
    size = int(static_size or _first_int(meta.get("imgsz"), imgsz))
    shape = _output_shape(path, size)
    names = _names_from_metadata(meta.get("names"))
    num_classes = len(names) if names else _guess_num_classes(shape)
    names = names or (list(COCO80_NAMES) if num_classes == 80 else [f"class{i}" for i in range(num_classes)])
    head_format = meta.get("head_format") or detect_head_format(shape, num_classes)
    return ModelFacts(
        family=meta.get("family", {"yolov5": "yolov5", "yolov8": "yolov8", "end2end": "yolo26"}[head_format]),
        head_format=head_format,  # type: ignore[arg-type]
        names=names,
        stride=_first_int(meta.get("stride"), 32),
        imgsz=size,
        source_sha256=source_hash,
    )


def _first_int(text: str | None, default: int) -> int:
    """'640', '[640, 640]' (Ultralytics) or None -> an int."""
    if not text:
        return default
    digits = text.strip("[]() ").split(",")[0].strip()
    return int(digits) if digits.isdigit() else default


def _output_shape(path: Path, imgsz: int) -> tuple[int, ...]:
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.zeros((1, 3, imgsz, imgsz), np.float32)}
        return tuple(session.run(None, feed)[0].shape)
    except Exception as exc:  # ORT raises its own exception types
        raise InputError(f"model {path}: ONNX Runtime cannot run it on a 1x3x{imgsz}x{imgsz} input ({exc})") from exc


def _names_from_metadata(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        import ast

        value = ast.literal_eval(text)  # Ultralytics writes str(dict)
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value, key=int)]
    return [str(v) for v in value]


def _guess_num_classes(shape: tuple[int, ...]) -> int:
    if len(shape) == 3 and shape[2] == 6:
        return 80
    if len(shape) == 3 and shape[1] > shape[2]:
        return shape[2] - 5
    if len(shape) == 3:
        return shape[1] - 4
    raise InputError(f"unsupported output shape {shape}: expected (N,A,5+nc), (N,4+nc,A) or (N,300,6)")


def _write_metadata(path: Path, facts: ModelFacts) -> None:
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key not in facts.metadata()]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in facts.metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise InputError(f"exporting a PyTorch checkpoint needs torch: {EXPORT_EXTRA_HINT}") from exc
    return torch


def _export_yolov5(source: Path, dest: Path, imgsz: int, config: ExportConfig, source_hash: str) -> ModelFacts:
    """Classic YOLOv5 checkpoint: unpickle with the `yolov5` package's model code, export with torch.onnx."""
    torch = _import_torch()
    spec = importlib.util.find_spec("yolov5")  # found, not imported: importing it appends its folder to sys.path
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"classic YOLOv5 checkpoints load with the yolov5 package: {EXPORT_EXTRA_HINT}")
    with yolov5_imports(Path(spec.submodule_search_locations[0])):
        checkpoint = _load_checkpoint(torch, source)
        entry = (checkpoint.get("ema") or checkpoint.get("model")) if isinstance(checkpoint, dict) else None
        if entry is None:
            raise InputError(f"model {source}: the checkpoint has no 'model' or 'ema' entry holding the model")
        model = entry.float().fuse().eval()
        detect = model.model[-1]
        detect.inplace = False
        detect.export = True  # Detect returns one tensor (N, anchors, 5 + nc)
        names = model.names if isinstance(model.names, list) else [model.names[k] for k in sorted(model.names)]
        dummy = torch.zeros(1, 3, imgsz, imgsz)
        with torch.no_grad():
            output = model(dummy)
            output = output[0] if isinstance(output, (tuple, list)) else output
        _torch_onnx_export(torch, model, dummy, dest, config)
    return ModelFacts(
        family="yolov5",
        head_format=detect_head_format(tuple(output.shape), len(names)),
        names=[str(n) for n in names],
        stride=int(model.stride.max()),
        imgsz=imgsz,
        source_sha256=source_hash,
    )


def _load_checkpoint(torch: Any, source: Path) -> Any:
    """Unpickle with torch's weights-only loader, allowing only the allowlisted globals the sniffer found.

    The file sniffed and the file loaded are one private copy, so the source cannot change in between."""
    with tempfile.TemporaryDirectory(prefix="yoloq-load-") as work:
        staged = Path(work) / source.name
        shutil.copyfile(source, staged)
        allowed = safe_globals_for(source, sniff_model(staged).imports)
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(str(staged), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, or a model class whose state no longer fits the installed code
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
            raise InputError(
                f"model {source}: torch's weights-only loader cannot load it ({type(exc).__name__}: {reason})"
            ) from exc


@contextmanager
def yolov5_imports(package_dir: Path) -> Iterator[None]:
    """For this block only, `models.*` and `utils.*` (the names classic YOLOv5 pickles import) come from the yolov5
    package folder. Afterwards sys.path is exactly as before (the yolov5 package and the pkg_resources it imports
    append folders of their own), the `models`/`utils` modules imported from that folder are dropped from
    sys.modules, and any `models`/`utils` modules the process had before are back in place."""
    saved_path = list(sys.path)
    hidden = {name: module for name, module in sys.modules.items() if _top_module(name) in _YOLOV5_TOP_MODULES}
    for name in hidden:
        del sys.modules[name]
    sys.path.insert(0, str(package_dir))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if _top_module(n) in _YOLOV5_TOP_MODULES]:
            if _imported_from(sys.modules[name], package_dir):
                del sys.modules[name]
        sys.modules.update(hidden)


def _top_module(name: str) -> str:
    return name.partition(".")[0]


def _imported_from(module: ModuleType, folder: Path) -> bool:
    locations = [getattr(module, "__file__", None), *getattr(module, "__path__", [])]
    root = folder.resolve()
    return any(location and Path(location).resolve().is_relative_to(root) for location in locations)


def _torch_onnx_export(torch: Any, model: Any, dummy: Any, dest: Path, config: ExportConfig) -> None:
    dynamic_axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if config.dynamic_batch else None
    torch.onnx.export(
        model,
        dummy,
        str(dest),
        opset_version=config.opset,
        input_names=["images"],
        output_names=["output0"],
        dynamic_axes=dynamic_axes,
        do_constant_folding=True,
        dynamo=False,
    )


def _export_ultralytics(source: Path, dest: Path, imgsz: int, config: ExportConfig, source_hash: str) -> ModelFacts:
    """Ultralytics checkpoint or model yaml (YOLOv5u/v8/11/26), exported by Ultralytics' own ONNX exporter."""
    _import_torch()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics import YOLO
    except ImportError as exc:
        raise InputError(f"Ultralytics models export with the ultralytics package: {EXPORT_EXTRA_HINT}") from exc
    with tempfile.TemporaryDirectory(prefix="yoloq-export-") as work:
        staged = Path(work) / source.name
        shutil.copyfile(source, staged)
        sniffed = sniff_model(staged)  # the copy Ultralytics unpickles passes the checks (the source may have changed)
        safe_globals_for(staged, sniffed.imports)  # every model-namespace import is a model class
        try:
            with _ultralytics_weights_only():
                model = YOLO(str(staged))
            exported = model.export(
                format="onnx", imgsz=imgsz, opset=config.opset, dynamic=config.dynamic_batch, simplify=False
            )
        except Exception as exc:
            raise InputError(f"model {source}: Ultralytics export failed ({type(exc).__name__}: {exc})") from exc
        shutil.move(exported, dest)  # Ultralytics writes next to the working directory for model yamls
        names_dict = model.names
    fix_spatial_size(dest, imgsz)
    facts = _facts_from_onnx(dest, imgsz, source_hash)
    family = _ultralytics_family(source.stem, facts.head_format)
    names = [str(names_dict[k]) for k in sorted(names_dict)]
    return ModelFacts(family, facts.head_format, names, facts.stride, imgsz, source_hash)


def fix_spatial_size(path: Path, imgsz: int) -> None:
    """Make the image input's height and width `imgsz` (the batch stays as exported): Ultralytics' `dynamic=True`
    leaves every dimension dynamic, and TensorRT builds need fixed C, H, W (seen on the GPU: "input 'images' has
    shape [None, 3, None, None]")."""
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or all(d.HasField("dim_value") for d in dims[2:]):
        return
    for dim in dims[2:]:
        dim.ClearField("dim_param")
        dim.dim_value = imgsz
    onnx.save(model, str(path))


@contextmanager
def _ultralytics_weights_only() -> Iterator[None]:
    """Ultralytics loads checkpoints with torch's weights-only unpickler and its allowlist of model classes while
    this block runs (its opt-in ULTRALYTICS_SAFE_LOAD mode, read from a module global that is set here)."""
    from ultralytics.nn import tasks

    if not getattr(getattr(tasks, "_SafeLoad", None), "SUPPORTED", False) or not hasattr(tasks, "SAFE_LOAD"):
        yield  # an Ultralytics without safe loading: the sniffer's checks of the staged copy guard the load
        return
    saved = tasks.SAFE_LOAD
    tasks.SAFE_LOAD = True
    try:
        yield
    finally:
        tasks.SAFE_LOAD = saved


def _ultralytics_family(stem: str, head_format: str) -> str:
    lowered = stem.lower()
    for family in ("yolo26", "yolo11", "yolov10", "yolov8", "yolov5"):
        if lowered.startswith(family):
            return family
    return "yolo26" if head_format == "end2end" else "yolov8"
