"""The errors a run stops with, in one light module that entry points catch without importing the pipeline.

Each is a one-line message: the command line prints it after ``error:`` and exits non-zero.
"""
from __future__ import annotations


class RunFinishedError(ValueError):
    """The run already has a readable ``result.json``; training it again needs ``overwrite``."""


class NonFiniteError(RuntimeError):
    """A loss, an adapter tensor or a logit became NaN or infinite; nothing is saved as a result."""

