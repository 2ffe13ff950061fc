"""Servers on loopback for the real-server tests and the browser check: a free port, waiting until a server
answers (with its logs' tails when it does not), and a health probe."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def small_run_params(tracking_uri: str, output_dir: Path) -> dict[str, Any]:
    """The shipped params.yaml as a dict, cut down for runs against the loopback servers: 16 calibration and 8
    validation images, ONNX Runtime, no INT8 search, a gate 8 images can judge, logging to `tracking_uri`."""
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    data["model"]["path"] = str(PROJECT / "data/models/yolov5n.pt")
    data["calibration"].update(images=str(PROJECT / "data/coco/calib/images"), num_images=16)
    data["validation"].update(
        images=str(PROJECT / "data/coco/val/images"),
        labels=str(PROJECT / "data/coco/val/labels"),
        num_images=8,
        timing={"warmup": 1, "iterations": 2, "batch_size": 8},
    )
    data["backend"] = "onnxruntime"
    data["search"]["enabled"] = False  # the INT8 search has its own end-to-end test (tests/test_flow.py)
    data["gate"]["max_map_drop"] = 0.015  # 8 images cannot resolve the shipped 0.5 point
    data["mlflow"]["tracking_uri"] = tracking_uri
    data["output_dir"] = str(output_dir)
    return data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, logs: Sequence[Path] = ()) -> Any:
    """`check()`'s first truthy value within `timeout_s` (exceptions count as not yet); else RuntimeError with the
    tails of `logs`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # not up yet
            value = None
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs if p.is_file())
    raise RuntimeError(f"{what}: not within {timeout_s:.0f} s\n{tails}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def server_env(root: Path, api_url: str, tracking_uri: str, project: Path, bin_dir: Path) -> dict[str, str]:
    """The environment of Prefect/MLflow servers and the processes that use them: Prefect's home in `root`, the
    two servers' URLs, `project` importable and `bin_dir` (the venv's scripts) first on PATH; no API key."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONPATH": str(project) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PREFECT_API_KEY", None)
    return env


class Processes:
    """Background processes started in `cwd`, each in its own process group with its log in `log_dir`, stopped
    together (SIGTERM, then SIGKILL after 15 s)."""

    def __init__(self, env: dict[str, str], log_dir: Path, cwd: Path) -> None:
        self.env, self.log_dir, self.cwd = env, log_dir, cwd
        self.running: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Path:
        log = self.log_dir / f"{name}.log"
        handle = log.open("w")
        process = subprocess.Popen(
            command, cwd=self.cwd, env=env or self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.running.append((process, handle))
        return log

    def stop_all(self) -> None:
        for process, _ in reversed(self.running):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, handle in reversed(self.running):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
            handle.close()
