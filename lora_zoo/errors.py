"""The errors a run stops with, in one light module that entry points catch without importing the pipeline.

Each is a one-line message: the command line prints it after ``error:`` and exits non-zero.
"""
from __future__ import annotations


class RunFinishedError(ValueError):
    """The run already has a readable ``result.json``; training it again needs ``overwrite``."""


class NonFiniteError(RuntimeError):
    """A loss, an adapter tensor or a logit became NaN or infinite; nothing is saved as a result."""



class RunClaimedError(ValueError):
    """The run folder is claimed by another process (or already by this one): ``runlock.claim`` refused it.

    The message names the holder's host, pid and start time; ``holder`` holds them as a ``runlock.Holder``
    (None where the holder's record could not be read).
    """

    def __init__(self, message: str, holder=None):
        super().__init__(message)
        self.holder = holder

    def __reduce__(self):  # keep ``holder`` when the error crosses a process boundary (--jobs N, multiprocessing)
        return type(self), (str(self), self.holder)
