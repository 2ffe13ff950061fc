"""Run a function in a child process with a real deadline.

A thread cannot be stopped while it is inside C code (a TensorRT build, a CUDA call), so a timeout on a thread
only stops waiting for it. A child process can be killed: `call_with_deadline` runs `fn(*args)` in a fresh
(spawned) process, returns its result, re-raises its exception, and kills it when the deadline passes.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable
from typing import Any

from yoloq.errors import YoloqError


class DeadlineExceeded(YoloqError):
    """A step ran past its deadline and was killed."""

    exit_code = 2


class ChildProcessFailed(YoloqError):
    """The child process died without a result (killed by a signal, out of memory, a crash in C code)."""

    exit_code = 1


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = fn(*args)
    except BaseException as exc:  # sent back to the parent, which re-raises it
        try:
            conn.send(("error", exc, traceback.format_exc()))
        except Exception:  # the exception itself cannot be pickled: send its text
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), traceback.format_exc()))
    else:
        conn.send(("ok", result, ""))
    finally:
        conn.close()


def call_with_deadline(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float, what: str) -> Any:
    """`fn(*args)` in a spawned child process; DeadlineExceeded (the child is killed) after `timeout_s` seconds.

    `fn` must be importable (a module-level function) and its arguments and result picklable.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, fn, args), name=f"yoloq-{what}", daemon=True)
    start = time.monotonic()
    process.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise DeadlineExceeded(
                f"{what} did not finish within {timeout_s:g} s and was stopped (process {process.pid} killed); "
                "raise build.timeout_s in params.yaml if it needs longer, or look at its build log"
            )
        try:
            status, value, trace = receive.recv()
        except EOFError:
            process.join(5)
            raise ChildProcessFailed(
                f"{what} died after {time.monotonic() - start:.0f} s without a result (exit code {process.exitcode}); "
                "a crash in native code or the out-of-memory killer are the usual causes"
            ) from None
    finally:
        if process.is_alive():
            process.kill()
        process.join(10)
        receive.close()
    if status == "error":
        if trace:
            value.__notes__ = [*getattr(value, "__notes__", []), f"in the {what} process:\n{trace}"]
        raise value
    return value
