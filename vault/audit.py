"""Append-only, hash-chained audit log of every attempt to reverse protection (detokenize, decrypt, forget).

Format: JSON lines, one entry per attempt, allowed or refused. Each entry carries
`seq` (1, 2, 3, ...), `ts` (UTC ISO-8601), `event`, `role`, `purpose`, `domain`, `subject`, `outcome`,
`count`, `detail`, `actor` (the verified token subject; the OS account in --dev mode), `prev` (the previous entry's `mac`; 64 zeros for the first entry),
`alg` and `mac` = HMAC-SHA256 under the audit key (or plain SHA-256 when the log is opened without a key)
over the canonical JSON of every other field. A sidecar `<log>.head` records the last seq and mac so that a
truncated tail is also detected.

Entries NEVER contain a raw value: `subject` is a token, a keyed hash (blind index) or a subject id that the
caller already considers pseudonymous; `detail` is a short reason code. `append` refuses unknown fields.

API:
- `AuditLog(path, key=None)`; the reveal service passes the audit MAC key of its reveal keyring (keys/sealing.py),
  which no pipeline or client holds. `AnchoredAudit` adds signed checkpoints in a separate sink (below).
- `log.append(event, role=..., purpose=..., domain=..., subject=..., outcome=..., count=1, detail="") -> dict`
  (process-safe: an exclusive `flock` covers read-last-entry + append + head update).
- `log.verify() -> int` returns the number of entries or raises `IntegrityError` naming the first bad entry
  number (removed, edited, reordered, inserted entries and a truncated tail).
- `log.entries()` iterates the parsed entries without checking them.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloakbeam.errors import ConfigError, IntegrityError

GENESIS = "0" * 64
OUTCOMES = frozenset({"allowed", "denied", "not_found", "expired", "forgotten", "error"})
_FIELDS = ("seq", "ts", "event", "role", "purpose", "domain", "subject", "outcome", "count", "detail", "actor", "prev", "anchor", "alg")
MAX_GROUP = 256  # entries written (and fsync'd) together at most


class _GroupCommit:
    """Leader/follower group commit: the first waiting thread writes every pending entry in one go."""

    def __init__(self, log: Any) -> None:
        import threading

        self.log = log
        self.lock = threading.Lock()
        self.pending: list[dict[str, Any]] = []
        self.writing = False

    def submit(self, item: dict[str, Any]) -> dict[str, Any]:
        import threading

        slot: dict[str, Any] = {"item": item, "done": threading.Event(), "entry": None, "error": None}
        with self.lock:
            self.pending.append(slot)
            leader = not self.writing
            self.writing = True
        if leader:
            while True:
                with self.lock:
                    batch, self.pending = self.pending[:MAX_GROUP], self.pending[MAX_GROUP:]
                    if not batch:
                        self.writing = False
                        break
                try:
                    for s, e in zip(batch, self.log._append_group([s["item"] for s in batch])):
                        s["entry"] = e
                except BaseException as exc:  # every waiter of this group fails with the same error
                    for s in batch:
                        s["error"] = exc
                for s in batch:
                    s["done"].set()
        slot["done"].wait()
        if slot["error"] is not None:
            raise slot["error"]
        return slot["entry"]


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps({k: entry[k] for k in _FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _actor() -> str:
    from cloakbeam.vault.roles import _current_user

    return _current_user()


def appendable_file(path: Path, what: str) -> Path:
    """`path` if an audit file can live there: a regular file, or a file that can be created. ConfigError (a
    sentence) otherwise: `/dev/null`, a device or a directory would swallow entries, so reveals would go unrecorded."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file; name a file the audit chain can be appended to")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not path.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"{what} {path} cannot be created (directory {parent} is not writable)")
    return path


class AuditLog:
    """One hash-chained JSON-lines file. Appends only; never rewrites or deletes an entry."""

    def __init__(self, path: str | Path, key: bytes | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self._key = key
        self.alg = "hmac-sha256" if key else "sha256"
        self.on_append: Any = None
        self._group = _GroupCommit(self)

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
        actor: str | None = None,
    ) -> dict[str, Any]:
        """Append one entry and return it once it is on disk (fsync'd, checkpointed when anchored). `subject` must
        be a token, keyed hash or subject id, never a value. `actor` is the verified identity (the reveal service
        passes the token's subject); None = the OS account.

        Concurrent appends from threads of one process are group-committed: one thread writes every pending entry
        with one fsync (and one checkpoint), the others wait for it; each returns only after its entry is durable."""
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {', '.join(sorted(OUTCOMES))}")
        item = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "event": str(event), "role": str(role), "purpose": str(purpose), "domain": str(domain),
            "subject": None if subject is None else str(subject), "outcome": outcome, "count": int(count), "detail": str(detail),
            "actor": _actor() if actor is None else str(actor),
        }
        return self._group.submit(item)

    def _append_group(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write `items` as consecutive entries under one exclusive flock and one fsync; checkpoint the last."""
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
                anchor = seq - 1  # the previous group's last entry, which that group checkpointed
                out, lines = [], []
                for item in items:
                    entry: dict[str, Any] = {"seq": seq, **item, "prev": prev, "anchor": anchor, "alg": self.alg}
                    entry["mac"] = prev = self._mac(entry)
                    out.append(entry)
                    lines.append(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n")
                    seq += 1
                fh.seek(0, os.SEEK_END)
                fh.write(b"".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
                tmp = self.head_path.with_name(self.head_path.name + f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"seq": out[-1]["seq"], "mac": out[-1]["mac"]}))
                os.replace(tmp, self.head_path)
                if self.on_append is not None:  # e.g. a signed checkpoint, still under the lock
                    self.on_append(out[-1])
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return out

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
        return len(self.verify_macs())

    def verify_macs(self) -> list[str]:
        """Check the whole chain; return every entry's MAC in order (IntegrityError naming the bad entry).
        `self.anchors` then holds each entry's `anchor` (the seq its group's predecessor checkpointed)."""
        self.anchors: list[int] = []
        if not self.path.exists():
            if self.head_path.exists():
                raise IntegrityError(f"audit log {self.path} is missing but its head file says entries were written")
            return []
        prev, n, last_mac = GENESIS, 0, None
        macs: list[str] = []
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
                macs.append(entry["mac"])
                self.anchors.append(int(entry["anchor"]))
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
        return macs


# --------------------------------------------------------------------------------------------------------------
# Anchored audit: a MAC key only the reveal service holds, and signed checkpoints in a separate sink.
# --------------------------------------------------------------------------------------------------------------

_CHECKPOINT_CONTEXT = b"cloakbeam-audit-checkpoint/v1\x00"


def _checkpoint_message(doc: dict[str, Any]) -> bytes:
    return _CHECKPOINT_CONTEXT + json.dumps({k: doc[k] for k in ("log", "seq", "head", "ts")}, sort_keys=True, separators=(",", ":")).encode()


class FileCheckpointSink:
    """Signed checkpoints as JSON lines in a file that must live outside the service's state directory (ship it
    to WORM storage: S3 Object Lock, a retention-locked bucket, `chattr +a`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileCheckpointSink({str(self.path)!r})"

    def write(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as fh:
            fh.write(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]] | None:
        """Every checkpoint in order, or None when the sink does not exist."""
        if not self.path.exists():
            return None
        out = []
        for i, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                out.append(json.loads(line))
            except ValueError:
                raise IntegrityError(f"checkpoint {i} in {self.path} is not valid JSON") from None
        return out


class PostgresCheckpointSink:
    """Signed checkpoints in a PostgreSQL table (`cloakbeam_audit_checkpoints`), e.g. on a database the service
    may only INSERT into. The DSN is read from the named environment variable."""

    def __init__(self, dsn_env: str, table: str = "cloakbeam_audit_checkpoints") -> None:
        import re

        if not re.match(r"^[a-z_][a-z0-9_]{0,62}$", table):
            raise ValueError("checkpoint table name must be a lower-case SQL identifier")
        self.dsn_env = dsn_env
        self.table = table
        self._conn: Any = None

    def __repr__(self) -> str:
        return f"PostgresCheckpointSink(dsn_env={self.dsn_env!r})"

    def _connect(self) -> Any:
        if self._conn is None:
            import psycopg

            from cloakbeam.errors import ConfigError

            dsn = os.environ.get(self.dsn_env)
            if not dsn:
                raise ConfigError(f"the audit checkpoint DSN is read from environment variable {self.dsn_env}, which is not set")
            try:
                self._conn = psycopg.connect(dsn, autocommit=True, application_name="cloakbeam-audit")
            except psycopg.Error:
                raise ConfigError(f"cannot connect to the checkpoint database named by {self.dsn_env}") from None
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (log TEXT NOT NULL, seq BIGINT NOT NULL, head TEXT NOT NULL, ts TEXT NOT NULL,"
                " sig TEXT NOT NULL, PRIMARY KEY (log, seq))"
            )
        return self._conn

    def write(self, doc: dict[str, Any]) -> None:
        self._connect().execute(
            f"INSERT INTO {self.table} (log, seq, head, ts, sig) VALUES (%s, %s, %s, %s, %s)", (doc["log"], doc["seq"], doc["head"], doc["ts"], doc["sig"])
        )

    def read(self) -> list[dict[str, Any]] | None:
        rows = self._connect().execute(f"SELECT log, seq, head, ts, sig FROM {self.table} ORDER BY log, seq").fetchall()
        if not rows:
            return None
        return [{"log": r[0], "seq": int(r[1]), "head": r[2], "ts": r[3], "sig": r[4]} for r in rows]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class AnchoredAudit:
    """The reveal service's audit trail: an AuditLog MAC'd with a key only the service holds, plus a signed
    checkpoint (log id, entry count, head MAC, time; Ed25519) written to a separate sink after every entry.

    `verify()` fails when the log or the checkpoints are missing, truncated, rewritten or out of step: every
    checkpoint must verify under the checkpoint public key and name the MAC of the log entry at its count, and the
    log may run at most one entry past the last checkpoint (a crash between the two writes).
    """

    def __init__(self, log: AuditLog, sink: Any, signing_key: Any, public_key: bytes, log_id: str) -> None:
        self.log = log
        self.sink = sink
        self._signing_key = signing_key
        self.public_key = public_key
        self.log_id = log_id
        log.on_append = self._checkpoint

    def __repr__(self) -> str:
        return f"AnchoredAudit({self.log!r}, {self.sink!r})"

    def _checkpoint(self, entry: dict[str, Any]) -> None:
        doc = {"log": self.log_id, "seq": int(entry["seq"]), "head": entry["mac"], "ts": entry["ts"]}
        doc["sig"] = base64.b64encode(self._signing_key.sign(_checkpoint_message(doc))).decode()
        self.sink.write(doc)

    def append(self, event: str, **kw: Any) -> dict[str, Any]:
        return self.log.append(event, **kw)

    def recover(self) -> bool:
        """At start-up: checkpoint a log tail that a crash left without its checkpoint (its entries are MAC'd, so
        nothing is legitimized that the service did not write). Returns True when a checkpoint was written."""
        if not self.log.path.exists():
            return False
        with open(self.log.path, "rb") as fh:
            last = AuditLog._last_line(fh)
        if last is None:
            return False
        try:
            entry = json.loads(last)
        except ValueError:
            return False  # `verify` names the damage
        cps = [c for c in (self.sink.read() or []) if c.get("log") == self.log_id]
        if cps and int(cps[-1].get("seq", 0)) >= int(entry["seq"]):
            return False
        self._checkpoint(entry)
        return True

    def verify(self) -> dict[str, Any]:
        """{"entries": n, "checkpoints": m, "checkpointed": seq} or IntegrityError naming the problem."""
        return verify_anchored(self.log, self.sink, self.public_key, self.log_id)


def verify_anchored(log: AuditLog, sink: Any, public_key: bytes, log_id: str) -> dict[str, Any]:
    from cloakbeam.keys.sealing import verify_checkpoint_signature

    macs = log.verify_macs()  # chain and MACs (needs the service's MAC key)
    cps = sink.read()
    if cps is None:
        if macs:
            raise IntegrityError(f"the audit checkpoint sink {sink!r} is missing or empty but the log holds {len(macs)} entries")
        if log.head_path.exists():
            raise IntegrityError(f"the audit log {log.path} and its checkpoints are missing, but its head file says entries were written")
        return {"entries": 0, "checkpoints": 0, "checkpointed": 0}
    cps = [c for c in cps if c.get("log") == log_id]
    last = 0
    for i, c in enumerate(cps, start=1):
        try:
            ok = verify_checkpoint_signature(public_key, _checkpoint_message(c), base64.b64decode(c["sig"]))
            seq = int(c["seq"])
        except Exception:
            ok, seq = False, -1
        if not ok:
            raise IntegrityError(f"audit checkpoint {i} is not signed by the checkpoint key (forged or altered)")
        if seq <= last:
            raise IntegrityError(f"audit checkpoint {i} goes back to entry {seq} after entry {last} (checkpoints reordered or replayed)")
        if seq > len(macs):
            raise IntegrityError(f"audit checkpoint {i} records {seq} entries but the log holds {len(macs)} (log truncated or deleted)")
        if macs[seq - 1] != c["head"]:
            raise IntegrityError(f"audit log entry {seq} does not match its signed checkpoint (log rewritten)")
        last = seq
    if not cps and macs:
        raise IntegrityError(f"the audit log holds {len(macs)} entries but no checkpoint names this log")
    # Each entry names the checkpoint its group followed: a removed checkpoint leaves entries naming it. Entries
    # after the last checkpoint are tolerated only as one group that crashed before its checkpoint was written.
    seqs = {0} | {int(c["seq"]) for c in cps}
    for i, anchor in enumerate(log.anchors, start=1):
        if anchor not in seqs:
            raise IntegrityError(f"audit log entry {i} follows a checkpoint at entry {anchor} that the sink no longer holds (checkpoints removed)")
        if i > last and anchor != last:
            raise IntegrityError(f"audit log entry {i} lies after the last signed checkpoint (entry {last}) but follows another one (checkpoints truncated)")
    return {"entries": len(macs), "checkpoints": len(cps), "checkpointed": last}
