"""Prefect's temporary server writes to a log file, not to the terminal (flows/prefect_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.prefect_server import output_redirected_to

PROJECT = Path(__file__).resolve().parents[1]


def test_a_subprocess_started_inside_writes_to_the_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "server.log"
    with open(log, "ab") as stream, output_redirected_to(stream):
        subprocess.run([sys.executable, "-c", "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"])
    print("after the block")
    captured = capfd.readouterr()
    assert "to stdout" not in captured.out and "to stderr" not in captured.err
    assert "after the block" in captured.out
    assert {"to stdout", "to stderr"} <= set(log.read_text().splitlines())


def test_fds_come_back_when_the_block_raises(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), open(tmp_path / "log", "ab") as stream, output_redirected_to(stream):
        raise RuntimeError("boom")
    print("visible")
    assert "visible" in capfd.readouterr().out


@pytest.mark.slow
def test_the_real_temporary_server_logs_to_the_file_and_serves(tmp_path: Path) -> None:
    """A fresh process with no Prefect server configured: the server starts, answers, stops at exit, and the
    terminal sees none of its output (the log file gets it)."""
    log = tmp_path / "runs" / "prefect-server.log"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        import httpx
        from flows.prefect_server import start_temporary_server
        log = Path({str(log)!r})
        url = start_temporary_server(log)
        assert url and httpx.get(url + "/health").status_code == 200, url
        assert start_temporary_server(log) == url  # started once
        print("served", url)
        """
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(PROJECT))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "served http://127.0.0.1:" in result.stdout
    assert "Traceback" not in result.stderr and "Starting temporary server" not in result.stderr
    assert log.read_text().startswith("--- yoloq, pid ")


def test_nothing_starts_when_a_server_is_configured(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_server import start_temporary_server

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert start_temporary_server(tmp_path / "log") is None
    assert not (tmp_path / "log").exists()


def test_a_server_that_does_not_start_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_server import start_temporary_server
    from yoloq.errors import YoloqError

    def fail(timeout: int | None = None) -> None:
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    server = SubprocessASGIServer()  # the process-wide instance (maybe running for an earlier test: restored after)
    monkeypatch.setattr(server, "start", fail)
    monkeypatch.setattr(server, "running", False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(YoloqError) as raised:
        start_temporary_server(tmp_path / "server.log")
    assert "did not start (RuntimeError)" in str(raised.value) and "server.log" in str(raised.value)
