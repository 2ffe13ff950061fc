"""Expected errors (YoloqError) keep their log line and lose their traceback; any other error keeps both."""

from __future__ import annotations

import io
import logging

from yoloq.errors import GateFailed, InputError
from yoloq.logs import ExpectedErrorFilter, quiet_expected_errors


def logged(error: Exception) -> str:
    stream = io.StringIO()
    logger = logging.getLogger(f"test.logs.{type(error).__name__}")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.addFilter(ExpectedErrorFilter())
    try:
        try:
            raise error
        except Exception as exc:
            logger.error("Encountered exception during execution: %r", exc, exc_info=True)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_a_yoloq_error_logs_one_line():
    for error in (InputError("labels.txt:2: class 91 is out of range"), GateFailed("accuracy gate failed: int8")):
        text = logged(error)
        assert "Traceback" not in text and text.count("\n") == 1 and str(error) in text


def test_an_unexpected_error_keeps_its_traceback():
    text = logged(RuntimeError("a bug"))
    assert "Traceback (most recent call last)" in text and "RuntimeError: a bug" in text


def test_the_filter_goes_on_prefects_run_loggers_once():
    quiet_expected_errors()
    quiet_expected_errors()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        filters = [f for f in logging.getLogger(name).filters if isinstance(f, ExpectedErrorFilter)]
        assert len(filters) == 1
