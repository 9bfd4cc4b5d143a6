"""Errors the CLI reports as one message and an exit code, without a traceback (``--debug`` shows it).

``UserError`` (exit 2): a mistake the user can fix. ``TrainingStopped`` (exit 3): the run stopped itself on
purpose (diverged loss), keeping its last good checkpoint.
"""

from __future__ import annotations

import errno


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


class ConfigDeprecation(FutureWarning):
    """A config key that still works but moved; the CLI prints it as one ``warning:`` line."""


class TrainingStopped(QfluxError):
    """The run stopped on purpose (non-finite loss); the message says why and which checkpoint is kept."""

    exit_code = 3


def write_failure(err: OSError, what: str, key: str = "output.dir") -> UserError:
    """A ``UserError`` for a failed write of ``what`` (a full disk, a read-only folder, a file size limit):
    names the file and the reason and says what to do."""
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"the disk is full: free space on it or set {key} to a disk with room"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"the folder is not writable: make it writable or set {key} to a writable folder"
    elif err.errno == errno.EFBIG:
        fix = "a file size limit stopped the write (ulimit -f): raise it"
    else:
        fix = f"check the disk or set {key} to another folder"
    return UserError(f"cannot write {what}{where}: {reason}; {fix}")
