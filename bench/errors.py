"""Errors the harness raises for bad input. Each message names the file, row or cell and the fix."""


class BenchError(Exception):
    """Base class: a problem the user can fix. The CLI prints the message without a traceback."""


class DatasetError(BenchError):
    """A dataset file, row, label or mask is missing, corrupt or inconsistent."""


class BackboneError(BenchError):
    """The CLIP backbone or its weights cannot be loaded."""


class MethodError(BenchError):
    """A method is unknown, misconfigured, or produced invalid output."""


class ConfigError(BenchError):
    """A run configuration (YAML or flags) is invalid."""


class ResultsError(BenchError):
    """A results directory is unreadable or inconsistent."""
