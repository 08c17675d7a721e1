"""Typed facade over the native core (`cloakbeam._native`, Rust sources in `native/`).

The kernels take whole Arrow arrays as their buffers (zero copy in), release the GIL for the batch, spread
large batches over threads, and return buffers that become Arrow arrays without a copy. This module only
turns arrays into buffer views, calls the kernel once per column, and maps the kernel's `CellError(code,
row)` to cloakbeam's own errors. It never logs, and nothing it raises carries a value or key bytes.

Threads: `set_threads(n)` (0 = default) or `CLOAKBEAM_NATIVE_THREADS`; the default is the CPU count. A
batch smaller than `PARALLEL_MIN_CELLS` cells (and `PARALLEL_MIN_BYTES` bytes) stays on the calling thread.
Digests and tokens are identical whatever the thread count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam import _native

CellError = _native.CellError
PARALLEL_MIN_CELLS: int = _native.PARALLEL_MIN_CELLS
PARALLEL_MIN_BYTES: int = _native.PARALLEL_MIN_BYTES

#: A kernel's view of an array: (length, offset, layout, width, validity, offsets, data).
View = tuple[int, int, int, int, Any, Any, Any]
_VAR32, _VAR64, _FIXED = 0, 1, 2


def set_threads(n: int) -> int:
    """Use `n` kernel threads for large batches (0: `CLOAKBEAM_NATIVE_THREADS` or the CPU count)."""
    if n < 0:
        raise ValueError("thread count must be 0 (default) or positive")
    return _native.set_threads(n)


def get_threads() -> int:
    """Threads large batches run on."""
    return _native.get_threads()


def cpu_features() -> list[str]:
    """CPU features the crypto backends detect at run time (aes, pclmulqdq, sha, avx2)."""
    return list(_native.cpu_features())


def _width(t: pa.DataType) -> int | None:
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t) or pa.types.is_decimal(t):
        try:
            bits = t.bit_width
        except ValueError:
            return None
        return bits // 8 if bits % 8 == 0 else None
    return None


def view(arr: pa.Array) -> View:
    """The buffers of `arr` as the kernels read them: same layouts as `cells._plain_view` (booleans as
    one byte each; dictionaries decoded). Raises TypeError for types without a byte layout."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_boolean(t):
        arr = pc.cast(arr, pa.uint8())
        t = arr.type
    bufs = arr.buffers()
    validity = bufs[0] if arr.null_count else None
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return (len(arr), arr.offset, _VAR32, 0, validity, bufs[1], bufs[2])
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return (len(arr), arr.offset, _VAR64, 0, validity, bufs[1], bufs[2])
    if pa.types.is_fixed_size_binary(t):
        return (len(arr), arr.offset, _FIXED, t.byte_width, validity, bufs[1], None)
    width = _width(t)
    if width is None:
        raise TypeError(f"no native layout for arrays of type {t}")
    return (len(arr), arr.offset, _FIXED, width, validity, bufs[1], None)


def _one(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def raw_key(key: Any) -> bytes | None:
    """The raw bytes of a DataKey for the kernel, or None when the key does not expose them."""
    getter = getattr(key, "_native_material", None)
    return getter() if callable(getter) else None


# -- cells ---------------------------------------------------------------------------------------------


def encrypt_cells(arr: pa.Array, material: bytes, key_id: bytes, deterministic: bool, aad: bytes, column: str) -> pa.BinaryArray:
    """Encrypt every non-null cell of `arr` (cell format v1) under raw key `material`; nulls stay null."""
    try:
        validity, offsets, data, nulls = _native.encrypt_cells(deterministic, material, key_id, aad, view(arr))
    except CellError as exc:
        code = exc.args[0]
        if code == "too_large":
            raise ValueError(f"column '{column}': encrypted batch exceeds 2 GiB; write smaller batches") from None
        raise RuntimeError(f"column '{column}': native encryption failed ({code})") from None
    bufs = [None if validity is None else pa.py_buffer(validity), pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.binary(), len(arr), bufs, null_count=nulls)


def encrypt_cells_keyed(arr: pa.Array, materials: Sequence[bytes], key_ids: Sequence[bytes], aads: Sequence[bytes], key_index: np.ndarray, column: str) -> pa.BinaryArray:
    """Encrypt every non-null cell of `arr` (cell format v1, AES-256-GCM) under raw key `materials[key_index[row]]`
    with that key's id and associated data; nulls stay null. One call for the whole column, GIL released."""
    idx = np.ascontiguousarray(key_index, dtype="<i8")
    try:
        validity, offsets, data, nulls = _native.encrypt_cells_keyed(b"".join(materials), b"".join(key_ids), list(aads), idx.tobytes(), view(arr))
    except CellError as exc:
        code = exc.args[0]
        if code == "too_large":
            raise ValueError(f"column '{column}': encrypted batch exceeds 2 GiB; write smaller batches") from None
        if code == "key_index":
            raise ValueError(f"column '{column}': key_index names a key that was not given") from None
        raise RuntimeError(f"column '{column}': native encryption failed ({code})") from None
    bufs = [None if validity is None else pa.py_buffer(validity), pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.binary(), len(arr), bufs, null_count=nulls)


def scan_cells(arr: pa.Array) -> tuple[int | None, tuple[int, bool] | None, list[tuple[int, bytes, int]]]:
    """(first truncated row, (first bad row, unknown version?), [(version, key id, first row)])."""
    return _native.scan_cells(view(arr))


def decrypt_cells(arr: pa.Array, groups: Sequence[tuple[int, bytes, bytes, bytes | Sequence[bytes]]], *, wide: bool) -> tuple[pa.Buffer | None, np.ndarray, pa.Buffer, int, bool, list[int | None]]:
    """Decrypt the cells of `groups` [(version, key id, raw key, aad)]: (validity, offsets, data, nulls,
    offsets are int64, first failing row per group). The caller raises on failures. `aad` is one bytes
    string for cells; a list of items (SIV only) serves the Wycheproof AEAD-SIV vectors."""
    items = [(v, kid, key, [aad] if isinstance(aad, (bytes, bytearray)) else list(aad)) for v, kid, key, aad in groups]
    validity, offsets, data, nulls, is_wide, fails = _native.decrypt_cells(items, view(arr), wide)
    odt = np.int64 if is_wide else np.int32
    return (
        None if validity is None else pa.py_buffer(validity),
        np.frombuffer(offsets, dtype=odt),
        pa.py_buffer(data),
        nulls,
        is_wide,
        fails,
    )


# -- keyed digests and tokens ---------------------------------------------------------------------------


def _counters(counters: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray | None:
    if counters is None:
        return None
    c = np.ascontiguousarray(counters, dtype="<u4")
    if len(c) != n:
        raise ValueError("one counter per value is required")
    return c


def hmac_sha256(key: bytes, values: pa.Array | pa.ChunkedArray, *, prefix: bytes = b"", counters: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """HMAC-SHA256(key, prefix || [counter u32 big-endian] || value) of every value: an (n, 32) uint8
    matrix, zero rows for nulls. String values are hashed as their UTF-8 bytes."""
    arr = _one(values)
    out = _native.hmac_sha256(key, prefix, view(arr), _counters(counters, len(arr)))
    return np.frombuffer(out, dtype=np.uint8).reshape(len(arr), 32)


def hmac_sha256_array(key: bytes, values: pa.Array | pa.ChunkedArray, *, prefix: bytes = b"") -> pa.FixedSizeBinaryArray:
    """`hmac_sha256` as a FixedSizeBinary(32) array with the input's nulls."""
    arr = _one(values)
    out = _native.hmac_sha256(key, prefix, view(arr), None)
    validity = arr.is_valid().buffers()[1] if arr.null_count else None
    return pa.Array.from_buffers(pa.binary(32), len(arr), [validity, pa.py_buffer(out)], null_count=arr.null_count)


def hmac_list(key: bytes, values: Sequence[str], *, prefix: bytes = b"") -> list[bytes]:
    """HMAC-SHA256 of each string as a list of 32-byte digests (for the vault's list-based API)."""
    if not len(values):
        return []
    out = _native.hmac_sha256(key, prefix, view(pa.array(values, pa.string())), None)
    return [out[32 * i : 32 * i + 32] for i in range(len(values))]


class TokensRefused(Exception):
    """The native renderer does not take these inputs (non-digit or too short values, nulls)."""


def render_tokens(key: bytes, values: pa.Array, *, digits: bool, prefix: bytes, keep_last: int, luhn: bool, counters: Sequence[int] | np.ndarray | None = None) -> pa.StringArray:
    """Tokens of `values` in the formats of `vault/tokens.py` (byte-identical), as a string array.
    Raises TokensRefused for inputs only the reference implementation defines."""
    arr = _one(values)
    try:
        offsets, data = _native.render_tokens(key, digits, prefix, keep_last, luhn, view(arr), _counters(counters, len(arr)))
    except CellError:
        raise TokensRefused() from None
    return pa.Array.from_buffers(pa.string(), len(arr), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


__all__ = [
    "CellError",
    "PARALLEL_MIN_BYTES",
    "PARALLEL_MIN_CELLS",
    "TokensRefused",
    "cpu_features",
    "decrypt_cells",
    "encrypt_cells",
    "get_threads",
    "hmac_list",
    "hmac_sha256",
    "hmac_sha256_array",
    "raw_key",
    "render_tokens",
    "scan_cells",
    "set_threads",
    "view",
]
