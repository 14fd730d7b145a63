"""Exceptions the CLI turns into one-line messages and a non-zero exit code."""

from __future__ import annotations


class EcoflapError(Exception):
    """A user-facing error: bad input, impossible request, missing optional dependency."""

    exit_code = 2


class ArtifactError(EcoflapError):
    """An artifact (scores, plan, checkpoint) is unreadable, of the wrong kind or inconsistent."""


class PlanError(EcoflapError):
    """A sparsity request or plan cannot be satisfied (budget, caps, N:M with a non-uniform plan)."""


class DataError(EcoflapError):
    """Calibration or evaluation data is missing, empty or malformed."""


class ModelError(EcoflapError):
    """A model cannot be loaded or its family is not supported."""


class MissingDependencyError(EcoflapError):
    """An optional dependency is needed for the requested feature."""

    def __init__(self, package: str, feature: str, extra: str | None = None) -> None:
        hint = f"pip install 'ecoflap[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the optional package '{package}' ({hint})")
