"""Encrypted local spill files for protected RecordBatches that must wait for a plan (batch k-anonymity).

Batch k-anonymity cannot release a record before the frequency sets of the whole input have chosen the
generalization levels. Holding every protected batch in the runner until then makes memory grow with the input;
instead each batch is written here as it is protected, and read back one at a time once the plan exists, so peak
memory is one batch, whatever the number of rows.

A spilled batch still holds full-detail quasi-identifiers (dates of birth, zip codes), so it is never written in
the clear: the file is a sequence of AES-256-GCM frames (`cryptography`'s AESGCM) under a per-run key that the
caller derives from the keyring (`KeyService.prf_key`); each frame's associated data binds the file's context
(run id and file name), the frame's index and the frame count, so frames cannot be reordered, dropped, moved to
another file or another run. The files live in the run's private `.cloakbeam-run` directory and go with it.

Format: b"CBSPILL1" || u32 frame count || frames; frame = u32 length || 12-byte nonce || ciphertext || tag;
each frame's plaintext is one Arrow IPC stream of up to `FRAME_ROWS` rows.
Never logs or raises with a value: errors name the file only.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloakbeam.errors import IntegrityError

MAGIC = b"CBSPILL1"
FRAME_ROWS = 16_384
_AAD = b"cloakbeam/kanon-spill/v1\x00"
_NONCE = 12


def _aad(context: str, index: int, count: int) -> bytes:
    return _AAD + context.encode() + b"\x00" + struct.pack(">II", index, count)


def _ipc(batch: pa.RecordBatch) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue()


def write_spill(batch: pa.RecordBatch, path: str, key: bytes, context: str) -> int:
    """Write `batch` encrypted to `path` (atomically: a temporary name, then a rename); returns the file size.
    `context` (e.g. "<run id>/<file name>") must be given again to read it."""
    aead = AESGCM(key)
    slices = [batch.slice(s, FRAME_ROWS) for s in range(0, batch.num_rows, FRAME_ROWS)] or [batch]
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + struct.pack(">I", len(slices)))
        for i, part in enumerate(slices):
            nonce = os.urandom(_NONCE)
            sealed = nonce + aead.encrypt(nonce, _ipc(part), _aad(context, i, len(slices)))
            fh.write(struct.pack(">I", len(sealed)) + sealed)
        size = fh.tell()
    os.replace(tmp, path)
    return size


def read_spill(path: str, key: bytes, context: str) -> pa.RecordBatch:
    """The batch `write_spill` wrote; IntegrityError when the file was altered, truncated, moved or the key is wrong."""
    return _concat(list(_frames(path, key, context)))


def _frames(path: str, key: bytes, context: str) -> Iterator[pa.RecordBatch]:
    aead = AESGCM(key)
    name = os.path.basename(path)
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC) + 4)
        if len(head) != len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise IntegrityError(f"k-anonymity spill file {name} is not a spill file (damaged or replaced)")
        (count,) = struct.unpack(">I", head[len(MAGIC) :])
        for i in range(count):
            raw_len = fh.read(4)
            if len(raw_len) != 4:
                raise IntegrityError(f"k-anonymity spill file {name} is truncated (frame {i} of {count})")
            (n,) = struct.unpack(">I", raw_len)
            sealed = fh.read(n)
            if len(sealed) != n or n < _NONCE + 16:
                raise IntegrityError(f"k-anonymity spill file {name} is truncated (frame {i} of {count})")
            try:
                plain = aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(context, i, count))
            except InvalidTag:
                raise IntegrityError(f"k-anonymity spill file {name} does not authenticate (altered, moved, or another run's key)") from None
            with pa.ipc.open_stream(pa.py_buffer(plain)) as r:
                yield from r
        if fh.read(1):
            raise IntegrityError(f"k-anonymity spill file {name} has trailing bytes (altered)")


def _concat(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts).combine_chunks().to_batches(max_chunksize=None)[0]
