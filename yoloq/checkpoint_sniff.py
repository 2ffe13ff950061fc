"""What a model file is, told without running it: the one place that decides whether yoloq may load a model file.

A PyTorch checkpoint is a zip archive whose `data.pkl` is a pickle, and unpickling runs whatever the pickle names.
So a checkpoint is read as data first: `pickletools.genops` walks the pickle's opcodes, and every GLOBAL /
STACK_GLOBAL / INST opcode gives the `module.name` that unpickling would import. Those imports must all be on an
allowlist (torch tensors and modules, plain containers, numpy scalars, the YOLO model packages); they also tell
which model the file holds (an Ultralytics DetectionModel, a classic YOLOv5 `models.yolo.Model`, a segmentation
model, tensors only...). Preflight and the export stage both call `sniff_model`; the export stage then loads the
file with torch's weights-only unpickler, allowing exactly the classes found here (`safe_globals_for`).
"""

from __future__ import annotations

import _compat_pickle
import importlib
import pickletools
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from yoloq.errors import InputError

ModelKind = Literal["onnx", "yolov5", "ultralytics"]

ACCEPTS = (
    "yoloq takes a detection model: a .pt checkpoint holding an Ultralytics DetectionModel or a classic YOLOv5 "
    "models.yolo.Model, an Ultralytics model .yaml, or an .onnx export"
)
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"

# Namespaces whose classes make up YOLO models (classic YOLOv5 checkpoints name `models.*`/`utils.*` of the yolov5
# package; checkpoints trained with the pip package name `yolov5.models.*`). Only classes defined there are loaded.
MODEL_NAMESPACES = ("ultralytics", "models", "utils", "yolov5.models", "yolov5.utils", "torch.nn.modules")
_ALLOWED = frozenset(
    {
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.range",
        "builtins.complex",
        "builtins.bytearray",
        "builtins.bytes",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.int",
        "builtins.float",
        "builtins.bool",
        "builtins.str",
        "collections.OrderedDict",
        "_codecs.encode",  # bytes in a protocol-2 pickle (numpy scalars)
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "pathlib._local.PosixPath",  # Python 3.13 pickles paths under pathlib._local
        "pathlib._local.WindowsPath",
        "argparse.Namespace",
        "types.SimpleNamespace",
        "torch.Size",
        "torch.device",
        "torch.Tensor",
        "torch._tensor._rebuild_from_type_v2",
        "torch.nn.parameter.Parameter",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
    }
)
_TORCH_DTYPES = frozenset(
    "float32 float float64 double float16 half bfloat16 int8 uint8 int16 short int32 int int64 long bool "
    "uint16 uint32 uint64 complex64 cfloat complex128 cdouble float8_e4m3fn float8_e5m2 qint8 quint8 qint32".split()
)
# Imports that hold data, not models: a file that imports only these is a state_dict or a dict of tensors.
_DATA_MODULES = frozenset(
    "builtins collections _codecs pathlib argparse types torch torch._utils torch._tensor torch.storage".split()
    + ["torch.nn.parameter"]
)

# Classes of the model namespaces that hold plain data (training arguments): they may be called like data types.
_DATA_CLASSES = frozenset(
    {"ultralytics.utils.IterableSimpleNamespace", "ultralytics.yolo.utils.IterableSimpleNamespace"}
)
# Where names that older Ultralytics checkpoints use live now (as Ultralytics' own loader maps them).
_LEGACY_MODULES = {
    "ultralytics.yolo.utils": "ultralytics.utils",
    "ultralytics.yolo.v8": "ultralytics.models.yolo",
    "ultralytics.yolo.data": "ultralytics.data",
}
_LEGACY_NAMES = {
    "ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",
    "ultralytics.nn.modules.block.Silence": "torch.nn.modules.linear.Identity",
    "ultralytics.utils.loss.v10DetectLoss": "ultralytics.utils.loss.E2EDetectLoss",
}

ULTRALYTICS_DETECTION = ("ultralytics.nn.tasks.DetectionModel", "ultralytics.nn.tasks.YOLOv10DetectionModel")
YOLOV5_DETECTION = tuple(f"{p}models.yolo.{n}" for p in ("", "yolov5.") for n in ("Model", "DetectionModel"))
ULTRALYTICS_TASKS = {
    "SegmentationModel": "segmentation",
    "YOLOESegModel": "segmentation",
    "PoseModel": "pose",
    "OBBModel": "oriented-box (OBB)",
    "ClassificationModel": "classification",
}
YOLOV5_TASKS = {"SegmentationModel": "segmentation", "ClassificationModel": "classification"}
_YAML_TASKS = {"segment": "segmentation", "pose": "pose", "obb": "oriented-box (OBB)", "classify": "classification"}


@dataclass(frozen=True)
class SniffedModel:
    path: Path
    kind: ModelKind
    imports: tuple[str, ...] = ()  # `module.name` of every global the checkpoint's pickles import (.pt only)


def sniff_model(path: Path) -> SniffedModel:
    """Classify `path` without unpickling it; InputError says what the file is and what yoloq takes."""
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a .pt/.yaml/.onnx file")
    if not path.is_file():
        raise InputError(f"{path} not found (a .pt, model .yaml or .onnx file)")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(512)
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes): copy or download it again")
    if head.startswith(LFS_POINTER):
        raise InputError(f"{path} is a Git LFS pointer ({_lfs_size(head)}), not the model: run `git lfs pull`")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        check_onnx(path)
        return SniffedModel(path, "onnx")
    if suffix in (".yaml", ".yml"):
        _check_model_yaml(path)
        return SniffedModel(path, "ultralytics")
    if suffix != ".pt":
        raise InputError(f"{path}: unsupported file type {suffix!r}; {ACCEPTS}")
    imports = checkpoint_imports(path, head, size)
    return SniffedModel(path, _checkpoint_kind(path, imports), tuple(imports))


def checkpoint_imports(path: Path, head: bytes, size: int) -> list[str]:
    """Every `module.name` the pickles in the checkpoint zip import, in order of first appearance."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith(".pkl")]
            if any("/code/" in n or n.endswith("constants.pkl") for n in names):
                raise InputError(
                    f"{path} is a TorchScript module (torch.jit.save), not a checkpoint: pass the .pt checkpoint "
                    "the model was trained or saved to, or an .onnx export"
                )
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in pickles):
                raise InputError(
                    f"{path} is a zip archive without data.pkl, not a PyTorch checkpoint: re-save it with torch.save"
                )
            payloads = [(n, archive.read(n)) for n in pickles]
    except zipfile.BadZipFile as exc:
        if head.startswith(b"PK"):
            raise InputError(
                f"{path} is a corrupt or truncated checkpoint ({size} bytes; {exc}): download or copy it again"
            ) from exc
        if head.startswith(b"\x80"):
            raise InputError(
                f"{path} is a legacy PyTorch file (the non-zip format of torch < 1.6) or a plain pickle; yoloq reads "
                "the zip checkpoints torch.save has written since torch 1.6: re-save it with a current torch"
            ) from exc
        raise InputError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with {head[:16]!r}): "
            "pass the .pt file torch.save wrote"
        ) from exc
    except (OSError, EOFError, ValueError) as exc:  # a damaged member: bad CRC, short read, bad compression
        raise InputError(f"{path} is a corrupt checkpoint ({exc}): download or copy it again") from exc
    found: dict[str, None] = {}
    for name, payload in payloads:
        try:
            found.update(dict.fromkeys(pickle_imports(payload)))
        except PickleRefused as exc:
            raise InputError(
                f"{path}: {exc}; yoloq does not unpickle it (unpickling would run it): use a checkpoint from a "
                "source you trust"
            ) from exc
        except ValueError as exc:
            raise InputError(f"{path}: its {name} is not a readable pickle ({exc}): download or copy it again") from exc
    return list(found)


class PickleRefused(ValueError):
    """The pickle does something no model checkpoint does; the message says what."""


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"})
_STRING_OPS |= {"SHORT_BINSTRING"}
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MARK = ("mark", "")
_VALUE = ("value", "")


def pickle_imports(payload: bytes) -> list[str]:
    """`module.name` of each global the pickle imports (GLOBAL, INST, STACK_GLOBAL), as the unpickler resolves it
    (protocol < 3 maps Python 2 names, e.g. `__builtin__.set` -> `builtins.set`), in order.

    The pickle's stack is followed symbolically, opcode by opcode, to check how each import is used:
      - every import must be allowed (`is_allowed`);
      - a model class (MODEL_NAMESPACES) may only be instantiated without being called (NEWOBJ: `cls.__new__` then
        its state set, which is how torch.save stores every nn.Module); calling it, or passing it to anything else,
        would run its constructor (YOLO model constructors parse a config with eval);
      - REDUCE (a call) may only call an allowed import other than a model class;
      - STACK_GLOBAL operands must be plain strings; no extension registry.
    Raises PickleRefused (a ValueError) for any of these, and ValueError for a truncated or invalid pickle."""
    imports: list[str] = []
    proto = 0
    memo: dict[int, tuple[str, str]] = {}
    stack: list[tuple[str, str]] = []  # (kind, text): ("global", name), ("str", value), ("mark", ""), ("value", "")

    def pop(count: int, opname: str) -> list[tuple[str, str]]:
        if count > len(stack) or _MARK in stack[len(stack) - count :]:
            raise ValueError(f"{opname} pops more than the pickle pushed")
        taken = stack[len(stack) - count :] if count else []
        del stack[len(stack) - count :]
        return taken

    def pop_mark(opname: str) -> list[tuple[str, str]]:
        if _MARK not in stack:
            raise ValueError(f"{opname} without MARK")
        at = len(stack) - 1 - stack[::-1].index(_MARK)
        taken = stack[at + 1 :]
        del stack[at:]
        return taken

    def consume(items: list[tuple[str, str]], opname: str) -> None:
        for kind, text in items:
            if kind == "global" and _is_model_class_name(text):
                raise PickleRefused(
                    f"the checkpoint passes the model class {text} to {opname} (a checkpoint only instantiates "
                    "model classes without calling them)"
                )

    def allow(full_name: str) -> tuple[str, str]:
        if not is_allowed(full_name):
            raise PickleRefused(f"the checkpoint imports {full_name}, which no model needs")
        imports.append(full_name)
        return ("global", full_name)

    for opcode, arg, _ in pickletools.genops(payload):
        name = opcode.name
        if name == "PROTO":
            proto = int(arg)
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            stack.append(allow(_resolved_name(module, attr, proto)))
        elif name == "STACK_GLOBAL":
            module_token, name_token = pop(2, name)
            if module_token[0] != "str" or name_token[0] != "str":
                raise PickleRefused("the checkpoint computes the name of an import, which no model checkpoint does")
            stack.append(allow(_resolved_name(module_token[1], name_token[1], proto)))
        elif name == "INST":
            module, _, attr = str(arg).partition(" ")
            full_name = allow(_resolved_name(module, attr, proto))[1]
            items = pop_mark(name)
            if _is_model_class_name(full_name):
                raise PickleRefused(f"the checkpoint calls the model class {full_name} (INST)")
            consume(items, name)
            stack.append(_VALUE)
        elif name in _STRING_OPS:
            stack.append(("str", arg) if isinstance(arg, str) else _VALUE)
        elif name in _MEMO_GETS:
            stack.append(memo.get(int(arg), _VALUE))
        elif name in _MEMO_PUTS or name == "MEMOIZE":
            if not stack or stack[-1] == _MARK:
                raise ValueError(f"{name} with nothing to memoize")
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise PickleRefused("the checkpoint uses the pickle extension registry, which no model checkpoint does")
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "REDUCE":
            func, args = pop(2, name)
            if func[0] != "global" or _is_model_class_name(func[1]):
                what = f"the model class {func[1]}" if func[0] == "global" else "an object it built itself"
                raise PickleRefused(f"the checkpoint calls {what} while loading, which no model checkpoint does")
            consume([args], f"a call of {func[1]}")
            stack.append(_VALUE)
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            cls, *args = pop(2 if name == "NEWOBJ" else 3, name)
            if cls[0] != "global":
                raise PickleRefused("the checkpoint instantiates a class it built itself, which no checkpoint does")
            consume(args, f"the constructor of {cls[1]}")
            stack.append(_VALUE)
        elif name == "OBJ":
            items = pop_mark(name)
            if not items or items[0][0] != "global" or _is_model_class_name(items[0][1]):
                raise PickleRefused("the checkpoint calls a model class or an object it built itself (OBJ)")
            consume(items[1:], f"a call of {items[0][1]}")
            stack.append(_VALUE)
        elif name == "BUILD":
            inst, state = pop(2, name)
            if inst[0] == "global":
                raise PickleRefused(f"the checkpoint sets attributes of {inst[1]} itself, which no checkpoint does")
            consume([state], "the state of an object")
            stack.append(inst)
        elif name == "POP" and stack and stack[-1] == _MARK:
            stack.pop()
        elif name == "DUP":
            stack.extend(pop(1, name) * 2)
        elif name != "FRAME":
            before = opcode.stack_before  # plain stack effect: pops `before`, pushes values
            if pickletools.markobject in before:
                items = pop_mark(name) + pop(before.index(pickletools.markobject), name)
            else:
                items = pop(len(before), name)
            consume(items, name)
            stack.extend([_VALUE] * len(opcode.stack_after))
    return imports


def _is_data(full_name: str) -> bool:
    module = full_name.rpartition(".")[0]
    return module in _DATA_MODULES or _in_namespace(module, ("numpy",))


def _is_model_class_name(full_name: str) -> bool:
    return full_name not in _DATA_CLASSES and _in_namespace(full_name.rpartition(".")[0], MODEL_NAMESPACES)


def _resolved_name(module: str, name: str, proto: int) -> str:
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def is_allowed(full_name: str) -> bool:
    """Whether a model checkpoint may import `full_name` (module.name); anything else is refused unread."""
    module, _, name = full_name.rpartition(".")
    if not module or not name.isidentifier():
        return False
    if full_name in _ALLOWED or module == "numpy.dtypes":
        return True
    if module == "torch":
        return name.endswith("Storage") or name in _TORCH_DTYPES
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    return _in_namespace(module, MODEL_NAMESPACES)


def _in_namespace(module: str, namespaces: tuple[str, ...]) -> bool:
    return any(module == ns or module.startswith(ns + ".") for ns in namespaces)


def _checkpoint_kind(path: Path, imports: list[str]) -> ModelKind:
    for full_name in imports:
        module, _, name = full_name.rpartition(".")
        if module == "ultralytics.nn.tasks" and name in ULTRALYTICS_TASKS:
            raise InputError(f"{path} is an Ultralytics {ULTRALYTICS_TASKS[name]} checkpoint ({full_name}); {ACCEPTS}")
        if module in ("models.yolo", "yolov5.models.yolo") and name in YOLOV5_TASKS:
            raise InputError(f"{path} is a YOLOv5 {YOLOV5_TASKS[name]} checkpoint ({full_name}); {ACCEPTS}")
    if any(n in ULTRALYTICS_DETECTION for n in imports):
        return "ultralytics"
    if any(n in YOLOV5_DETECTION for n in imports):
        return "yolov5"
    other_models = [n for n in imports if n.startswith("ultralytics.nn.tasks.") and n.endswith("Model")]
    if other_models:
        raise InputError(f"{path} holds an Ultralytics {other_models[0]}, not a DetectionModel; {ACCEPTS}")
    classes = [n for n in imports if not _is_data(n)]
    if classes:
        found = f"it holds {', '.join(classes[:4])}{' ...' if len(classes) > 4 else ''}"
    else:
        found = "it holds only tensors and plain containers (a state_dict, or a dict of tensors?), no model object"
    raise InputError(f"{path} is a PyTorch file holding no YOLO model: {found}; {ACCEPTS}")


def safe_globals_for(path: Path, imports: tuple[str, ...]) -> list[tuple[Any, str]]:
    """(object, name) pairs for `torch.serialization.safe_globals`: the allowlisted globals the checkpoint imports.

    Names in the model namespaces must be nn.Module classes defined there (not a function a pickle could call, nor
    a class such as a settings file that writes to disk); import them where they resolve to the right package
    (classic YOLOv5: inside `yolov5_imports`). Needs torch."""
    from torch.nn import Module

    pairs: list[tuple[Any, str]] = []
    for full_name in imports:
        if not is_allowed(full_name):
            raise InputError(
                f"{path}: the checkpoint imports {full_name}, which no model needs; yoloq does not load it"
            )
        module_name, _, name = _LEGACY_NAMES.get(full_name, full_name).rpartition(".")
        module_name = _LEGACY_MODULES.get(module_name, module_name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy.core is a deprecated alias of numpy._core
                obj = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise InputError(
                f"{path}: the checkpoint needs {full_name}, which the installed packages lack ({exc}): "
                "install the model package version it was saved with"
            ) from exc
        model_class = isinstance(obj, type) and (issubclass(obj, Module) or full_name in _DATA_CLASSES)
        if _in_namespace(module_name, MODEL_NAMESPACES) and not (
            model_class and _in_namespace(obj.__module__, MODEL_NAMESPACES)
        ):
            raise InputError(
                f"{path}: the checkpoint imports {full_name}, which is not a model class; yoloq does not unpickle it"
            )
        pairs.append((obj, full_name))
        if full_name == "numpy.dtype":  # an unpickled dtype is an instance of its numpy.dtypes class
            import numpy.dtypes

            pairs += [(c, f"numpy.dtypes.{c.__name__}") for c in vars(numpy.dtypes).values() if isinstance(c, type)]
    return pairs


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError, OSError) as exc:
        raise InputError(f"{path} is not a valid ONNX model ({exc}); re-export it") from exc
    except Exception as exc:  # onnx raises DecodeError and friends for corrupt protobufs
        raise InputError(f"{path} cannot be read as ONNX ({type(exc).__name__}: {exc}); re-export it") from exc


def _check_model_yaml(path: Path) -> None:
    """An Ultralytics model yaml: a mapping with a `head` list whose last module is the detection head."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid YAML ({exc}); {ACCEPTS}") from exc
    head = data.get("head") if isinstance(data, dict) else None
    if not isinstance(head, list) or not head or not isinstance(head[-1], list) or len(head[-1]) < 3:
        raise InputError(f"{path} is not an Ultralytics model yaml (no `head` list of [from, repeats, module, args])")
    module = str(head[-1][2]).lower()
    task = next((t for prefix, t in _YAML_TASKS.items() if module.startswith(prefix)), None)
    if task:
        raise InputError(f"{path} is an Ultralytics {task} model yaml (head {head[-1][2]}); {ACCEPTS}")


def _lfs_size(head: bytes) -> str:
    for line in head.decode("utf-8", "replace").splitlines():
        if line.startswith("size "):
            return f"the real file is {line[5:].strip()} bytes"
    return "the real file was not downloaded"
