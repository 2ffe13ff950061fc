"""Expected errors print one line: a logging filter that drops the traceback of records about a YoloqError.

Prefect logs every exception that ends a task or flow run with its traceback ("Encountered exception during
execution"), before the CLI prints its own one-line message. For a YoloqError (bad input, failed gate) that message
says all there is to say, so the filter keeps the record's line and drops its traceback; any other exception keeps
its traceback. Records and handlers are untouched otherwise.
"""

from __future__ import annotations

import logging

from yoloq.errors import YoloqError

PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine")


class ExpectedErrorFilter(logging.Filter):
    """Keep every record; for one whose exception is a YoloqError, drop the traceback (the line stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, YoloqError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_expected_errors(logger_names: tuple[str, ...] = PREFECT_RUN_LOGGERS) -> None:
    """Install the filter on these loggers (once each)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedErrorFilter) for f in logger.filters):
            logger.addFilter(ExpectedErrorFilter())
