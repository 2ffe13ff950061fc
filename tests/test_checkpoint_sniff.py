"""The model file sniffer: what a file is, told from its bytes and its pickle's opcodes, never by unpickling it."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import pytest

from tests.conftest import MODEL_PT, PROJECT
from yoloq.checkpoint_sniff import PickleRefused, pickle_imports, safe_globals_for, sniff_model
from yoloq.errors import InputError

YOLOV8N_PT = PROJECT / "data/models/yolov8n.pt"


def zipped_pickle(path: Path, payload: bytes) -> Path:
    """A torch.save-style zip archive holding `payload` as its data.pkl."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{path.stem}/data.pkl", payload)
        archive.writestr(f"{path.stem}/version", "3\n")
    return path


def instance_of(module: str, name: str) -> bytes:
    """Protocol-2 pickle of one object of `module.name`, made the way torch.save stores an nn.Module (NEWOBJ)."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00)\x81q\x01."


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"model": Evil(marker)}, path)
    return path


def test_real_checkpoints_are_classified_by_their_imports():
    sniffed = sniff_model(MODEL_PT)
    assert sniffed.kind == "yolov5" and "models.yolo.Model" in sniffed.imports
    assert "torch._utils._rebuild_tensor_v2" in sniffed.imports and "builtins.set" in sniffed.imports  # __builtin__
    if YOLOV8N_PT.is_file():
        assert sniff_model(YOLOV8N_PT).kind == "ultralytics"


@pytest.mark.parametrize(
    ("module", "name", "expected"),
    [
        ("ultralytics.nn.tasks", "PoseModel", "Ultralytics pose checkpoint"),
        ("ultralytics.nn.tasks", "OBBModel", "Ultralytics oriented-box (OBB) checkpoint"),
        ("ultralytics.nn.tasks", "ClassificationModel", "Ultralytics classification checkpoint"),
        ("models.yolo", "SegmentationModel", "YOLOv5 segmentation checkpoint (models.yolo.SegmentationModel)"),
        ("models.yolo", "ClassificationModel", "YOLOv5 classification checkpoint"),
        ("ultralytics.nn.tasks", "WorldModel", "holds an Ultralytics ultralytics.nn.tasks.WorldModel"),
    ],
)
def test_other_tasks_are_named(tmp_path, module, name, expected):
    path = zipped_pickle(tmp_path / "other.pt", instance_of(module, name))
    with pytest.raises(InputError, match="yoloq takes a detection model") as error:
        sniff_model(path)
    assert expected in str(error.value)


def test_a_real_segmentation_checkpoint_is_named(tmp_path):
    pytest.importorskip("ultralytics")
    import torch
    from ultralytics import YOLO

    path = tmp_path / "yolov8n-seg.pt"
    torch.save({"model": YOLO("yolov8n-seg.yaml").model, "train_args": {}}, path)  # as Ultralytics saves one
    with pytest.raises(InputError, match=r"segmentation checkpoint \(ultralytics.nn.tasks.SegmentationModel\)"):
        sniff_model(path)


def test_a_segmentation_model_yaml_is_named(tmp_path):
    path = tmp_path / "seg.yaml"
    path.write_text("nc: 80\nbackbone:\n  - [-1, 1, Conv, [64, 3, 2]]\nhead:\n  - [[0], 1, Segment, [nc, 32, 256]]\n")
    with pytest.raises(InputError, match="segmentation model yaml"):
        sniff_model(path)
    path.write_text("just: text\n")
    with pytest.raises(InputError, match="not an Ultralytics model yaml"):
        sniff_model(path)


def test_tensors_alone_are_no_model(tmp_path):
    import torch

    torch.save({"w": torch.zeros(3)}, tmp_path / "weights.pt")
    with pytest.raises(InputError, match="holding no YOLO model: it holds only tensors"):
        sniff_model(tmp_path / "weights.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pt")
    with pytest.raises(InputError, match="holds torch.nn.modules.linear.Linear"):
        sniff_model(tmp_path / "linear.pt")


def test_broken_files_say_what_they_are(tmp_path):
    import torch

    cases = {
        "truncated.pt": (MODEL_PT.read_bytes()[: MODEL_PT.stat().st_size // 2], "corrupt or truncated checkpoint"),
        "pointer.pt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:4f18\nsize 3900000\n", "git lfs pull"),
        "empty.pt": (b"", "is empty (0 bytes)"),
        "page.pt": (b"<!DOCTYPE html><html>404</html>", "neither a zip archive nor a pickle"),
        "model.tflite": (b"TFL3", "unsupported file type '.tflite'"),
        "bad.onnx": (b"\x08\x07garbage" * 100, "ONNX"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert expected in _error(tmp_path / name), name
    torch.save({"w": torch.zeros(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="legacy PyTorch file"):
        sniff_model(tmp_path / "legacy.pt")
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:
        archive.writestr("other/readme.txt", "x")
    with pytest.raises(InputError, match="without data.pkl"):
        sniff_model(tmp_path / "other.pt")
    with pytest.raises(InputError, match="is a folder; pass a .pt/.yaml/.onnx file"):
        sniff_model(tmp_path)
    assert "Git LFS pointer (the real file is 3900000 bytes)" in _error(tmp_path / "pointer.pt")


def _error(path: Path) -> str:
    with pytest.raises(InputError) as error:
        sniff_model(path)
    return str(error.value)


def test_a_malicious_checkpoint_is_refused_unread(tmp_path):
    marker = tmp_path / "PWNED"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    message = _error(path)
    assert "imports posix.system, which no model needs; yoloq does not unpickle it" in message
    assert not marker.exists()


def test_every_way_a_pickle_can_call_code_is_refused(tmp_path):
    # protocol 4: STACK_GLOBAL with memoized strings
    with pytest.raises(PickleRefused, match="imports posix.system"):  # os.system is posix.system
        pickle_imports(pickle.dumps({"a": os.system}, protocol=4))
    # an import whose name is computed at load time: STACK_GLOBAL(str("os"), "system")("echo")
    computed = b"\x80\x04\x8c\x08builtins\x8c\x03str\x93\x8c\x02os\x85R\x8c\x06system\x93\x8c\x04echo\x85R."
    with pytest.raises(PickleRefused, match="computes the name of an import"):
        pickle_imports(computed)
    # a model class called with a config (YOLO model constructors eval strings from it), directly or via the memo
    called = b"\x80\x02cmodels.yolo\nDetectionModel\nq\x00}q\x01X\x03\x00\x00\x00cfgq\x02X\x01\x00\x00\x00xs\x85R."
    with pytest.raises(PickleRefused, match="calls the model class models.yolo.DetectionModel"):
        pickle_imports(called)
    memoized = b"\x80\x02cmodels.yolo\nDetectionModel\nq\x00)\x81q\x01h\x00}q\x02\x85q\x03Rq\x04."
    with pytest.raises(PickleRefused, match="calls the model class"):
        pickle_imports(memoized)
    # a model class handed to an allowed function that calls it (torch._tensor._rebuild_from_type_v2(func, ...))
    handed = (
        b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\nq\x00(cultralytics.nn.tasks\nDetectionModel\nq\x01"
        b"ctorch\nTensor\nq\x02}q\x03\x85q\x04}q\x05tq\x06R."
    )
    with pytest.raises(PickleRefused, match="passes the model class ultralytics.nn.tasks.DetectionModel"):
        pickle_imports(handed)
    with pytest.raises(PickleRefused, match="extension registry"):
        pickle_imports(b"\x80\x02\x82\x01.")
    # what checkpoints do is followed: protocol 4 memo, OrderedDict, a model class instantiated with NEWOBJ
    assert pickle_imports(pickle.dumps(collections.OrderedDict(a=1), protocol=4)) == ["collections.OrderedDict"]
    assert pickle_imports(instance_of("models.yolo", "Model")) == ["models.yolo.Model"]
    evil = zipped_pickle(tmp_path / "called.pt", called)
    assert "yoloq does not unpickle it" in _error(evil)


def test_safe_globals_are_model_classes_only(tmp_path):
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    path = tmp_path / "x.pt"
    pairs = safe_globals_for(path, ("ultralytics.nn.tasks.DetectionModel", "collections.OrderedDict"))
    assert pairs == [
        (DetectionModel, "ultralytics.nn.tasks.DetectionModel"),
        (collections.OrderedDict, "collections.OrderedDict"),
    ]
    with pytest.raises(InputError, match="is not a model class"):
        safe_globals_for(path, ("ultralytics.utils.checks.check_requirements",))  # a function: it could be called
    with pytest.raises(InputError, match="is not a model class"):
        safe_globals_for(path, ("ultralytics.nn.tasks.torch",))  # a module imported there
    with pytest.raises(InputError, match="is not a model class"):
        safe_globals_for(path, ("ultralytics.utils.JSONDict",))  # a class, but no model: it writes a file
    with pytest.raises(InputError, match="which the installed packages lack"):
        safe_globals_for(path, ("ultralytics.nn.tasks.NoSuchModel",))


def test_training_arguments_of_ultralytics_checkpoints_are_data():
    pytest.importorskip("ultralytics")
    from ultralytics.utils import IterableSimpleNamespace

    args = pickle.dumps({"train_args": IterableSimpleNamespace(epochs=3, data="coco.yaml")}, protocol=2)
    assert pickle_imports(args) == ["ultralytics.utils.IterableSimpleNamespace"]  # called by the pickle, allowed
    pairs = safe_globals_for(Path("x.pt"), ("ultralytics.yolo.utils.IterableSimpleNamespace",))  # 8.0.x name
    assert pairs == [(IterableSimpleNamespace, "ultralytics.yolo.utils.IterableSimpleNamespace")]
