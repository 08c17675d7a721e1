"""Append-only, hash-chained audit log of every attempt to reverse protection (detokenize, decrypt, forget).

Format: JSON lines, one entry per attempt, allowed or refused. Each entry carries
`seq` (1, 2, 3, ...), `ts` (UTC ISO-8601), `event`, `role`, `purpose`, `domain`, `subject`, `outcome`,
`count`, `detail`, `actor` (OS user), `prev` (the previous entry's `mac`; 64 zeros for the first entry),
`alg` and `mac` = HMAC-SHA256 under the audit key (or plain SHA-256 when the log is opened without a key)
over the canonical JSON of every other field. A sidecar `<log>.head` records the last seq and mac so that a
truncated tail is also detected.

Entries NEVER contain a raw value: `subject` is a token, a keyed hash (blind index) or a subject id that the
caller already considers pseudonymous; `detail` is a short reason code. `append` refuses unknown fields.

API (the keys layer reuses exactly this for `cloakbeam decrypt`):
- `AuditLog(path, key=None)`; `audit_key(key_service)` gives the key every cloakbeam command uses.
- `log.append(event, role=..., purpose=..., domain=..., subject=..., outcome=..., count=1, detail="") -> dict`
  (process-safe: an exclusive `flock` covers read-last-entry + append + head update).
- `log.verify() -> int` returns the number of entries or raises `IntegrityError` naming the first bad entry
  number (removed, edited, reordered, inserted entries and a truncated tail).
- `log.entries()` iterates the parsed entries without checking them.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloakbeam.errors import IntegrityError

GENESIS = "0" * 64
OUTCOMES = frozenset({"allowed", "denied", "not_found", "expired", "forgotten", "error"})
_FIELDS = ("seq", "ts", "event", "role", "purpose", "domain", "subject", "outcome", "count", "detail", "actor", "prev", "alg")


def audit_key(key_service: Any) -> bytes:
    """The MAC key of the cloakbeam audit chain, derived from the keyring (same on every host)."""
    return key_service.prf_key("audit/chain")


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps({k: entry[k] for k in _FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


class AuditLog:
    """One hash-chained JSON-lines file. Appends only; never rewrites or deletes an entry."""

    def __init__(self, path: str | Path, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self._key = key
        self.alg = "hmac-sha256" if key else "sha256"

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, alg={self.alg!r})"

    def _mac(self, entry: dict[str, Any]) -> str:
        data = _canonical(entry)
        if self._key:
            return hmac.new(self._key, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def _last_line(fh: Any) -> bytes | None:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        if end == 0:
            return None
        pos, chunk, buf = end, 4096, b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            stripped = buf.rstrip(b"\n")
            nl = stripped.rfind(b"\n")
            if nl >= 0:
                return stripped[nl + 1 :]
        return buf.rstrip(b"\n") or None

    def append(
        self,
        event: str,
        *,
        role: str,
        purpose: str,
        domain: str,
        outcome: str,
        subject: str | None = None,
        count: int = 1,
        detail: str = "",
    ) -> dict[str, Any]:
        """Append one entry and return it. `subject` must be a token, keyed hash or subject id, never a value."""
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {', '.join(sorted(OUTCOMES))}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                last = self._last_line(fh)
                if last is None:
                    seq, prev = 1, GENESIS
                else:
                    try:
                        doc = json.loads(last)
                        seq, prev = int(doc["seq"]) + 1, str(doc["mac"])
                    except Exception:
                        raise IntegrityError(f"audit log {self.path}: last entry is unreadable; run 'cloakbeam audit verify'") from None
                entry: dict[str, Any] = {
                    "seq": seq,
                    "ts": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                    "event": str(event),
                    "role": str(role),
                    "purpose": str(purpose),
                    "domain": str(domain),
                    "subject": None if subject is None else str(subject),
                    "outcome": outcome,
                    "count": int(count),
                    "detail": str(detail),
                    "actor": _actor(),
                    "prev": prev,
                    "alg": self.alg,
                }
                entry["mac"] = self._mac(entry)
                fh.seek(0, os.SEEK_END)
                fh.write(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
                tmp = self.head_path.with_name(self.head_path.name + f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"seq": seq, "mac": entry["mac"]}))
                os.replace(tmp, self.head_path)
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return entry

    def entries(self) -> Iterator[dict[str, Any]]:
        """Parsed entries in file order (no checking; use `verify` for that)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

    def verify(self) -> int:
        """Check the whole chain; return the entry count or raise IntegrityError naming the bad entry number."""
        if not self.path.exists():
            if self.head_path.exists():
                raise IntegrityError(f"audit log {self.path} is missing but its head file says entries were written")
            return 0
        prev, n, last_mac = GENESIS, 0, None
        with open(self.path, "rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    raise IntegrityError(f"audit log {self.path}: entry {lineno} is empty")
                try:
                    entry = json.loads(line)
                    missing = [k for k in (*_FIELDS, "mac") if k not in entry]
                except Exception:
                    raise IntegrityError(f"audit log {self.path}: entry {lineno} is not valid JSON") from None
                if missing:
                    raise IntegrityError(f"audit log {self.path}: entry {lineno} lacks field '{missing[0]}'")
                if entry["alg"] != self.alg:
                    raise IntegrityError(
                        f"audit log {self.path}: entry {lineno} uses '{entry['alg']}' but the log is verified with '{self.alg}'"
                    )
                if entry["seq"] != lineno:
                    raise IntegrityError(
                        f"audit log {self.path}: entry {lineno} has sequence number {entry['seq']} (entries removed, inserted or reordered)"
                    )
                if entry["prev"] != prev:
                    raise IntegrityError(f"audit log {self.path}: entry {lineno} does not chain to entry {lineno - 1} (removed or reordered)")
                if not hmac.compare_digest(str(entry["mac"]), self._mac(entry)):
                    raise IntegrityError(f"audit log {self.path}: entry {lineno} was edited (its MAC does not match)")
                prev = last_mac = entry["mac"]
                n = lineno
        if self.head_path.exists():
            try:
                head = json.loads(self.head_path.read_text())
            except Exception:
                raise IntegrityError(f"audit log {self.path}: head file {self.head_path} is unreadable") from None
            if head.get("seq") != n or head.get("mac") != last_mac:
                raise IntegrityError(
                    f"audit log {self.path}: ends at entry {n} but its head file records entry {head.get('seq')} (tail removed or edited)"
                )
        elif n:
            raise IntegrityError(f"audit log {self.path}: head file {self.head_path} is missing")
        return n
