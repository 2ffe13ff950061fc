"""TensorRTRunner with fake tensorrt / polygraphy.cuda modules: every device buffer, the stream and the TensorRT
objects are released on close, on leaving `with`, and when the constructor fails half-way."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from tests.fake_tensorrt import OUTPUT, FakeDevice, install
from yoloq.backends import closing_runner
from yoloq.backends.tensorrt.runner import TensorRTRunner
from yoloq.errors import InputError


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(b"engine bytes")
    return path


def assert_all_released(device: FakeDevice) -> None:
    gc.collect()
    assert device.allocated == {}, "device buffers leaked"
    assert device.streams_open == 0, "CUDA stream leaked"
    assert device.alive() == [], "TensorRT objects still referenced"


def test_runner_runs_and_frees_everything_on_leaving_with(monkeypatch, engine):
    device = install(monkeypatch)
    with TensorRTRunner(engine) as runner:
        assert (runner.min_batch, runner.opt_batch, runner.max_batch) == (1, 8, 32)
        assert len(device.allocated) == 2 and device.streams_open == 1
        output = runner.infer(np.zeros((2, 3, 64, 64), dtype=np.float32))
        assert output.shape == (2, 84, 10) and device.executions == 1
    assert sorted(device.freed) == sorted({0x1000, 0x2000})
    assert_all_released(device)
    runner.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        runner.execute()


def test_constructor_failing_after_allocating_frees_what_it_allocated(monkeypatch, engine):
    device = install(monkeypatch, FakeDevice(reject_address_of=OUTPUT))
    with pytest.raises(RuntimeError, match=f"rejected the device buffer of tensor '{OUTPUT}'"):
        TensorRTRunner(engine)
    assert device.mallocs == 2 and len(device.freed) == 2
    assert_all_released(device)


def test_out_of_memory_on_the_second_buffer_frees_the_first(monkeypatch, engine):
    device = install(monkeypatch, FakeDevice(fail_malloc_at=1))
    with pytest.raises(RuntimeError, match="out of memory"):
        TensorRTRunner(engine)
    assert device.freed == [0x1000]
    assert_all_released(device)


def test_an_engine_tensorrt_cannot_load_is_bad_input_and_leaks_nothing(monkeypatch, tmp_path):
    device = install(monkeypatch)
    junk = tmp_path / "junk.engine"
    junk.write_bytes(b"not an engine")
    with pytest.raises(InputError, match="TensorRT cannot load .*delete it and build again"):
        TensorRTRunner(junk)
    with pytest.raises(InputError, match="cannot read the engine"):
        TensorRTRunner(tmp_path / "missing.engine")
    assert_all_released(device)


def test_closing_runner_closes_on_error_and_ignores_runners_without_close(monkeypatch, engine):
    device = install(monkeypatch)
    with pytest.raises(ValueError), closing_runner(TensorRTRunner(engine)):
        raise ValueError("validation failed")
    assert_all_released(device)
    with closing_runner(object()) as plain:  # ONNX Runtime runners have nothing to close
        assert plain is not None


class FailingRunner:
    def __init__(self) -> None:
        self.closed = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("TensorRT execute_async_v3 failed")

    def close(self) -> None:
        self.closed = True


def test_yoloq_validate_on_an_engine_closes_its_runner_when_validation_fails(monkeypatch, tmp_path):
    import types

    import flows.cli
    from tests.conftest import VAL_IMAGES, VAL_LABELS

    runner = FailingRunner()
    facts = types.SimpleNamespace(names=[f"c{i}" for i in range(80)], head_format="yolov5", imgsz=640)
    monkeypatch.setattr(flows.cli, "_engine_runner", lambda engine, imgsz: (runner, facts, None))
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine bytes")
    args = ["validate", "--model", str(engine), "--images", str(VAL_IMAGES), "--labels", str(VAL_LABELS)]
    with pytest.raises(RuntimeError, match="execute_async_v3"):
        flows.cli.main([*args, "--num-images", "2"])
    assert runner.closed


def test_plugins_are_registered_before_an_engine_is_deserialized() -> None:
    """An engine holding EfficientNMS_TRT cannot be loaded unless TensorRT's plugins are registered first (measured
    on the H200 kit); TensorRT builds without init_libnvinfer_plugins are left alone."""
    from types import SimpleNamespace

    from yoloq.backends.tensorrt.runner import load_plugins

    calls: list[tuple[object, str]] = []
    load_plugins(
        SimpleNamespace(init_libnvinfer_plugins=lambda logger, namespace: calls.append((logger, namespace))), "L"
    )
    assert calls == [("L", "")]
    load_plugins(SimpleNamespace(), "L")  # no such entry point: nothing to do, no error
