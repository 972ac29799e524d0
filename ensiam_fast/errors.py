"""The one user-error type: a condition the user can cause (a config key, a file on disk, a second
launch, a full disk) raises ``UserError`` or a subclass, carrying the line to print. Every ``main``
catches this class only and prints ``error: <line>`` with exit code 2; anything else (a bug in the
project or in a library) is a traceback.

This module imports nothing (config.py and its parts raise ConfigError and must stay light); how the line is printed
and how several processes agree on it is in ``ensiam_fast/distributed.py`` (``report``, ``agreed``)."""

from __future__ import annotations


class UserError(Exception):
    """A run that cannot start or cannot go on because of something the user can change; ``str(e)``
    is the line to print (what is wrong, naming the file/key/value, and what to do).

    ``shared``: every process raised this same error, so the first one reports it for all."""

    shared: bool = True


class TrainingError(UserError):
    """A training run that cannot start or cannot go on; the message says why and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key (a user error; still a ValueError for
    callers that catch that)."""
