"""Servers on loopback for the real-server tests and the browser check: a free port, waiting until a server
answers (with its logs' tails when it does not), and a health probe."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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
