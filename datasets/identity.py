"""What a cache of an image list is keyed on: each file's path and label, and the identity of its content.

``content_key(data)`` hashes, for every ``Datum`` in order, its path, its label and
what ``os.stat`` says about the file: size, modification time and status-change
time, both in nanoseconds. Writing other bytes under a name sets the modification
time. Swapping two files with ``mv`` moves each one's size and modification time
with it (invisible when both were written at one size within one clock tick, as a
generator writes them) but sets their status-change times, which no tool can set
back; so does restoring a modification time (``cp -p``, ``rsync -a``, ``tar``).
So a cache keyed on it is rebuilt whenever an image may have changed; a copied or
``chmod``-ed dataset gets a new key too (a rebuild, never a stale number).

Why not a hash of the bytes: measured on a 3,000-image synthetic test split
(``datasets.synthetic``, JPEG quality 92) on the 2-core development machine, the
key costs 10 ms warm and 13–15 ms with the files out of the page cache; sha1,
sha256 or blake2b of every file's bytes cost 93–130 ms warm and 400–455 ms cold
at 224 px (70 MiB), 210–295 ms warm and 660–770 ms cold at 448 px (244 MiB).
Hashing grows with the bytes (ImageNet's 6.4 GB test split: about 6 s warm and
20 s from this disk, extrapolated, on every run), the stat key with the file
count only, and it misses only a file rewritten at the same size within one
file-system clock tick (a few ms) of its previous write. Callers take the key
before reading any image, so a file changed while a cache is built gets a new
key at the next run.

Imports nothing heavy: the pipeline's zero-shot cache uses the same key without torch.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from .base import DatasetError, Datum


def file_identity(path: str) -> str:
    """``"size|mtime_ns|ctime_ns"`` of ``path``; a one-line error naming a missing or unreadable file."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except OSError as err:
        raise DatasetError(f"cannot read image file {path}: {err.strerror or err}") from None
    return f"{status.st_size}|{status.st_mtime_ns}|{status.st_ctime_ns}"


def content_key(data: Sequence[Datum]) -> str:
    """A sha1 hex digest of every item's path, label and file identity, in order: equal keys mean the same
    images (as far as the file system tells) with the same labels in the same order."""
    digest = hashlib.sha1()
    for item in data:
        digest.update(f"{item.impath}|{item.label}|{file_identity(item.impath)}\n".encode())
    return digest.hexdigest()
