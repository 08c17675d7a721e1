"""Quarantine records sealed with the envelope scheme: AES-256-GCM under a cached, KEK-wrapped data key.

A sealed record is self-contained: u32 length || wrapped-DEK record (JSON, no key material) || one cell in
the cell format of keys/cells.py, whose associated data binds the dataset id and the record's source
location ("<source file>#<location>"), so a sealed record copied to another entry or dataset does not open.
Quarantine entries store it base64 under "record_sealed". Reading it back is an authorized action: use
`read_quarantine` (role policy action `decrypt`, domain `quarantine`), which audits every read.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
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


def read_quarantine(
    path: str | Path, key_service: Any, *, dataset_id: str, role: str, purpose: str, roles: Any, audit: Any = None
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Yield (entry without the sealed blob, raw record bytes) for every entry of a quarantine file or dir,
    after the role policy allows `decrypt` on domain 'quarantine' for `purpose`."""
    from cloakbeam.errors import AccessDenied

    try:
        roles.check(role, "decrypt", DOMAIN, purpose)
    except AccessDenied:
        if audit is not None:
            audit.append("decrypt", role=role, purpose=purpose, domain=DOMAIN, outcome="denied", count=0, detail="role policy")
        raise
    p = Path(path)
    files = sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
    for f in files:
        n = 0
        for line in f.read_bytes().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            blob = entry.pop("record_sealed", None)
            if blob is None:
                continue
            raw = open_quarantine_record(base64.b64decode(blob), entry_location(entry), key_service, dataset_id)
            n += 1
            yield entry, raw
        if audit is not None:
            audit.append("decrypt", role=role, purpose=purpose, domain=DOMAIN, outcome="allowed", count=n, detail=f"file:{f.name}")


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
