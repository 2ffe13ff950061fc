"""Prefect's temporary server, started by yoloq with its output in a log file instead of the user's terminal.

Without PREFECT_API_URL, Prefect starts a temporary API server (a uvicorn subprocess) on the first flow call and
stops it at exit. That subprocess writes to the terminal it inherited: when it is stopped while a database
connection is being returned to its pool, SQLAlchemy logs "Exception during reset or similar" with an
asyncio.CancelledError traceback after yoloq's table (seen at the end of `make run`, exit code 0). Nothing went
wrong, but a user should not read a traceback after a successful run.

`start_temporary_server(log)` starts the same server (Prefect's own SubprocessASGIServer, the instance its
client would create) before the flow runs, with the subprocess's stdout and stderr going to `log`; the flow's
client then finds it running and uses it, and Prefect stops it at exit as before. With a configured Prefect
server (PREFECT_API_URL or the active profile) it does nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from yoloq.errors import YoloqError


@contextmanager
def output_redirected_to(stream: IO[bytes]) -> Iterator[None]:
    """File descriptors 1 and 2 point at `stream` inside the block (so do subprocesses started in it), then back."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def start_temporary_server(log: Path) -> str | None:
    """Start Prefect's temporary server with its output appended to `log`, when no Prefect server is configured.

    Returns the server's API URL, or None when a Prefect server is configured (nothing started)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    server = SubprocessASGIServer()  # the instance Prefect's client uses when no API URL is set
    if not server.running:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as stream:
            stream.write(f"--- yoloq, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            stream.flush()
            try:
                with output_redirected_to(stream):
                    server.start()
            except Exception as exc:  # Prefect raises RuntimeError (timeout) or httpx errors
                raise YoloqError(
                    f"Prefect's temporary server did not start ({type(exc).__name__}): its output is in {log}; "
                    "or set PREFECT_API_URL to a running Prefect server"
                ) from exc
    return server.api_url
