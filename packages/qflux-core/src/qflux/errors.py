"""Errors a user can cause. The CLI turns them into one message and exit code 2 (``--debug``: traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (config, data, paths, missing plugin). ``str(err)`` is the whole message."""

    exit_code = 2


class ConfigError(UserError):
    """The config file or an override is invalid; the message names the key path."""


class DataError(UserError):
    """A dataset is missing, empty or has bad samples; the message names the file."""


class PluginError(UserError):
    """A plugin is missing, broken or conflicts with another one."""
