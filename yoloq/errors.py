"""Errors a user can act on. The CLI maps them to exit codes: 2 bad input/config, 3 accuracy gate failed."""


class YoloqError(Exception):
    """Base class: the message says what was wrong and what to do."""

    exit_code = 2


class ConfigError(YoloqError):
    """params.yaml or a --set override is invalid."""


class InputError(YoloqError):
    """A model, image folder or label file cannot be used as given."""


class BackendUnavailable(YoloqError):
    """A variant asks for a backend this machine does not have."""


class GateFailed(YoloqError):
    """A variant lost more accuracy than the gate allows; `document` holds the run's results."""

    exit_code = 3

    def __init__(self, message: str, document: dict | None = None) -> None:
        super().__init__(message)
        self.document = document or {}


class EngineBuildError(YoloqError):
    """A backend (TensorRT) could not build an engine; the message names the variant and the build log."""
