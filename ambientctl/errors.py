"""The command-line errors every command module raises; `cli._run` turns them into a
message and an exit code."""

from __future__ import annotations


class UsageError(Exception):
    """The command line cannot mean anything (exit 2)."""


class NotFound(Exception):
    """A name the cluster does not have (exit 1); the message lists the ones it has."""
