"""One run, one owner: an exclusive claim on a run folder that the kernel releases when its process dies.

``with claim(folder):`` takes the claim without waiting or raises ``RunClaimedError`` naming the holder
("<folder> is being trained elsewhere (host H, pid P, since T)"); ``claimed_by(folder)`` says who holds it
(a ``Holder``: host, pid, since) or None, without taking it. Imports nothing heavy (a primitive).

How it works, and why:

* The claim is a POSIX record lock (``fcntl.lockf``) on the whole of ``<folder>/.claim``. The kernel drops
  it when the process ends in any way (``kill -9`` included), so a claim left by a dead process is simply
  taken by the next claimant; nothing stale has to be detected or cleaned. POSIX locks are what NFS
  implements (NLM for NFSv3, built into NFSv4), so the claim holds across the nodes of a Slurm array on a
  shared filesystem. On NFS, a node that crashes (rather than a process that dies) keeps its claim until the
  server notices: the NFSv4 lease (about 90 s) or the NFSv3 node's reboot.
* The lock file holds one JSON record, ``{"host", "pid", "since"}``, written after the lock is taken
  (truncate, then one ``pwrite`` of a few dozen bytes, then ``fsync`` so that readers on other NFS clients
  see it). A reader can still catch it empty, or holding the previous owner's record, for an instant:
  readers retry briefly and otherwise report unknown values; the kernel lock, never the record, decides
  whether the folder is held. On release the record is marked ``"released": <time>`` and kept for humans.
* The lock file is never deleted. Deleting it on release would race: process B opens ``.claim`` and is
  about to lock it; A releases and unlinks it; B locks the unlinked file and believes it owns the run; C
  creates a new ``.claim``, locks that and trains the same run. So the folder's claim file must not be
  removed while the folder is in use (an ``--overwrite`` clears the folder's other files). As a second
  guard, a claimant checks after locking that ``.claim`` still is the file it locked, and starts again if
  it is not, so even a claim file removed by hand (``rm -r`` of a run folder) cannot make two owners.

Pitfalls of POSIX locks, and what this module does about them:

* **Closing any descriptor of the file drops the lock**, whichever descriptor took it: a lock belongs to a
  (process, file) pair. Code in a process that holds a claim must never open ``.claim`` itself (reading it
  with ``open().read()``, copying the run folder with ``shutil.copytree``...): read it through
  ``claimed_by``, which uses the held descriptor when this process holds the claim.
* **Locks are per process**: a second lock by the same process on the same file succeeds silently. So this
  module keeps the claims this process holds in ``_held`` and refuses a second ``claim`` of the same folder
  (by any spelling of its path) with the same ``RunClaimedError``; threads share the check under a mutex.
* **Locks are not inherited by ``fork``**: a forked child does not hold its parent's claims (its copy of
  ``_held`` is ignored: entries record the pid that made them), and its descriptors closing drop nothing.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from .errors import RunClaimedError
from .files import write_error

CLAIM_FILE = ".claim"
#: how often, and how long apart, a reader re-reads a record that its freshly locked holder is still writing
READ_RETRIES, READ_RETRY_SECONDS = 10, 0.01

__all__ = ["CLAIM_FILE", "Holder", "RunClaimedError", "claim", "claimed_by"]


class Holder(NamedTuple):
    """Who holds a claim, from its record; None for what could not be read."""

    host: Optional[str]
    pid: Optional[int]
    since: Optional[str]

    def describe(self) -> str:
        """``host H, pid P, since T`` (``?`` for an unknown value)."""
        return (f"host {self.host or '?'}, pid {'?' if self.pid is None else self.pid}, "
                f"since {self.since or '?'}")


UNKNOWN = Holder(None, None, None)  #: a holder whose record cannot be read (yet)

#: resolved folder -> (pid of the process that claimed it, the locked descriptor of its claim file)
_held: dict[str, tuple[int, int]] = {}
_held_guard = threading.Lock()  # held while a claim file of this process is opened, locked or closed

#: ``struct flock`` per platform, for asking the kernel about a lock without taking it (F_GETLK); the type is
#: the field to set and read. Elsewhere ``_is_locked`` probes with a shared lock (see there).
_FLOCK_LAYOUTS = {"linux": ("@hhqqi4x", ("type", "whence", "start", "len", "pid")),
                  "darwin": ("@qqihh", ("start", "len", "pid", "type", "whence")),
                  "freebsd": ("@qqihhi", ("start", "len", "pid", "type", "whence", "sysid"))}
_FLOCK_LAYOUT = next((layout for name, layout in _FLOCK_LAYOUTS.items() if sys.platform.startswith(name)), None)


def _claim_path(folder) -> tuple[str, Path]:
    """(the key of ``folder`` in ``_held``: its resolved path, its claim file); the folder must exist."""
    resolved = os.path.realpath(folder)
    if not os.path.exists(resolved):
        raise FileNotFoundError(f"run folder {folder} does not exist: create it before claiming it")
    if not os.path.isdir(resolved):
        raise NotADirectoryError(f"cannot claim {folder}: it is not a folder")
    return resolved, Path(resolved) / CLAIM_FILE


def _held_here(key: str) -> Optional[int]:
    """The descriptor of this process's claim of ``key``, or None (an entry inherited through fork is not ours)."""
    entry = _held.get(key)
    return entry[1] if entry is not None and entry[0] == os.getpid() else None


def _parse_record(data: bytes) -> Optional[dict]:
    """The record in ``data`` if it is complete, else None (empty, half-written, or not ours)."""
    try:
        record = json.loads(data.decode())
    except ValueError:
        return None
    return record if isinstance(record, dict) and {"host", "pid", "since"} <= set(record) else None


def _read_holder(fd: int) -> Optional[Holder]:
    """The holder the record in the locked file names, re-read while it is empty, half-written or still the
    previous owner's (marked released); None if it stays so."""
    for _ in range(READ_RETRIES):
        record = _parse_record(os.pread(fd, 1 << 16, 0))
        if record is not None and "released" not in record:
            pid = record["pid"]
            return Holder(str(record["host"]), pid if isinstance(pid, int) else None, str(record["since"]))
        time.sleep(READ_RETRY_SECONDS)
    return None


def _is_locked(fd: int) -> bool:
    """Whether another process holds a lock on the file of ``fd`` (locks of this process never count)."""
    if _FLOCK_LAYOUT is not None:  # ask the kernel (F_GETLK): takes nothing, so it disturbs no claimant
        layout, fields = _FLOCK_LAYOUT
        query = dict.fromkeys(fields, 0)
        query.update(type=fcntl.F_WRLCK, whence=os.SEEK_SET)
        answer = struct.unpack(layout, fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, *query.values())))
        return dict(zip(fields, answer))["type"] != fcntl.F_UNLCK
    try:  # platform without a known layout: a shared lock succeeds only if nobody holds the exclusive one. While
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # it is held (an instant), a claimant would be refused.
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise
    fcntl.lockf(fd, fcntl.LOCK_UN)
    return False


def claimed_by(folder) -> Optional[Holder]:
    """Who holds the claim of ``folder`` (``Holder``: host, pid, since; values None where its record cannot be
    read yet), or None if nobody does; takes nothing. A folder that does not exist (or was never claimed) is
    not claimed. A claim of this process counts: it names this process."""
    resolved = os.path.realpath(folder)
    with _held_guard:  # no claim of this process can be taken while a descriptor of its file is open here
        own = _held_here(resolved)
        if own is not None:  # opening and closing the file again would drop our own lock: read the held one
            return _read_holder(own) or Holder(socket.gethostname(), os.getpid(), None)
        try:
            fd = os.open(Path(resolved) / CLAIM_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if not _is_locked(fd):
                return None
            return _read_holder(fd) or UNKNOWN
        finally:
            os.close(fd)


def _lock(path: Path, folder) -> int:
    """A descriptor of ``path`` holding its exclusive lock, or ``RunClaimedError`` naming the holder.

    The lock is kept only if ``path`` still names the file locked: one removed (or replaced) by hand between
    our open and our lock would be a lock nobody else sees, and a second owner creating a new file."""
    for _ in range(3):
        fd = _open_and_lock(path, folder)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # drops our lock on the removed file, the only lock this process has on it
    raise OSError(f"cannot claim {folder}: its {CLAIM_FILE} keeps being removed while it is claimed")


def _open_and_lock(path: Path, folder) -> int:
    """A descriptor of ``path`` (created if missing) holding its exclusive lock, or ``RunClaimedError``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # 0o666 minus the umask: shared folders
    except OSError as err:
        raise OSError(f"cannot claim {folder}: {err.strerror} ({path})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the whole file, from offset 0 to beyond its end
    except OSError as err:
        busy = err.errno in (errno.EACCES, errno.EAGAIN)
        holder = _read_holder(fd) if busy else None
        os.close(fd)  # this process holds no lock on this file (checked by the caller): closing drops nothing
        if not busy:
            raise OSError(f"cannot lock {path}: {err.strerror} (run folders need a filesystem with POSIX locks)"
                          ) from None
        raise RunClaimedError(f"{folder} is being trained elsewhere ({(holder or UNKNOWN).describe()})", holder
                              ) from None
    return fd


def _write_record(fd: int, record: dict) -> None:
    """Replace the claim file's content with ``record``: one small write, flushed for readers on other hosts."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)


@contextmanager
def claim(folder) -> Iterator[Holder]:
    """Hold the claim of the existing run folder ``folder`` for this process while the block runs; yields this
    process's ``Holder``. Raises ``RunClaimedError`` at once if another process holds it, or this one already
    does; ``FileNotFoundError`` if the folder does not exist. Released (lock dropped, record marked released,
    file kept) when the block ends in any way, and by the kernel if the process dies."""
    key, path = _claim_path(folder)
    with _held_guard:
        own = _held_here(key)
        if own is not None:
            holder = _read_holder(own)
            raise RunClaimedError(f"{folder} is already claimed by this process "
                                  f"({(holder or Holder(None, os.getpid(), None)).describe()})", holder)
        fd = _lock(path, folder)
        _held[key] = (os.getpid(), fd)
    holder = Holder(socket.gethostname(), os.getpid(), datetime.now().astimezone().isoformat(timespec="seconds"))
    try:
        try:
            _write_record(fd, holder._asdict())
        except OSError as err:
            raise write_error(path, err) from None
        yield holder
    finally:
        with _held_guard:
            try:  # the mark is for humans; the lock decides, so a failing write (disk full) must not mask an error
                _write_record(fd, {**holder._asdict(), "released": datetime.now().astimezone().isoformat(
                    timespec="seconds")})
            except OSError:
                pass
            del _held[key]
            os.close(fd)  # drops the lock
