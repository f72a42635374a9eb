"""Writing files so that a reader never sees half of one: every result, checkpoint and cache goes through here.

``atomic_write(path, write)`` lets ``write`` fill a temporary file in the same
folder, then renames it onto ``path`` (``os.replace`` is atomic on POSIX): a run
killed mid-write leaves the old file or none, never a truncated one (its
temporary file, ``.<name>.<random>.tmp``, is what ``remove_temporaries`` clears). A failure
to write is one ``WriteError`` (an ``OSError``) naming ``path`` (never the temporary file),
whatever the writer raised: Python's ``OSError``, safetensors' ``SafetensorError`` ("os error 28")
or torch's zip writer (``torch_save`` writes through a Python file, so that a full disk keeps its
errno instead of becoming "unexpected pos"). A full disk (ENOSPC, EDQUOT) says to free space
and run the same command again: every writer of a run resumes from what it had saved. Used by both
packages (``lora_zoo`` and ``datasets``). Files get
the permissions of a normally created file (``0666`` minus the umask, ``share``), so
results are readable by collaborators on a shared filesystem. ``sha256_file(path)``
is the checksum saved files are recorded and verified with, ``sha256_json(data, key)`` that of a
JSON record's content. ``without_cache(what, err)`` is the rule of every cache (the zero-shot accuracies,
the preprocessed test images, a head's features): one that cannot be written (a read-only folder or
filesystem) is skipped with one warning per process and cache; any other failure is raised again.
Ctrl-C or SIGTERM arriving while a file is written is held until the file is in place (``interrupts_held``):
raised inside torch's zip writer it would leave a checkpoint unwritten and surface as torch's "unexpected pos"
error instead of the run's one-line "interrupted" message. A second signal during the same write is not held.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

#: the errno values of a full disk: no space left, quota exceeded
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
#: errno values of a cache that cannot be written (a full disk is not one: it stops the run)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_told: set[str] = set()  # the caches this process said it runs without: each is said once
logger = logging.getLogger(__name__)
TEMPORARY_SUFFIX = ".tmp"  # atomic_write's temporary files: .<name>.<random>.tmp beside the file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: setting it (the only way to read it) races with files other threads create


def errno_of(err: Optional[BaseException]) -> Optional[int]:
    """The errno behind a failed write, wherever its writer put it: an ``OSError``'s; the text of safetensors'
    error ("... (os error 28)"); the ``OSError`` that torch's zip writer caught before raising its own
    ``RuntimeError`` ("unexpected pos ...": the exception's context). None when there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found:
            return int(found.group(1))
        err = err.__cause__ or err.__context__
    return None


class WriteError(OSError):
    """A failed write, as one line naming the file the caller asked for; ``errno`` is the cause's (None when the
    writer did not say). On a full disk the line says how to go on."""

    def __init__(self, path, code: Optional[int], reason: str):
        super().__init__(code, reason)
        self.path, self.head = Path(path), f"cannot write {path}: {reason}"

    @property
    def disk_full(self) -> bool:
        return self.errno in FULL_DISK

    def __str__(self) -> str:
        if self.disk_full:
            return f"{self.head}; free space and run the same command again to resume the run"
        return self.head

    def __reduce__(self):
        return type(self), (self.path, self.errno, self.strerror)


def write_error(path, err: BaseException) -> Optional[WriteError]:
    """``err``, raised while writing ``path``, as a ``WriteError`` naming ``path``; None when it is not a failure
    to write (a writer's own error, such as an image that does not decode, goes on as it was raised)."""
    if isinstance(err, WriteError):
        return err
    code = errno_of(err)
    if code is None and not isinstance(err, OSError):
        return None
    reason = os.strerror(code) if code is not None else (getattr(err, "strerror", None) or " ".join(str(err).split()))
    return WriteError(path, code, reason)


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """While inside, the first SIGINT or SIGTERM is recorded instead of handled, and delivered to its own handler
    on leaving (so Ctrl-C raises ``KeyboardInterrupt`` after the write, not in the middle of it); a second
    signal is handled at once. Only the main thread receives signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in HELD_SIGNALS}

    def hold(signum, frame):
        if held:  # the second: handled now, and the first is not delivered again on leaving
            held.clear()
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                _restore(previous)
                signal.raise_signal(signum)
            return
        held.append(signum)

    for signum in HELD_SIGNALS:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        _restore(previous)
        if held:
            signal.raise_signal(held[0])  # its own handler now: KeyboardInterrupt, or the process ends


def _restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def atomic_write(path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same folder); returns ``path``. Ctrl-C and SIGTERM
    wait until it has returned (``interrupts_held``)."""
    with interrupts_held():
        return _atomic_write(Path(path), write)


def _atomic_write(path: Path, write: Callable[[str], Any]) -> Path:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
        os.close(fd)
        write(tmp)
        share(tmp)
        synced = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(synced)  # on disk before the rename: a power cut leaves the old file, not an empty one
        finally:
            os.close(synced)
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - each writer reports a failed write its own way
        failure = write_error(path, err)  # names the file the caller asked for, not the temporary one
        if failure is None:
            raise
        raise failure from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path



def without_cache(what: str, err: OSError) -> None:
    """Let a read-only cache go (``err`` is raised again otherwise), saying so once per process and cache."""
    if errno_of(err) not in READ_ONLY:
        raise err
    if what not in _told:
        _told.add(what)
        logger.warning("%s is not writable (%s): running without that cache", what, os.strerror(errno_of(err)))


def remove_temporaries(folder) -> list[Path]:
    """Remove the temporary files ``atomic_write`` left in ``folder`` when its process was killed mid-write;
    returns them. Only for a folder this process owns (a claimed run folder): another writer's would go too."""
    removed = []
    for stale in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def share(path) -> None:
    """Give ``path`` the permissions of a normally created file (``0666`` minus the umask): readable by others."""
    os.chmod(path, 0o666 & ~_UMASK)


def torch_save(obj, path) -> None:
    """``torch.save(obj, path)`` through a Python file: a failed write raises the ``OSError`` (a full disk: ENOSPC)
    that torch's own file writer reports as "unexpected pos ..." without an errno."""
    import torch

    with open(path, "wb") as handle:
        torch.save(obj, handle)


def reserve(path) -> None:
    """Allocate the disk blocks of ``path``'s current length now (``posix_fallocate``): a full disk is then ENOSPC
    here rather than a SIGBUS when a page of a memory map of it is first written. Where the filesystem cannot
    (or the platform has no ``posix_fallocate``), the file is left as it is."""
    size = os.path.getsize(path)
    if not hasattr(os, "posix_fallocate") or size == 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def write_text(path, text: str) -> Path:
    """``text``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, data) -> Path:
    """``data`` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def sha256_json(data: dict, leave_out: str) -> str:
    """The sha256 hex digest of ``data`` without its key ``leave_out``, as canonical JSON (sorted keys, no spaces):
    the same for the dictionary a writer holds and for what ``json.loads`` reads back from ``write_json``."""
    content = {key: value for key, value in json.loads(json.dumps(data)).items() if key != leave_out}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 hex digest of the bytes of ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
