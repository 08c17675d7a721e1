"""Atomic, hashed file writes for local paths and Beam FileSystems paths (gs://, s3:// where installed).

A file becomes visible under its final name only when complete: it is written to a hidden temporary name in
the same directory and renamed. On local POSIX filesystems the rename is atomic; on object stores (GCS, S3)
Beam's rename is copy-then-delete, so readers must rely on the manifest, which lists only committed files.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *parts])


class HashingWriter:
    """A write-only file object that counts bytes and computes SHA-256 of what passes through."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        mv = memoryview(data).cast("B")
        self._inner.write(mv)
        self.sha256.update(mv)
        self.size += len(mv)
        return len(mv)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._inner.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True  # the owner closes the inner stream after the rename decision


@contextmanager
def atomic_writer(path: str) -> Iterator[HashingWriter]:
    """Yield a HashingWriter whose content appears at `path` only if the block completes without error."""
    directory, name = (os.path.split(path) if is_local(path) else path.rsplit("/", 1))
    tmp = join(directory, f".tmp-{uuid.uuid4().hex}-{name}")
    raw: BinaryIO
    if is_local(path):
        os.makedirs(directory, exist_ok=True)
        raw = open(tmp, "wb")
    else:
        from apache_beam.io.filesystems import FileSystems

        raw = FileSystems.create(tmp)
    ok = False
    try:
        w = HashingWriter(raw)
        yield w
        ok = True
    finally:
        raw.close()
        if ok:
            if is_local(path):
                os.replace(tmp, path)
            else:
                from apache_beam.io.filesystems import FileSystems

                if FileSystems.exists(path):
                    FileSystems.delete([path])
                FileSystems.rename([tmp], [path])
        else:
            _remove_quietly(tmp)


def _remove_quietly(path: str) -> None:
    try:
        if is_local(path):
            os.unlink(path)
        else:
            from apache_beam.io.filesystems import FileSystems

            FileSystems.delete([path])
    except Exception:  # best effort: a leftover hidden temp file is never listed in the manifest
        pass


def sha256_of(path: str, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, hex SHA-256) of a file, streamed."""
    h = hashlib.sha256()
    size = 0
    fh: BinaryIO
    if is_local(path):
        fh = open(path, "rb")
    else:
        from apache_beam.io.filesystems import FileSystems

        fh = FileSystems.open(path)
    with fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def open_read(path: str) -> BinaryIO:
    """Open a local path or a Beam FileSystems path (gs://, s3://) for reading bytes."""
    if is_local(path):
        return open(path[len("file://"):] if path.startswith("file://") else path, "rb")
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.open(path)
