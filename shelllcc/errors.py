"""Exceptions that the command line turns into one line and an exit code instead of a traceback.

``experiments.main`` prints ``error: <message>`` for these and exits with the class's ``exit_code``; the
message must name what the user has to change (config key, file, shape), because that line is all they see.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a config value, an input file, a resume the checkpoint refuses."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value that makes no sense; the message names the dotted key. A ``ValueError`` too, so
    callers that caught the ``ValueError`` these checks used to raise keep working."""


class InputFileError(UserError, ValueError):
    """An input file that cannot be read or holds the wrong thing; the message names the file."""


class TrainingFailed(Exception):
    """The run could not produce a trustworthy result (diverged, most steps non-finite): nothing final
    was saved. A distinct exit code from a crash (1) and a user error (2), so a scheduler can tell."""

    exit_code = 3


__all__ = ["UserError", "ConfigError", "InputFileError", "TrainingFailed"]
