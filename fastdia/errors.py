"""Exceptions raised by fastdia.

Every error names the problem and the fix. All derive from :class:`FastdiaError`, which is
a ``ValueError`` so that callers validating input can catch either.
"""

from __future__ import annotations


class FastdiaError(ValueError):
    """Base class of every error fastdia raises on bad input or missing assets."""


class ConfigError(FastdiaError):
    """An argument or option is out of range or unknown."""


class AssetMissingError(FastdiaError):
    """An offline asset (package, model folder, file) is not installed or not found."""


class CheckpointError(FastdiaError):
    """A checkpoint is missing, corrupt, or was made for another base model."""
