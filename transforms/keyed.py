"""Keyed hashing of whole columns: HMAC-SHA256 once per *distinct* value, broadcast back to rows.

The digests come from the native kernel (`cloakbeam.keys.native.hmac_sha256`) over the distinct values.

Used by pseudonymization (pool indexes) and date shifting (per-subject offsets). The key comes from
`ctx.keys.prf_key(purpose)`; digests never leave this process (they are turned into indexes and offsets).
"""

from __future__ import annotations

import hmac

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.keys import native


def normalize(column: pa.Array, how: str = "text") -> pa.Array:
    """Canonical form so trivially different spellings map to the same pseudonym/offset.

    text: NFC, trimmed, inner whitespace collapsed, case-folded. email: trimmed, lower-cased.
    digits: digits only (phones). exact: cast to string, unchanged.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    if how == "exact":
        return column
    if how == "digits":
        return pc.replace_substring_regex(column, r"[^0-9]", "")
    if how == "email":
        return pc.utf8_lower(pc.utf8_trim_whitespace(column))
    out = pc.utf8_normalize(column, form="NFC")
    out = pc.utf8_trim_whitespace(out)
    out = pc.replace_substring_regex(out, r"\s+", " ")
    return pc.utf8_lower(out)


def keyed_digests(key: bytes, column: pa.Array, how: str = "text") -> tuple[np.ndarray, np.ndarray]:
    """Return (digests, row_index): digests is a (distinct values, 32) uint8 matrix of HMAC-SHA256 over the
    normalized UTF-8 value; row_index maps each row to its digest row, -1 for nulls.

    The distinct values go to the native keyed-digest kernel as one Arrow array: no Python object per value.
    `keyed_digests_reference` is the per-value Python definition the tests hold it to.
    """
    norm = normalize(column, how)
    enc = pc.dictionary_encode(norm)
    idx = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(enc.dictionary) == 0:
        return np.zeros((0, 32), dtype=np.uint8), idx
    return native.hmac_sha256(key, enc.dictionary), idx


def keyed_digests_reference(key: bytes, column: pa.Array, how: str = "text") -> tuple[np.ndarray, np.ndarray]:
    """The reference definition of `keyed_digests` (one `hmac.digest` per distinct value), for tests."""
    norm = normalize(column, how)
    enc = pc.dictionary_encode(norm)
    uniques = enc.dictionary.to_pylist()
    idx = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    if not uniques:
        return np.zeros((0, 32), dtype=np.uint8), idx
    joined = b"".join(hmac.digest(key, u.encode("utf-8"), "sha256") for u in uniques)
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(uniques), 32), idx


def digest_words(digests: np.ndarray) -> np.ndarray:
    """View each 32-byte digest as eight big-endian uint32 words (independent uniform indexes)."""
    return digests.reshape(-1, 8, 4).astype(np.uint32) @ np.array([1 << 24, 1 << 16, 1 << 8, 1], dtype=np.uint32)
