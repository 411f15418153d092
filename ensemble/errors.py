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


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, `ray job stop`, a batch system): stopped as Ctrl-C stops a
    run, so its actors end and --resume continues it."""


_TERMINATED: list[int] = []  # SIGTERM seen: Ray's blocking calls re-raise a bare
#                              KeyboardInterrupt in place of the handler's exception


def terminated() -> bool:
    """Whether SIGTERM has reached this process since terminate_as_interrupt."""
    return bool(_TERMINATED)


def terminate_as_interrupt() -> None:
    """From now on the first SIGTERM raises Terminated in the main thread (called once Ray has
    started: the driver's Ray core installs a handler of its own, a stack dump and exit)."""
    import signal
    import threading

    def _raise(signum, frame):
        if _TERMINATED:  # a second SIGTERM (`timeout -k`, `ray job stop`) lets cleanup finish
            return
        _TERMINATED.append(signum)
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        _TERMINATED.clear()
        signal.signal(signal.SIGTERM, _raise)
