"""A real child process past its deadline is killed; results and errors cross the process boundary."""

from __future__ import annotations

import os
import time

import pytest

from yoloq.deadline import ChildProcessFailed, DeadlineExceeded, call_with_deadline
from yoloq.errors import InputError


def hanging_build(seconds: float, pid_file: str) -> str:
    with open(pid_file, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(seconds)  # stands in for a TensorRT build stuck in C++ code
    return "built"


def bad_input(path: str) -> None:
    raise InputError(f"{path}: not an ONNX model")


def dies() -> None:
    os._exit(9)


def test_a_hung_build_is_killed_at_its_deadline(tmp_path):
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"build fp16 did not finish within 1 s.*build.timeout_s"):
        call_with_deadline(hanging_build, (60.0, str(pid_file)), 1.0, "build fp16")
    assert time.monotonic() - start < 30
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the child is gone, not left running in the background
        os.kill(pid, 0)


def test_result_and_errors_come_back(tmp_path):
    assert call_with_deadline(hanging_build, (0.0, str(tmp_path / "pid")), 60, "build") == "built"
    with pytest.raises(InputError, match="not an ONNX model"):  # a bad input fails once, with its own type
        call_with_deadline(bad_input, ("x.onnx",), 60, "build")
    with pytest.raises(ChildProcessFailed, match="exit code 9"):
        call_with_deadline(dies, (), 60, "build")
