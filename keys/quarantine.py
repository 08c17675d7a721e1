"""Quarantine records sealed with the envelope scheme: AES-256-GCM under a cached, KEK-wrapped data key.

A sealed record is self-contained: u32 length || wrapped-DEK record (JSON, no key material) || one cell in
the cell format of keys/cells.py, whose associated data binds the dataset id and the record's source
location ("<source file>#<location>"), so a sealed record copied to another entry or dataset does not open.
Quarantine entries store it base64 under "record_sealed". Its data key is sealed to the reveal key
(keys/sealing.py): only the reveal service opens it, for a grant on domain `quarantine`, audited.
"""

from __future__ import annotations

import json
from typing import Any

PURPOSE = "quarantine"
DOMAIN = "quarantine"


def seal_quarantine_record(raw: bytes, source_location: str, key_service: Any, dataset_id: str) -> bytes:
    """Encrypt one rejected record's bytes; never fails open (errors propagate, nothing is written plain)."""
    return key_service.seal(raw, dataset=dataset_id, purpose=PURPOSE, context=source_location)


def open_quarantine_record(blob: bytes, source_location: str, key_service: Any, dataset_id: str) -> bytes:
    """Inverse of `seal_quarantine_record`; IntegrityError when tampered or moved, KeyAccessError on key problems."""
    return key_service.open_sealed(blob, dataset=dataset_id, purpose=PURPOSE, context=source_location)


def entry_location(entry: dict[str, Any]) -> str:
    """The source location a quarantine entry's sealed record is bound to."""
    return f"{entry.get('source')}#{entry.get('location')}"


def rewrap_sealed(blob: bytes, key_service: Any) -> bytes:
    """The same sealed record with its data key re-wrapped under the newest KEK version (cell unchanged)."""
    n = int.from_bytes(blob[:4], "big")
    record = json.loads(blob[4 : 4 + n])
    cell = blob[4 + n :]
    from cloakbeam.keys.sealing import is_sealed

    if not is_sealed(record) and str(record.get("kek_version")) == str(key_service.newest_kek_version(record["kek"])):
        return blob
    rewrapped = key_service.rewrap_record(record)
    if rewrapped is record:
        return blob
    new = json.dumps(rewrapped, sort_keys=True, separators=(",", ":")).encode()
    return len(new).to_bytes(4, "big") + new + cell
