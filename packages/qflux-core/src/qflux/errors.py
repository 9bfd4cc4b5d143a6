"""Errors the CLI reports as one message and an exit code, without a traceback (``--debug`` shows it).

``UserError`` (exit 2): a mistake the user can fix. ``TrainingStopped`` (exit 3): the run stopped itself on
purpose (diverged loss), keeping its last good checkpoint.
"""

from __future__ import annotations


class QfluxError(Exception):
    """Base of errors that end a command with ``exit_code`` and ``str(err)`` as the whole message."""

    exit_code = 1


class UserError(QfluxError):
    """A mistake the user can fix (config, data, paths, missing plugin). ``str(err)`` is the whole message."""

    exit_code = 2


class ConfigError(UserError):
    """The config file or an override is invalid; the message names the key path."""


class DataError(UserError):
    """A dataset is missing, empty or has bad samples; the message names the file."""


class PluginError(UserError):
    """A plugin is missing, broken or conflicts with another one."""


class TrainingStopped(QfluxError):
    """The run stopped on purpose (non-finite loss); the message says why and which checkpoint is kept."""

    exit_code = 3
