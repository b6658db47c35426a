"""Exceptions raised by tbkd_lib. Every message names the file and what was expected."""
from __future__ import annotations

__all__ = ["TbkdError", "DataError", "CheckpointError", "ConfigError"]


class TbkdError(Exception):
    """Base class of every error tbkd_lib raises on purpose."""


class DataError(TbkdError, ValueError):
    """A data file is missing, unreadable or inconsistent.

    ``path`` is the offending file (or folder); ``problem`` says what was expected.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CheckpointError(TbkdError):
    """A checkpoint is truncated, not a tbkd checkpoint, or carries code (refused)."""


class ConfigError(TbkdError, ValueError):
    """A configuration value is invalid (unknown field, preset, arch, ...)."""
