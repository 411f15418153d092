"""Errors the CLI turns into one sentence on stderr and a non-zero exit (never a traceback)."""


class EnsembleError(Exception):
    """Base class: the message is a complete sentence meant for the user."""

    exit_code = 1


class ConfigError(EnsembleError):
    """A config file, override or command-line argument is wrong."""

    exit_code = 2


class DataError(EnsembleError):
    """A data set is missing or malformed."""

    exit_code = 3


class CheckpointError(EnsembleError):
    """A checkpoint is missing, damaged or belongs to another model."""

    exit_code = 4


class TrainingError(EnsembleError):
    """Training of one model failed (non-finite loss, crashed actor beyond its restarts)."""

    exit_code = 5
