"""Writing files so that a reader never sees half of one: every result, checkpoint and cache goes through here.

``atomic_write(path, write)`` lets ``write`` fill a temporary file in the same
folder, then renames it onto ``path`` (``os.replace`` is atomic on POSIX): a run
killed mid-write leaves the old file or none, never a truncated one. A failure
is one ``OSError`` naming ``path`` (never the temporary file). Used by both
packages (``lora_zoo`` and ``datasets``). Files get
the permissions of a normally created file (``0666`` minus the umask), so
results are readable by collaborators on a shared filesystem. ``sha256_file(path)``
is the checksum saved files are recorded and verified with, ``sha256_json(data, key)`` that of a
JSON record's content.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: setting it (the only way to read it) races with files other threads create


def atomic_write(path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same folder); returns ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        synced = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(synced)  # on disk before the rename: a power cut leaves the old file, not an empty one
        finally:
            os.close(synced)
        os.replace(tmp, path)
    except OSError as err:  # name the file the caller asked for, not the temporary one
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
