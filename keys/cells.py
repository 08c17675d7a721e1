"""The cell format and the column kernel: encrypt or decrypt a whole Arrow column in one call.

Cell format, version 1 (every encrypted cell of an output column is one `binary` value):

    random (AES-256-GCM):       0x01 || key id (8) || nonce (12) || ciphertext (n) || tag (16)   = n + 37 bytes
    deterministic (AES-256-SIV): 0x02 || key id (8) || SIV (16)   || ciphertext (n)               = n + 25 bytes

Associated data (authenticated, not stored):

    b"cloakbeam-cell/v1\\x00" || version byte || key id || u16 len || dataset id || u16 len || column path

so a cell copied to another column or dataset, or relabelled with another key id, fails authentication.
Null cells stay null and carry no bytes. The plaintext of a string/binary cell is its bytes; of a fixed-width
value (integers, floats, dates, timestamps, booleans as one byte) its little-endian Arrow representation.

`encrypt_column` / `decrypt_column` are the only entry points that touch cells. By default they run the
native kernel (`NATIVE_KERNEL`, Rust in `native/` through `cloakbeam.keys.native`): the whole column in
one call over its Arrow buffers, the GIL released, nonces drawn inside the kernel from the OS CSPRNG.
`PYTHON_KERNEL` is the reference: offsets by numpy cumsum, headers and nonces by numpy scatter, one
`os.urandom` draw per call, one `cryptography` `encrypt_into` per cell. Tests hold the two to the same
bytes; `use_kernel` switches between them (and keys built without raw material use the reference loops).
`encrypt_column_keyed` / `decrypt_column_keyed` are the multi-key variants (one key per cell, e.g. per data
subject), same cell format, their per-cell loops behind the `Kernel` too (`gcm_encrypt_keyed`,
`gcm_decrypt_keyed`). Nothing here logs, and errors name column and row, never content.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidTag

from cloakbeam.errors import IntegrityError, KeyAccessError
from cloakbeam.keys import native

CELL_GCM = 0x01
CELL_SIV = 0x02
KEY_ID_LEN = 8
NONCE_LEN = 12
TAG_LEN = 16
GCM_HEADER = 1 + KEY_ID_LEN + NONCE_LEN  # bytes before the ciphertext
GCM_OVERHEAD = GCM_HEADER + TAG_LEN  # 37
SIV_HEADER = 1 + KEY_ID_LEN + TAG_LEN  # SIV tag precedes the ciphertext
SIV_OVERHEAD = SIV_HEADER  # 25
_AAD_PREFIX = b"cloakbeam-cell/v1\x00"
_MAX_BINARY = 2**31 - 1


def _lp(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("identifier too long for the cell associated data")
    return len(raw).to_bytes(2, "big") + raw


def cell_aad(version: int, key_id: bytes, dataset: str, column: str) -> bytes:
    """The associated data of every cell of (`dataset`, `column`) under `key_id`."""
    return _AAD_PREFIX + bytes([version]) + key_id + _lp(dataset) + _lp(column)


def is_supported_type(t: pa.DataType) -> bool:
    """Types whose values the kernel can turn into plaintext bytes and back."""
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_boolean(t)
        or _fixed_width(t) is not None
    )


def _fixed_width(t: pa.DataType) -> int | None:
    if pa.types.is_boolean(t):
        return None
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t) or pa.types.is_decimal(t):
        try:
            bits = t.bit_width
        except ValueError:
            return None
        return bits // 8 if bits % 8 == 0 else None
    return None


def _plain_view(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, memoryview, np.ndarray]:
    """(start offsets, end offsets, data buffer, validity) of each cell's plaintext bytes."""
    n = len(arr)
    valid = np.ones(n, dtype=bool) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    t = arr.type
    if pa.types.is_boolean(t):
        arr = pc.cast(arr, pa.uint8())
        t = arr.type
    width = _fixed_width(t)
    bufs = arr.buffers()
    if width is not None:
        data = bufs[1]
        start = (np.arange(n, dtype=np.int64) + arr.offset) * width
        return start, start + width, _mv(data), valid
    if pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        odt = np.int64 if (pa.types.is_large_string(t) or pa.types.is_large_binary(t)) else np.int32
        offsets = np.frombuffer(bufs[1], dtype=odt, count=arr.offset + n + 1)[arr.offset :].astype(np.int64)
        data = bufs[2]
        return offsets[:-1], offsets[1:], _mv(data), valid
    raise TypeError(f"cannot encrypt a column of type {t}")


def _mv(buf: pa.Buffer | None) -> memoryview:
    # cryptography's *_into accept only unsigned-byte buffers; Arrow buffers export format 'b'.
    return memoryview(buf).cast("B") if buf is not None and buf.size else memoryview(b"")


def _validity_buffer(valid: np.ndarray) -> pa.Buffer | None:
    if valid.all():
        return None
    return pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())


def encrypt_column(arr: pa.Array | pa.ChunkedArray, key, *, dataset: str, column: str) -> pa.BinaryArray:
    """Encrypt every non-null cell of `arr` under the data key `key` (a `cloakbeam.keys.service.DataKey`).

    Returns a BinaryArray of cells in the format above; nulls stay null. Nonces (random mode) come from one
    `os.urandom` draw per call; callers never supply nonces.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    material = native.raw_key(key) if _KERNEL.whole_column else None
    if material is not None:
        if not is_supported_type(arr.type):
            raise TypeError(f"cannot encrypt a column of type {arr.type}")
        version = CELL_SIV if key.deterministic else CELL_GCM
        aad = cell_aad(version, key.key_id, dataset, column)
        return native.encrypt_cells(arr, material, key.key_id, bool(key.deterministic), aad, column)
    n = len(arr)
    start, end, data, valid = _plain_view(arr)
    lengths = np.where(valid, end - start, 0)
    version = CELL_SIV if key.deterministic else CELL_GCM
    overhead = SIV_OVERHEAD if key.deterministic else GCM_OVERHEAD
    out_len = np.where(valid, lengths + overhead, 0)
    out_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(out_len, out=out_offsets[1:])
    total = int(out_offsets[-1])
    if total > _MAX_BINARY:
        raise ValueError(f"column '{column}': encrypted batch exceeds 2 GiB; write smaller batches")
    out = np.empty(total, dtype=np.uint8)
    idx = np.flatnonzero(valid)
    cell_start = out_offsets[:-1][idx]
    key_id = key.key_id
    aad = cell_aad(version, key_id, dataset, column)
    # Headers by one numpy scatter: version byte, key id and (random mode) nonce at the start of every cell.
    hlen = 1 + KEY_ID_LEN if key.deterministic else GCM_HEADER
    header = np.empty((len(idx), hlen), dtype=np.uint8)
    header[:, 0] = version
    header[:, 1 : 1 + KEY_ID_LEN] = np.frombuffer(key_id, dtype=np.uint8)
    if not key.deterministic:
        header[:, 1 + KEY_ID_LEN :] = np.frombuffer(os.urandom(NONCE_LEN * len(idx)), dtype=np.uint8).reshape(-1, NONCE_LEN)
    out[cell_start[:, None] + np.arange(hlen)] = header
    loop = _KERNEL.siv_encrypt if key.deterministic else _KERNEL.gcm_encrypt
    loop(key.aead, aad, data, start[idx], end[idx], out, cell_start)
    return pa.Array.from_buffers(
        pa.binary(),
        n,
        [_validity_buffer(valid), pa.py_buffer(out_offsets.astype(np.int32).tobytes()), pa.py_buffer(out)],
        null_count=int(n - len(idx)),
    )


def _gcm_encrypt_loop(aead, aad: bytes, data: memoryview, start: np.ndarray, end: np.ndarray, out: np.ndarray, cell_start: np.ndarray) -> None:
    # Per-cell AEAD call writing into the output buffer: the one loop a native kernel would replace.
    o = out.data  # a writable memoryview over the output buffer
    enc = aead.encrypt_into
    for s, ps, pe in zip(cell_start.tolist(), start.tolist(), end.tolist()):
        c = s + GCM_HEADER
        enc(o[s + 1 + KEY_ID_LEN : c], data[ps:pe], aad, o[c : c + (pe - ps) + TAG_LEN])


def _siv_encrypt_loop(aead, aad: bytes, data: memoryview, start: np.ndarray, end: np.ndarray, out: np.ndarray, cell_start: np.ndarray) -> None:
    o = out.data  # a writable memoryview over the output buffer
    enc = aead.encrypt_into
    ad = [aad]
    for s, ps, pe in zip(cell_start.tolist(), start.tolist(), end.tolist()):
        c = s + 1 + KEY_ID_LEN
        enc(data[ps:pe], ad, o[c : c + (pe - ps) + TAG_LEN])


def _gcm_decrypt_loop(aead, aad: bytes, data: memoryview, start: np.ndarray, end: np.ndarray, out: np.ndarray, plain_start: np.ndarray, rows: np.ndarray) -> int | None:
    """Decrypt GCM cells into `out`; return the row index of the first cell failing authentication."""
    o = out.data  # a writable memoryview over the output buffer
    dec = aead.decrypt_into
    for s, e, p, r in zip(start.tolist(), end.tolist(), plain_start.tolist(), rows.tolist()):
        c = s + GCM_HEADER
        try:
            dec(data[s + 1 + KEY_ID_LEN : c], data[c:e], aad, o[p : p + (e - c) - TAG_LEN])
        except InvalidTag:
            return r
    return None


def _siv_decrypt_loop(aead, aad: bytes, data: memoryview, start: np.ndarray, end: np.ndarray, out: np.ndarray, plain_start: np.ndarray, rows: np.ndarray) -> int | None:
    o = out.data  # a writable memoryview over the output buffer
    dec = aead.decrypt_into
    ad = [aad]
    for s, e, p, r in zip(start.tolist(), end.tolist(), plain_start.tolist(), rows.tolist()):
        c = s + 1 + KEY_ID_LEN
        try:
            dec(data[c:e], ad, o[p : p + (e - c) - TAG_LEN])
        except InvalidTag:
            return r
    return None


def _gcm_encrypt_keyed_loop(aeads: list, aads: list, data: memoryview, start: np.ndarray, end: np.ndarray, out: np.ndarray, cell_start: np.ndarray, key_index: np.ndarray) -> None:
    """Like `_gcm_encrypt_loop`, with the AEAD object and associated data of each cell chosen by `key_index`."""
    o = out.data  # a writable memoryview over the output buffer
    encs = [a.encrypt_into for a in aeads]
    for s, ps, pe, k in zip(cell_start.tolist(), start.tolist(), end.tolist(), key_index.tolist()):
        c = s + GCM_HEADER
        encs[k](o[s + 1 + KEY_ID_LEN : c], data[ps:pe], aads[k], o[c : c + (pe - ps) + TAG_LEN])


def _gcm_decrypt_keyed_loop(aeads: list, aads: list, data: memoryview, start: np.ndarray, end: np.ndarray, out: np.ndarray, plain_start: np.ndarray, rows: np.ndarray, key_index: np.ndarray) -> int | None:
    """Decrypt GCM cells whose key is chosen per cell; return the row of the first cell failing authentication."""
    o = out.data  # a writable memoryview over the output buffer
    decs = [a.decrypt_into for a in aeads]
    for s, e, p, r, k in zip(start.tolist(), end.tolist(), plain_start.tolist(), rows.tolist(), key_index.tolist()):
        c = s + GCM_HEADER
        try:
            decs[k](data[s + 1 + KEY_ID_LEN : c], data[c:e], aads[k], o[p : p + (e - c) - TAG_LEN])
        except InvalidTag:
            return r
    return None


@dataclass(frozen=True)
class Kernel:
    """The per-cell inner loops. Each receives the AEAD object, the associated data, the input buffer, the
    cells' start/end offsets, the output buffer and where each cell goes; decrypt loops return the row index
    of the first cell failing authentication (or None). Replace with `use_kernel` (e.g. a native build).

    The keyed loops (`encrypt_column_keyed` / `decrypt_column_keyed`: one key per cell, chosen by an index into
    lists of AEAD objects and associated data) default to the Python loops, so a kernel built for the
    single-key loops only keeps working."""

    name: str
    gcm_encrypt: Callable[..., None]
    siv_encrypt: Callable[..., None]
    gcm_decrypt: Callable[..., int | None]
    siv_decrypt: Callable[..., int | None]
    gcm_encrypt_keyed: Callable[..., None] = _gcm_encrypt_keyed_loop
    gcm_decrypt_keyed: Callable[..., int | None] = _gcm_decrypt_keyed_loop
    #: True: whole columns go to the native kernel (the loops serve keys without raw material).
    whole_column: bool = False


PYTHON_KERNEL = Kernel("python", _gcm_encrypt_loop, _siv_encrypt_loop, _gcm_decrypt_loop, _siv_decrypt_loop)
NATIVE_KERNEL = Kernel("native", _gcm_encrypt_loop, _siv_encrypt_loop, _gcm_decrypt_loop, _siv_decrypt_loop, whole_column=True)
_KERNEL = NATIVE_KERNEL


def use_kernel(kernel: Kernel) -> Kernel:
    """Install `kernel` for every encrypt_column/decrypt_column call in this process; returns the previous one."""
    global _KERNEL
    previous, _KERNEL = _KERNEL, kernel
    return previous


def current_kernel() -> Kernel:
    return _KERNEL


def encrypt_column_keyed(
    arr: pa.Array | pa.ChunkedArray, key_index: np.ndarray, keys: Sequence[Any], *, dataset: str, column: str
) -> pa.BinaryArray:
    """Encrypt every non-null cell of `arr` under `keys[key_index[row]]` (random-mode DataKeys, AES-256-GCM).

    Same cell format v1 as `encrypt_column`: each cell carries its own key id in the header and in its
    associated data, so `decrypt_column` (or `decrypt_column_keyed` for columns with many keys) reads it back.
    Used for subject-linked columns, where every data subject has a key of its own. With the native kernel and
    keys that carry their raw material, the whole column is one native call (`encrypt_cells_keyed`: nonces
    drawn inside it). Otherwise headers and nonces are written with numpy like `encrypt_column` (one
    `os.urandom` draw per call) and the per-cell AEAD call runs in the kernel's `gcm_encrypt_keyed` loop.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    n = len(arr)
    key_index = np.asarray(key_index, dtype=np.int64)
    if key_index.shape != (n,):
        raise ValueError(f"column '{column}': key_index must have one entry per row")
    if any(getattr(k, "deterministic", False) for k in keys):
        raise ValueError(f"column '{column}': per-row keys must be random-mode (AES-256-GCM) data keys")
    materials = [native.raw_key(k) for k in keys] if _KERNEL.whole_column else []
    if keys and materials and all(m is not None and len(m) == 32 for m in materials):
        if not is_supported_type(arr.type):
            raise TypeError(f"cannot encrypt a column of type {arr.type}")
        aads = [cell_aad(CELL_GCM, k.key_id, dataset, column) for k in keys]
        return native.encrypt_cells_keyed(arr, materials, [k.key_id for k in keys], aads, key_index, column)  # type: ignore[arg-type]
    start, end, data, valid = _plain_view(arr)
    idx = np.flatnonzero(valid)
    if len(idx) and (key_index[idx].min() < 0 or key_index[idx].max() >= len(keys)):
        raise ValueError(f"column '{column}': key_index names a key that was not given")
    out_len = np.where(valid, end - start + GCM_OVERHEAD, 0)
    out_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(out_len, out=out_offsets[1:])
    total = int(out_offsets[-1])
    if total > _MAX_BINARY:
        raise ValueError(f"column '{column}': encrypted batch exceeds 2 GiB; write smaller batches")
    out = np.empty(total, dtype=np.uint8)
    cell_start = out_offsets[:-1][idx]
    kidx = key_index[idx]
    key_ids = np.frombuffer(b"".join(k.key_id for k in keys), dtype=np.uint8).reshape(len(keys), KEY_ID_LEN) if keys else np.zeros((0, KEY_ID_LEN), np.uint8)
    header = np.empty((len(idx), GCM_HEADER), dtype=np.uint8)
    header[:, 0] = CELL_GCM
    header[:, 1 : 1 + KEY_ID_LEN] = key_ids[kidx]
    header[:, 1 + KEY_ID_LEN :] = np.frombuffer(os.urandom(NONCE_LEN * len(idx)), dtype=np.uint8).reshape(-1, NONCE_LEN)
    out[cell_start[:, None] + np.arange(GCM_HEADER)] = header
    aads = [cell_aad(CELL_GCM, k.key_id, dataset, column) for k in keys]
    _KERNEL.gcm_encrypt_keyed([k.aead for k in keys], aads, data, start[idx], end[idx], out, cell_start, kidx)
    return pa.Array.from_buffers(
        pa.binary(),
        n,
        [_validity_buffer(valid), pa.py_buffer(out_offsets.astype(np.int32).tobytes()), pa.py_buffer(out)],
        null_count=int(n - len(idx)),
    )


def decrypt_column_keyed(
    arr: pa.Array | pa.ChunkedArray,
    keys: Mapping[bytes, Any] | Callable[[Sequence[bytes]], Mapping[bytes, Any]],
    *,
    dataset: str,
    column: str,
    value_type: pa.DataType = pa.binary(),
    row_offset: int = 0,
) -> tuple[pa.Array, int]:
    """Decrypt a column whose cells use many keys (one per subject); return (values, cells without a key).

    `keys` maps key id -> DataKey, or is a function given all distinct key ids of the column at once that
    returns such a mapping (one vault round trip). Cells whose key does not exist any more (a forgotten
    subject) come back null and are counted; every other cell must authenticate (IntegrityError naming column
    and row otherwise). Grouping by key id is one `np.unique`, so the cost does not grow with the number of keys.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        raise IntegrityError(f"column '{column}' is not an encrypted column (type {arr.type})")
    start, end, data, valid = _plain_view(arr)
    idx = np.flatnonzero(valid)
    buf = np.frombuffer(data, dtype=np.uint8) if len(data) else np.zeros(0, dtype=np.uint8)
    clen = (end - start)[idx]
    bad = np.flatnonzero(clen < GCM_OVERHEAD)
    if len(bad):
        raise IntegrityError(f"column '{column}', row {int(idx[bad[0]]) + row_offset}: cell is truncated")
    versions = buf[start[idx]]
    bad = np.flatnonzero(versions != CELL_GCM)
    if len(bad):
        raise IntegrityError(f"column '{column}', row {int(idx[bad[0]]) + row_offset}: cell is not a per-subject (AES-256-GCM) cell")
    kids = buf[start[idx][:, None] + np.arange(1, 1 + KEY_ID_LEN)] if len(idx) else np.zeros((0, KEY_ID_LEN), np.uint8)
    kid64 = np.ascontiguousarray(kids).view(np.uint64).ravel()
    uk, first, inv = np.unique(kid64, return_index=True, return_inverse=True)
    distinct = [kids[i].tobytes() for i in first.tolist()]
    found = keys(distinct) if callable(keys) else {k: keys[k] for k in distinct if k in keys}
    have = np.array([k in found for k in distinct], dtype=bool)
    inv = inv.reshape(-1)
    keep = have[inv] if len(idx) else np.zeros(0, dtype=bool)
    missing = int((~keep).sum())
    out_valid = valid.copy()
    out_valid[idx[~keep]] = False
    rows = idx[keep]
    n = len(arr)
    plain_len = np.zeros(n, dtype=np.int64)
    plain_len[rows] = (end - start)[rows] - GCM_OVERHEAD
    plain_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(plain_len, out=plain_offsets[1:])
    out = np.empty(int(plain_offsets[-1]), dtype=np.uint8)
    if len(rows):
        slot = np.cumsum(have) - 1  # distinct key -> position among the keys that exist
        present = [k for k, h in zip(distinct, have.tolist()) if h]
        aeads = [found[k].aead for k in present]
        aads = [cell_aad(CELL_GCM, k, dataset, column) for k in present]
        bad_row = _KERNEL.gcm_decrypt_keyed(aeads, aads, data, start[rows], end[rows], out, plain_offsets[rows], rows, slot[inv[keep]])
        if bad_row is not None:
            raise IntegrityError(
                f"column '{column}', row {bad_row + row_offset}: cell failed authentication (tampered, moved from "
                "another column, row or dataset, or encrypted under a different key)"
            )
    return _rebuild(out, plain_offsets, out_valid, value_type, column, row_offset), missing


def cell_key_ids(arr: pa.Array) -> set[bytes]:
    """The distinct key ids referenced by the cells of an encrypted column (for key lookup)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    start, end, data, valid = _plain_view(arr)
    idx = np.flatnonzero(valid & (end - start >= 1 + KEY_ID_LEN))
    if not len(idx):
        return set()
    buf = np.frombuffer(data, dtype=np.uint8)
    ids = buf[start[idx][:, None] + np.arange(1, 1 + KEY_ID_LEN)]
    return {bytes(r) for r in np.unique(ids, axis=0)}


def decrypt_column(
    arr: pa.Array | pa.ChunkedArray,
    keys: Mapping[bytes, object] | Callable[[bytes], object],
    *,
    dataset: str,
    column: str,
    value_type: pa.DataType = pa.binary(),
    row_offset: int = 0,
) -> pa.Array:
    """Decrypt a column of cells back to `value_type`. `keys` maps key id -> DataKey (or is a lookup function).

    Raises IntegrityError naming the column and row index (plus `row_offset`) of the first cell that is
    malformed or fails authentication, and KeyAccessError when a key id cannot be resolved. Never includes
    cell content in the message.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        raise IntegrityError(f"column '{column}' is not an encrypted column (type {arr.type})")
    lookup: Callable[[bytes], Any] = keys if callable(keys) else keys.get
    if _KERNEL.whole_column:
        result = _decrypt_native(arr, lookup, dataset, column, value_type, row_offset)
        if result is not None:
            return result
    n = len(arr)
    start, end, data, valid = _plain_view(arr)
    idx = np.flatnonzero(valid)
    buf = np.frombuffer(data, dtype=np.uint8) if len(data) else np.zeros(0, dtype=np.uint8)
    clen = (end - start)[idx]
    short = np.flatnonzero(clen < 1 + KEY_ID_LEN)
    if len(short):
        raise IntegrityError(f"column '{column}', row {int(idx[short[0]]) + row_offset}: cell is truncated")
    versions = buf[start[idx]]
    overhead = np.where(versions == CELL_SIV, SIV_OVERHEAD, GCM_OVERHEAD)
    bad = np.flatnonzero(((versions != CELL_GCM) & (versions != CELL_SIV)) | (clen < overhead))
    if len(bad):
        i = int(bad[0])
        what = "has an unknown cell format version" if versions[i] not in (CELL_GCM, CELL_SIV) else "is truncated"
        raise IntegrityError(f"column '{column}', row {int(idx[i]) + row_offset}: cell {what}")
    plain_len = np.zeros(n, dtype=np.int64)
    plain_len[idx] = clen - overhead
    plain_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(plain_len, out=plain_offsets[1:])
    out = np.empty(int(plain_offsets[-1]), dtype=np.uint8)
    if len(idx):
        # Group cells by (version, key id) with numpy, then run one tight loop per group.
        cstart = start[idx]
        kids = buf[cstart[:, None] + np.arange(1, 1 + KEY_ID_LEN)]
        # 1-D unique over (key id as uint64, version): fast even for millions of cells.
        kid64 = np.ascontiguousarray(kids).view(np.uint64).ravel()
        groups: list[tuple[int, bytes, np.ndarray]] = []
        if (kid64 == kid64[0]).all() and (versions == versions[0]).all():
            groups.append((int(versions[0]), kids[0].tobytes(), idx))
        else:
            uk, inv = np.unique(kid64, return_inverse=True)
            inv = inv.reshape(-1)
            for g in range(len(uk)):
                sel = np.flatnonzero(inv == g)
                for v in np.unique(versions[sel]).tolist():
                    sub = sel[versions[sel] == v]
                    groups.append((int(v), kids[sub[0]].tobytes(), idx[sub]))
        for v, kid, rows in groups:
            key = lookup(kid)
            if key is None:
                raise KeyAccessError(
                    f"column '{column}', row {int(rows[0]) + row_offset}: no data key with id {kid.hex()} is recorded for this output"
                )
            if bool(key.deterministic) != (v == CELL_SIV):
                raise IntegrityError(f"column '{column}', row {int(rows[0]) + row_offset}: cell mode does not match its key")
            aad = cell_aad(v, kid, dataset, column)
            loop = _KERNEL.siv_decrypt if v == CELL_SIV else _KERNEL.gcm_decrypt
            bad_row = loop(key.aead, aad, data, start[rows], end[rows], out, plain_offsets[rows], rows)
            if bad_row is not None:
                raise IntegrityError(
                    f"column '{column}', row {bad_row + row_offset}: cell failed authentication (tampered, moved from "
                    "another column or dataset, or encrypted under a different key)"
                )
    return _rebuild(out, plain_offsets, valid, value_type, column, row_offset)


_AUTH_FAILED = (
    "cell failed authentication (tampered, moved from another column or dataset, or encrypted under a different key)"
)


def _decrypt_native(arr: pa.Array, lookup: Callable[[bytes], Any], dataset: str, column: str, value_type: pa.DataType, row_offset: int) -> pa.Array | None:
    """`decrypt_column` on the native kernel, with the reference kernel's checks in the same order and the
    same messages. Returns None when a key has no raw material (the caller then runs the reference)."""
    short, bad, groups = native.scan_cells(arr)
    if short is not None:
        raise IntegrityError(f"column '{column}', row {short + row_offset}: cell is truncated")
    if bad is not None:
        row, unknown = bad
        what = "has an unknown cell format version" if unknown else "is truncated"
        raise IntegrityError(f"column '{column}', row {row + row_offset}: cell {what}")
    usable: list[tuple[int, bytes, bytes, bytes]] = []
    problem: Exception | None = None
    for v, kid, row in groups:
        key = lookup(kid)
        if key is None:
            problem = KeyAccessError(f"column '{column}', row {row + row_offset}: no data key with id {kid.hex()} is recorded for this output")
            break
        if bool(key.deterministic) != (v == CELL_SIV):
            problem = IntegrityError(f"column '{column}', row {row + row_offset}: cell mode does not match its key")
            break
        material = native.raw_key(key)
        if material is None:
            return None
        usable.append((v, kid, material, cell_aad(v, kid, dataset, column)))
    var = pa.types.is_string(value_type) or pa.types.is_binary(value_type)
    validity, offsets, data, nulls, wide, fails = native.decrypt_cells(arr, usable, wide=not var)
    for failed in fails:  # groups in the reference kernel's order: its first failure is reported
        if failed is not None:
            raise IntegrityError(f"column '{column}', row {failed + row_offset}: {_AUTH_FAILED}")
    if problem is not None:
        raise problem
    n = len(arr)
    t = value_type
    if var or pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        if wide and var:
            t = pa.large_string() if pa.types.is_string(t) else pa.large_binary()
        result = pa.Array.from_buffers(t, n, [validity, pa.py_buffer(offsets), data], null_count=nulls)
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            _validate_utf8(result, column)
        return result
    valid = np.ones(n, dtype=bool) if nulls == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    return _rebuild(np.frombuffer(data, dtype=np.uint8), offsets, valid, value_type, column, row_offset)


def _validate_utf8(result: pa.Array, column: str) -> None:
    try:
        result.validate(full=True)
    except pa.ArrowInvalid:  # Arrow's message may quote bytes: replace it
        raise IntegrityError(f"column '{column}': decrypted values are not valid UTF-8 (wrong recorded type)") from None


def _rebuild(out: np.ndarray, offsets: np.ndarray, valid: np.ndarray, t: pa.DataType, column: str, row_offset: int) -> pa.Array:
    n = len(valid)
    validity = _validity_buffer(valid)
    nulls = int(n - valid.sum())
    if pa.types.is_string(t) or pa.types.is_binary(t):
        if offsets[-1] > _MAX_BINARY:
            t = pa.large_string() if pa.types.is_string(t) else pa.large_binary()
        else:
            result = pa.Array.from_buffers(t, n, [validity, pa.py_buffer(offsets.astype(np.int32).tobytes()), pa.py_buffer(out)], null_count=nulls)
            if pa.types.is_string(t):
                _validate_utf8(result, column)
            return result
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        result = pa.Array.from_buffers(t, n, [validity, pa.py_buffer(offsets.tobytes()), pa.py_buffer(out)], null_count=nulls)
        if pa.types.is_large_string(t):
            _validate_utf8(result, column)
        return result
    target = t
    if pa.types.is_boolean(t):
        t = pa.uint8()
    width = _fixed_width(t)
    if width is None:
        raise TypeError(f"cannot restore values of type {t}")
    lens = np.diff(offsets)[valid]
    wrong = np.flatnonzero(lens != width)
    if len(wrong):
        row = int(np.flatnonzero(valid)[wrong[0]])
        raise IntegrityError(f"column '{column}', row {row + row_offset}: decrypted value has the wrong width for {target}")
    full = np.zeros(n * width, dtype=np.uint8)
    full.reshape(n, width)[valid] = out.reshape(-1, width)
    result = pa.Array.from_buffers(t, n, [validity, pa.py_buffer(full)], null_count=nulls)
    if pa.types.is_boolean(target):
        result = pc.cast(result, pa.bool_())
    return result
