from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows.context import new_run_folder
from flows.prepare import simplify_check_images
from flows.stages import _build_artifacts, fp16_vs_int8
from flows.tracking import error_message
from tests.conftest import CALIB_IMAGES, PROJECT, VAL_IMAGES
from yoloq.backends import BuiltModel
from yoloq.config import VariantConfig, load_params
from yoloq.preprocess import list_images
from yoloq.report import VariantResult


def result(name: str, precision: str, map50_95: float, ips: float, latency: float) -> VariantResult:
    return VariantResult(name, precision, "tensorrt", map50_95, 0.5, latency, ips, 32, 5.0, Path("x.engine"))


def test_int8_variants_get_map_delta_and_speedup_against_fp16():
    results = [
        result("fp32", "fp32", 0.3356, 3450, 1.458),
        result("fp16", "fp16", 0.3361, 9877, 0.572),
        result("int8-qdq", "int8", 0.3419, 7620, 0.683),
    ]
    metrics = fp16_vs_int8(results)
    assert round(metrics["int8-qdq.delta_map50_95_vs_fp16"], 4) == 0.0058
    assert round(metrics["int8-qdq.speedup_vs_fp16"], 3) == 0.771
    assert set(metrics) == {
        "int8-qdq.delta_map50_95_vs_fp16",
        "int8-qdq.speedup_vs_fp16",
        "int8-qdq.latency_ratio_vs_fp16",
    }
    assert fp16_vs_int8(results[:1] + results[2:]) == {}  # no fp16 variant, nothing to compare


def test_build_artifacts_are_the_files_a_tensorrt_build_left(tmp_path):
    engine = tmp_path / "trt-int8.engine"
    for path in (engine, tmp_path / "trt-int8.json", tmp_path / "build.log", tmp_path / "timing.cache"):
        path.write_bytes(b"x")
    details = {
        "build_log": str(tmp_path / "build.log"),
        "timing_cache": str(tmp_path / "timing.cache"),
        "calibration_cache": str(tmp_path / "missing.cache"),  # not written: not logged
    }
    variant = VariantConfig(name="int8", precision="int8", quantization="implicit", backend="tensorrt")
    built = BuiltModel(variant, engine, 1.0, 10.0, details)
    names = sorted(p.name for p in _build_artifacts(built))
    assert names == ["build.log", "timing.cache", "trt-int8.json"]
    onnx_build = BuiltModel(VariantConfig(name="fp32"), tmp_path / "m.onnx", 1.0, 0.0)
    assert _build_artifacts(onnx_build) == []


class StopSignal(BaseException):
    """Stands for Prefect's TerminationSignal: a BaseException that is not an Exception."""


def test_error_message_names_the_stop_signal_even_when_prefect_fails_while_handling_it():
    # CI saw this: SIGTERM struck while Prefect created a task run, and its crash handler raised a ValueError
    try:
        try:
            raise StopSignal()
        except StopSignal:
            raise ValueError("Task run is not set")  # noqa: B904 (Prefect raises it this way)
    except ValueError as exc:
        error = exc
    assert error_message(error) == (
        "StopSignal: the run was stopped (cancelled, interrupted or killed) (then ValueError: Task run is not set)"
    )
    assert error_message(StopSignal()) == "StopSignal: the run was stopped (cancelled, interrupted or killed)"
    assert error_message(KeyboardInterrupt("by user")) == "KeyboardInterrupt: by user"


def test_error_message_of_an_ordinary_error_is_the_error_itself():
    try:
        try:
            raise OSError("disk full")
        except OSError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as exc:
        error = exc
    assert error_message(error) == "RuntimeError: export failed"
    assert error_message(ValueError()) == "ValueError: (no message)"


def test_simplify_checks_on_calibration_images_when_the_run_calibrates():
    params = load_params(PROJECT / "params.yaml", ["simplify.check_images=3"])
    validation = list_images(VAL_IMAGES)
    assert simplify_check_images(params, validation) == list_images(CALIB_IMAGES)[:3]


def test_simplify_checks_on_validation_images_without_a_calibration_folder_or_int8(tmp_path):
    validation = list_images(VAL_IMAGES)
    # the crash seen on main: fp32 only, no calibration folder -> FileNotFoundError listing it
    fp32_only = ["variants=[{name: fp32, precision: fp32}]", "simplify.check_images=2"]
    missing = load_params(PROJECT / "params.yaml", [*fp32_only, f"calibration.images={tmp_path / 'absent'}"])
    assert simplify_check_images(missing, validation) == validation[:2]
    # the folder exists but no variant needs calibration: its images are not read at all
    not_needed = load_params(PROJECT / "params.yaml", fp32_only)
    assert simplify_check_images(not_needed, validation) == validation[:2]
    # an empty calibration folder: validation images too
    (tmp_path / "empty").mkdir()
    empty_folder = f"calibration.images={tmp_path / 'empty'}"
    empty = load_params(PROJECT / "params.yaml", ["simplify.check_images=2", empty_folder])
    assert simplify_check_images(empty, validation) == validation[:2]


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    second = time.strptime("2025-06-01 12:00:00", "%Y-%m-%d %H:%M:%S")
    first = new_run_folder(tmp_path / "runs", "yolov5n", second)
    again = new_run_folder(tmp_path / "runs", "yolov5n", second)
    assert (first.name, again.name) == ("yolov5n-20250601-120000", "yolov5n-20250601-120000-2")
    assert first.is_dir() and again.is_dir()  # created here: no other run can take them
    with ThreadPoolExecutor(8) as pool:  # concurrent runs
        folders = list(pool.map(lambda _: new_run_folder(tmp_path / "runs", "yolov5n", second), range(8)))
    assert len(set(folders)) == 8 and not {first, again} & set(folders)


class FakeTracker:
    """Records what the flow logs, run by run."""

    client = None
    parent_run_id = "parent"

    def __init__(self) -> None:
        self.artifacts: dict[str, list[tuple[str, str | None]]] = {}
        self.metrics: dict[str, dict[str, float]] = {}
        self.tags: dict[str, dict[str, str]] = {}

    def start_child(self, name: str, params: dict[str, str], kind: str | None = None, datasets: tuple = ()) -> str:
        return f"run-{name}"

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self.metrics.setdefault(run_id, {}).update(metrics)

    def log_artifacts(self, run_id: str, paths: list[Path], folder: str | None = None) -> None:
        self.artifacts.setdefault(run_id, []).extend((p.name, folder) for p in paths)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.tags.setdefault(run_id, {}).update(tags)

    def finish(self, run_id: str) -> None:
        pass


def test_tensorrt_variants_are_profiled_into_their_own_child_run(monkeypatch, tmp_path):
    import flows.stages as quantize
    from tasks.profile import ProfileOutcome
    from tests.conftest import PROJECT
    from yoloq.config import load_params
    from yoloq.report import GateVerdict

    profiled = []

    def fake_profile(built: BuiltModel, params, out_dir: Path) -> ProfileOutcome:
        profiled.append((built.variant.name, out_dir))
        if built.variant.name == "int8-minmax":
            return ProfileOutcome(error="RuntimeError: TensorRT reported no layer times")
        out_dir.mkdir(parents=True)
        (out_dir / "profile.md").write_text("# profile\n")
        return ProfileOutcome([out_dir / "profile.md"], {"profile.total_ms": 2.5, "profile.fp32_convs": 1.0})

    monkeypatch.setattr(quantize, "profile_task", fake_profile)
    monkeypatch.setattr(quantize, "register_variants", lambda *args, **kwargs: None)
    import flows.results

    monkeypatch.setattr(flows.results, "create_markdown_artifact", lambda **kwargs: None)
    params = load_params(PROJECT / "params.yaml")
    variants = {
        "fp32": VariantConfig(name="fp32", backend="onnxruntime"),
        "int8-qdq": VariantConfig(name="int8-qdq", precision="int8", quantization="qdq", backend="tensorrt"),
        "int8-minmax": VariantConfig(name="int8-minmax", precision="int8", quantization="implicit", backend="tensorrt"),
    }
    results = [
        VariantResult(name, v.precision, v.backend, 0.33, 0.5, 1.0, 100.0, 32, 5.0, tmp_path / f"{name}.bin")
        for name, v in variants.items()
    ]
    builds = {name: BuiltModel(v, tmp_path / f"{name}.bin", 5.0, 0.0) for name, v in variants.items()}
    outcome = quantize.FlowOutcome(results, GateVerdict(True, []), "parent", "sqlite://", tmp_path / "report")
    tracker = FakeTracker()
    from flows.context import RunContext

    ctx = RunContext(params, tracker, tmp_path / "cache", tmp_path / "report")
    quantize._log_results(ctx, outcome, dict.fromkeys(variants, "| ap |"), builds, None, None)
    assert profiled == [
        ("int8-qdq", tmp_path / "report" / "int8-qdq" / "profile"),
        ("int8-minmax", tmp_path / "report" / "int8-minmax" / "profile"),
    ]  # ONNX Runtime variants are not profiled
    assert ("profile.md", "profile") in tracker.artifacts["run-int8-qdq"]
    assert tracker.metrics["run-int8-qdq"]["profile.total_ms"] == 2.5
    assert "profile.total_ms" not in tracker.metrics["run-fp32"]
    assert tracker.tags["run-int8-minmax"] == {"profile.error": "RuntimeError: TensorRT reported no layer times"}


def test_the_cpu_and_its_instruction_set_are_recorded(tmp_path):
    from flows.tracking import cpu_description

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse4_2 avx avx2 fma\n\nprocessor\t: 1\n"
    )
    assert cpu_description(cpuinfo) == {"host.cpu": "Some CPU @ 2.0GHz", "host.isa": "sse4_2 avx avx2 fma"}
    assert cpu_description(tmp_path / "missing")["host.isa"] == "unknown"
