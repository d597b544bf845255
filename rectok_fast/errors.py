"""The user-error type of the pipelines: problems with what a user handed us, not bugs.

Ops and modules raise ``ValueError`` / ``TypeError`` naming the argument: those are programming
errors of the caller and keep their tracebacks.  The pipelines (configs, data, paths, checkpoints,
command-line arguments, the run directory, the disk) raise a :class:`UserError` instead; the CLI
prints it as one line ``rectok-fast CMD: error: MESSAGE`` and exits 2 (``--debug`` shows the
traceback).  Each subclass also derives from the builtin exception a library caller would expect
(``ConfigKeyError`` is a ``KeyError``, ``PathError`` a ``FileNotFoundError`` ...), so ``except
ValueError`` code keeps working.

This module imports nothing from the package (every layer may raise these).
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "ConfigError",
    "ConfigKeyError",
    "ConfigTypeError",
    "DataError",
    "DeviceError",
    "DiskFullError",
    "PathError",
    "RunDirError",
    "TrainingInterrupted",
    "UserError",
]


class UserError(Exception):
    """Something the user can fix (a config value, a file, an argument).  ``kind`` names the category;
    the message names the key, file or argument."""

    kind = "error"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, ValueError):
    """A config file or ``key=value`` override that is malformed or out of range (names the key)."""

    kind = "config"


class ConfigKeyError(ConfigError, KeyError):
    """An unknown config key."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type."""


class ArgumentError(UserError, ValueError):
    """A command-line argument out of range (names the option)."""

    kind = "argument"


class DataError(UserError, ValueError):
    """A dataset that cannot be read (names the file): corrupt images, an empty folder, bad labels."""

    kind = "data"


class PathError(UserError, FileNotFoundError):
    """A path that does not exist or is not what it should be."""

    kind = "path"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is unreadable, truncated or of another model kind (says what the file holds)."""

    kind = "checkpoint"


class RunDirError(UserError, FileExistsError):
    """A run directory that already holds a run (pass ``--resume`` or ``--overwrite``)."""

    kind = "run-dir"


class DeviceError(UserError, RuntimeError):
    """A device that was asked for and is not there (``--device cuda`` without a visible GPU)."""

    kind = "device"


class DiskFullError(UserError, OSError):
    """The disk filled up while writing ``path`` (the previous checkpoint is left intact)."""

    kind = "disk"

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


class TrainingInterrupted(BaseException):
    """SIGTERM / SIGINT stopped training at a step boundary after a checkpoint was written.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that ``except Exception`` code does not swallow
    it.  ``signum``: the signal; ``checkpoint``: where the state is; ``step``: the step it holds.
    The CLI prints one line and exits ``128 + signum`` (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        import signal

        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        where = f"checkpoint {checkpoint} holds step {step}" if checkpoint else f"no checkpoint written (step {step})"
        super().__init__(f"interrupted by {name}: {where}; continue with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return str(self.args[0])
