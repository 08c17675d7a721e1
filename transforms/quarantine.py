"""The quarantine: where records that cannot be parsed or validated go, with their reason and location.

One JSON-lines file per input file under OUT/quarantine/, written atomically. An entry holds the reason code,
the field (if any), the source file and location, and the record itself in protected form: never in plaintext.
`protect_raw_record` is the one place that decides that form.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from cloakbeam.core import fsio
from cloakbeam.core.stats import FileStat
from cloakbeam.transforms.ingest import Rejected

QUARANTINE_DIR = "quarantine"


def protect_raw_record(rej: Rejected, keys: Any, dataset_id: str) -> dict[str, Any]:
    """The stored form of a rejected record's bytes: sealed with the envelope scheme (AES-256-GCM under a
    data key sealed to the reveal key, bound to dataset and source location; see cloakbeam.keys.quarantine) — the raw
    bytes never reach the quarantine file in plaintext; only the reveal service opens them (keys/sealing.py)."""
    import base64

    from cloakbeam.keys.quarantine import seal_quarantine_record

    sealed = seal_quarantine_record(rej.raw, f"{rej.source}#{rej.location}", keys, dataset_id)
    return {"record_sealed": base64.b64encode(sealed).decode("ascii"), "record_bytes": len(rej.raw)}


def quarantine_entry(rej: Rejected, keys: Any, dataset_id: str) -> dict[str, Any]:
    return {
        "reason": rej.reason,
        "field": rej.field,
        "source": rej.source,
        "location": rej.location,
        "records": rej.records,
        **protect_raw_record(rej, keys, dataset_id),
    }


def quarantine_path(out_dir: str, source: str, window: str | None = None) -> str:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    name = f"{digest}.jsonl" if window is None else f"{window}-{digest}.jsonl"
    return fsio.join(out_dir, QUARANTINE_DIR, name)


def write_quarantine(out_dir: str, source: str, entries: Iterable[dict[str, Any]], window: str | None = None) -> FileStat:
    """Write one source's quarantine entries atomically; return the committed file's stats."""
    path = quarantine_path(out_dir, source, window)
    rows = 0
    with fsio.atomic_writer(path) as w:
        for e in entries:
            w.write(json.dumps(e, sort_keys=True).encode() + b"\n")
            rows += e.get("records", 1)
    rel = path[len(out_dir) :].lstrip("/")
    return FileStat(path=rel, rows=rows, bytes=w.size, sha256=w.sha256.hexdigest(), kind="quarantine", window=window)
