"""Type stubs of the compiled native core `cloakbeam._native` (Rust, `native/src/lib.rs`).

Use it through `cloakbeam.keys.native`; `tests/test_native_stub.py` checks these names against the module.
A view is (length, offset, layout 0=int32 offsets | 1=int64 offsets | 2=fixed width, width, validity,
offsets, data), the buffers being objects with the buffer protocol (pyarrow buffers) or None.
"""

from typing import Any

View = tuple[int, int, int, int, Any, Any, Any]

PARALLEL_MIN_CELLS: int
PARALLEL_MIN_BYTES: int

class CellError(Exception):
    """A cell or value the kernel refused; args are (code: str, row: int), never content."""

def encrypt_cells(deterministic: bool, key: bytes, key_id: bytes, aad: bytes, view: View) -> tuple[bytes | None, bytes, bytes, int]:
    """(validity, int32 offsets, cell data, null count) of the encrypted column."""

def encrypt_cells_keyed(keys: bytes, key_ids: bytes, aads: list[bytes], key_index: bytes, view: View) -> tuple[bytes | None, bytes, bytes, int]:
    """(validity, int32 offsets, cell data, null count): row i under key key_index[i] (AES-256-GCM)."""

def scan_cells(view: View) -> tuple[int | None, tuple[int, bool] | None, list[tuple[int, bytes, int]]]:
    """(first truncated row, (first bad row, unknown version?), [(version, key id, first row)])."""

def decrypt_cells(groups: list[tuple[int, bytes, bytes, list[bytes]]], view: View, wide: bool) -> tuple[bytes | None, bytes, bytes, int, bool, list[int | None]]:
    """(validity, offsets, plaintext data, null count, offsets are int64, first failing row per group)."""

def hmac_sha256(key: bytes, prefix: bytes, view: View, counters: Any = None) -> bytes:
    """HMAC-SHA256(key, prefix || [counter u32 BE] || value) per value, 32 bytes each (zeros for nulls)."""

def render_tokens(key: bytes, digits: bool, prefix: bytes, keep_last: int, luhn: bool, view: View, counters: Any = None) -> tuple[bytes, bytes]:
    """(int32 offsets, UTF-8 data) of the tokens of every value."""

def set_threads(n: int) -> int:
    """Set the kernel thread count (0 = default); returns the count in force."""

def get_threads() -> int:
    """Threads large batches run on."""

def cpu_features() -> list[str]:
    """CPU features detected at run time."""
