"""The token vault: token -> original (encrypted), keyed blind index, per-subject keys, on SQLite or PostgreSQL.

Tables (same logical schema on both backends; see docs/token-vault.md):

    cloakbeam_vault_domains  domain PK, normalize, format (JSON), created_at
    cloakbeam_vault_seals    seal_id PK, record (JSON seal record: the batch key HPKE-sealed to the reveal key)
    cloakbeam_vault_keys     key_id PK, wrapped (seal id || nonce || AES-256-GCM(batch key, DEK)), created_at
    cloakbeam_vault_entries  (domain, token) PK, (domain, bidx) UNIQUE, key_id (subject keys only: subject key id
                             || seal id; NULL = the entry's own key, whose id is its bidx), counter, ciphertext
                             (nonce || AES-256-GCM(DEK, value)), created_at, expires_at, forgotten_at
    cloakbeam_vault_column_keys  key_id PK (the 8-byte cell key id), subject (subject key id), seal_id, wrapped:
                             per-subject DEKs of subject-linked encrypted columns (encrypt action `subject:`)
    cloakbeam_vault_salts    subject PK, salt: per-subject token salts (tokenize `salt: subject`)

Separation of duties (keys/sealing.py): the pipeline wraps new DEKs under its process's sealed batch key and never
unwraps a DEK it did not make in that very batch; reading originals back (`reveal`, `column_keys`) needs the reveal
keyring, which only the reveal service attaches to its key service.

Writes are idempotent and convergent: the token is a PRF of the value (no read needed to compute it); rows go in
with INSERT ... ON CONFLICT DO NOTHING, so a replayed bundle adds no rows and changes no tokens; a token that is
already taken by another value (short digit formats) is detected through the primary key and resolved by raising
that value's PRF counter. `forget` deletes the DEK (crypto-shredding) and blanks the entries it protected; the
token stays reserved so it can never be handed to another value or reversed again.

The vault never stores, logs or raises with a plaintext value. Keys come from the KeyService (`prf_key`):
`tokenize/<domain>` (token PRF), `vault/<domain>/index` (blind index), `vault/subject` (subject key ids; an
entry's own key id is its blind index); DEKs are wrapped under `seal_batch("default")`.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloakbeam.errors import CloakbeamError, ConfigError, IntegrityError, KeyAccessError
from cloakbeam.keys import native
from cloakbeam.vault.tokens import TokenFormat, Tokenizer, normalize

MAX_COUNTER = 10_000
_ENTRY_AAD = b"cloakbeam-vault-entry/v1\x00"
_DEK_AAD = b"cloakbeam-vault-dek/v2\x00"
_COLUMN_KEY_AAD = b"cloakbeam-vault-column-key/v1\x00"
SALT_SEPARATOR = "\x1f"
REVEAL_KEY = "default"  # the reveal key vault DEKs are sealed to
_SUBJECT_SUFFIX = 8  # subject key rows: subject key id (32) || seal id (8)
DEFAULT_DSN_ENV = "CLOAKBEAM_VAULT_DSN"


@dataclass(frozen=True)
class Domain:
    """A token domain: values of one kind that share a token space and key (e.g. 'email', 'card_number')."""

    name: str
    fmt: TokenFormat = TokenFormat()
    normalize: str = "trim"
    ttl_seconds: int | None = None
    salted: bool = False  # tokens salted per subject (tokenize `salt: subject`): forget erases linkage too

    def config(self) -> dict[str, Any]:
        """What must never change for a domain once tokens exist (format, normalization, salting)."""
        cfg: dict[str, Any] = {
            "normalize": self.normalize,
            "kind": self.fmt.kind,
            "prefix": self.fmt.prefix if self.fmt.kind == "opaque" else "",
            "keep_last": self.fmt.keep_last,
            "luhn": self.fmt.luhn,
        }
        if self.salted:
            cfg["salted"] = True
        return cfg

    @staticmethod
    def from_config(name: str, cfg: Mapping[str, Any]) -> Domain:
        fmt = TokenFormat(kind=cfg["kind"], prefix=cfg.get("prefix") or "tok_", keep_last=int(cfg["keep_last"]), luhn=bool(cfg["luhn"]))
        return Domain(name, fmt, cfg["normalize"], salted=bool(cfg.get("salted", False)))


@dataclass
class Entry:
    """One vault row as read back for detokenization (ciphertext only; no plaintext)."""

    token: str
    bidx: bytes | None
    key_id: bytes | None
    counter: int
    ciphertext: bytes | None
    created_at: int
    expires_at: int | None
    forgotten_at: int | None


# --------------------------------------------------------------------------------------------------------------
# Backends: the same operations in SQLite and PostgreSQL dialects.
# --------------------------------------------------------------------------------------------------------------


class _Backend:
    """What both backends share: the statements that differ only in the parameter placeholder `_p`."""

    name = ""
    _p = "?"
    _blob = "BLOB"
    conn: Any

    def transaction(self) -> Any:  # context manager
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- statements each backend implements (SQLite and PostgreSQL differ in more than the placeholder) -----
    def domain_config(self, domain: str) -> str | None:
        raise NotImplementedError

    def insert_domain(self, domain: str, normalize_: str, fmt: str, now: int) -> None:
        raise NotImplementedError

    def tokens_by_bidx(self, domain: str, bidxs: Sequence[bytes]) -> dict[bytes, str]:
        raise NotImplementedError

    def insert_keys(self, rows: Sequence[tuple[bytes, bytes, int]]) -> int:
        raise NotImplementedError

    def get_keys(self, key_ids: Sequence[bytes]) -> dict[bytes, bytes]:
        raise NotImplementedError

    def insert_entries(self, domain: str, rows: Sequence[tuple[str, bytes, bytes | None, int, bytes]], now: int, expires: int | None) -> int:
        raise NotImplementedError

    def entries_by_token(self, domain: str, tokens: Sequence[str]) -> dict[str, Entry]:
        raise NotImplementedError

    def key_of_bidx(self, domain: str, bidx: bytes) -> bytes | None:
        raise NotImplementedError

    def after_shred(self) -> None:
        raise NotImplementedError

    def shred(self, key_id: bytes, now: int, domain: str | None = None) -> int:
        """Delete a data key and blank the entries it protected. A 32-byte subject key id covers every key row
        of that subject (id = subject || seal id, one per pipeline batch); with `domain`, also the entry whose
        own key it is (key_id NULL, bidx = it)."""
        p = self._p
        lo, hi = key_id + b"\x00" * _SUBJECT_SUFFIX, key_id + b"\xff" * _SUBJECT_SUFFIX
        self.conn.execute(f"DELETE FROM cloakbeam_vault_keys WHERE key_id = {p} OR (key_id >= {p} AND key_id <= {p})", (key_id, lo, hi))
        blank = f"UPDATE cloakbeam_vault_entries SET bidx = NULL, key_id = NULL, ciphertext = NULL, forgotten_at = {p}"
        n = self.conn.execute(blank + f" WHERE key_id >= {p} AND key_id <= {p}", (now, lo, hi)).rowcount
        if domain is not None:
            n += self.conn.execute(blank + f" WHERE domain = {p} AND bidx = {p} AND key_id IS NULL", (now, domain, key_id)).rowcount
        return n

    def shred_subject_extras(self, subject_kid: bytes) -> int:
        """Delete a subject's column keys (subject-linked encrypted columns) and token salt; return how many."""
        p = self._p
        # Tombstones (random cell key ids, nothing else) tell "forgotten" apart from "not this vault".
        self.conn.execute(
            f"INSERT INTO cloakbeam_vault_forgotten_keys (key_id, forgotten_at) SELECT key_id, {p} FROM cloakbeam_vault_column_keys"
            f" WHERE subject = {p} ON CONFLICT DO NOTHING",
            (int(time.time()), subject_kid),
        )
        n = self.conn.execute(f"DELETE FROM cloakbeam_vault_column_keys WHERE subject = {p}", (subject_kid,)).rowcount
        n += self.conn.execute(f"DELETE FROM cloakbeam_vault_salts WHERE subject = {p}", (subject_kid,)).rowcount
        return n

    def insert_seal(self, seal_id: bytes, record: str, now: int) -> None:
        p = self._p
        self.conn.execute(
            f"INSERT INTO cloakbeam_vault_seals (seal_id, record, created_at) VALUES ({p},{p},{p}) ON CONFLICT DO NOTHING", (seal_id, record, now)
        )

    def get_seals(self, seal_ids: Sequence[bytes]) -> dict[bytes, str]:
        out: dict[bytes, str] = {}
        for part in _chunks(list(seal_ids), 500):
            q = f"SELECT seal_id, record FROM cloakbeam_vault_seals WHERE seal_id IN ({','.join([self._p] * len(part))})"
            out.update((bytes(k), str(r)) for k, r in self.conn.execute(q, tuple(part)).fetchall())
        return out

    def insert_column_keys(self, rows: Sequence[tuple[bytes, bytes, bytes, bytes, int]]) -> int:
        """Insert (cell key id, subject key id, seal id, wrapped, created_at) rows; return how many went in."""
        p = self._p
        n = 0
        for part in _chunks(list(rows), 500):
            values = ",".join([f"({p},{p},{p},{p},{p})"] * len(part))
            args = [x for r in part for x in r]
            n += self.conn.execute(
                f"INSERT INTO cloakbeam_vault_column_keys (key_id, subject, seal_id, wrapped, created_at) VALUES {values} ON CONFLICT DO NOTHING", args
            ).rowcount
        return n

    def get_column_keys(self, key_ids: Sequence[bytes]) -> dict[bytes, tuple[bytes, bytes, bytes]]:
        """cell key id -> (subject key id, seal id, wrapped) for the ids that still exist."""
        out: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        for part in _chunks(list(key_ids), 500):
            q = f"SELECT key_id, subject, seal_id, wrapped FROM cloakbeam_vault_column_keys WHERE key_id IN ({','.join([self._p] * len(part))})"
            for k, subj, sid, w in self.conn.execute(q, tuple(part)).fetchall():
                out[bytes(k)] = (bytes(subj), bytes(sid), bytes(w))
        return out

    def forgotten_column_keys(self, key_ids: Sequence[bytes]) -> set[bytes]:
        out: set[bytes] = set()
        for part in _chunks(list(key_ids), 500):
            q = f"SELECT key_id FROM cloakbeam_vault_forgotten_keys WHERE key_id IN ({','.join([self._p] * len(part))})"
            out.update(bytes(r[0]) for r in self.conn.execute(q, tuple(part)).fetchall())
        return out

    def get_salts(self, subjects: Sequence[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for part in _chunks(list(subjects), 500):
            q = f"SELECT subject, salt FROM cloakbeam_vault_salts WHERE subject IN ({','.join([self._p] * len(part))})"
            out.update((bytes(k), bytes(v)) for k, v in self.conn.execute(q, tuple(part)).fetchall())
        return out

    def insert_salts(self, rows: Sequence[tuple[bytes, bytes, int]]) -> None:
        p = self._p
        for part in _chunks(list(rows), 500):
            values = ",".join([f"({p},{p},{p})"] * len(part))
            self.conn.execute(
                f"INSERT INTO cloakbeam_vault_salts (subject, salt, created_at) VALUES {values} ON CONFLICT DO NOTHING", [x for r in part for x in r]
            )

    def shred_expired(self, domain: str | None, now: int) -> int:
        """Blank every expired, not yet forgotten entry; delete the data keys no live entry uses any more."""
        p = self._p
        dom = f" AND domain = {p}" if domain is not None else ""
        args: tuple[Any, ...] = (now, domain) if domain is not None else (now,)
        expired = f"expires_at IS NOT NULL AND expires_at <= {p} AND forgotten_at IS NULL{dom}"
        self.conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS cloakbeam_expired_keys (key_id {self._blob} PRIMARY KEY)"
        )
        self.conn.execute("DELETE FROM cloakbeam_expired_keys")
        self.conn.execute(
            f"INSERT INTO cloakbeam_expired_keys SELECT DISTINCT COALESCE(key_id, bidx) FROM cloakbeam_vault_entries WHERE {expired}",
            args,
        )
        cur = self.conn.execute(
            f"UPDATE cloakbeam_vault_entries SET bidx = NULL, key_id = NULL, ciphertext = NULL, forgotten_at = {p} WHERE {expired}",
            (now, *args),
        )
        n = cur.rowcount
        self.conn.execute(
            "DELETE FROM cloakbeam_vault_keys WHERE key_id IN (SELECT key_id FROM cloakbeam_expired_keys)"
            " AND NOT EXISTS (SELECT 1 FROM cloakbeam_vault_entries e WHERE e.key_id = cloakbeam_vault_keys.key_id)"
        )
        return n

    def count_entries(self, domain: str | None = None) -> int:
        if domain is None:
            return self.conn.execute("SELECT count(*) FROM cloakbeam_vault_entries").fetchone()[0]
        return self.conn.execute(f"SELECT count(*) FROM cloakbeam_vault_entries WHERE domain = {self._p}", (domain,)).fetchone()[0]

    def count_keys(self) -> int:
        return self.conn.execute("SELECT count(*) FROM cloakbeam_vault_keys").fetchone()[0]



_SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS cloakbeam_vault_domains (
  domain TEXT PRIMARY KEY, normalize TEXT NOT NULL, format TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cloakbeam_vault_keys (
  key_id BLOB PRIMARY KEY, wrapped BLOB NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cloakbeam_vault_entries (
  domain TEXT NOT NULL, token TEXT NOT NULL, bidx BLOB, key_id BLOB, counter INTEGER NOT NULL,
  ciphertext BLOB, created_at INTEGER NOT NULL, expires_at INTEGER, forgotten_at INTEGER,
  PRIMARY KEY (domain, token)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS cloakbeam_vault_entries_bidx ON cloakbeam_vault_entries (domain, bidx);
CREATE INDEX IF NOT EXISTS cloakbeam_vault_entries_subject_key ON cloakbeam_vault_entries (key_id) WHERE key_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS cloakbeam_vault_seals (
  seal_id BLOB PRIMARY KEY, record TEXT NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cloakbeam_vault_column_keys (
  key_id BLOB PRIMARY KEY, subject BLOB NOT NULL, seal_id BLOB NOT NULL, wrapped BLOB NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cloakbeam_vault_column_keys_subject ON cloakbeam_vault_column_keys (subject);
CREATE TABLE IF NOT EXISTS cloakbeam_vault_salts (
  subject BLOB PRIMARY KEY, salt BLOB NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cloakbeam_vault_forgotten_keys (
  key_id BLOB PRIMARY KEY, forgotten_at INTEGER NOT NULL) WITHOUT ROWID;
"""

_PG_DDL = """
CREATE TABLE IF NOT EXISTS cloakbeam_vault_domains (
  domain TEXT PRIMARY KEY, normalize TEXT NOT NULL, format TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS cloakbeam_vault_keys (
  key_id BYTEA PRIMARY KEY, wrapped BYTEA NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS cloakbeam_vault_entries (
  domain TEXT NOT NULL, token TEXT NOT NULL, bidx BYTEA, key_id BYTEA, counter INTEGER NOT NULL,
  ciphertext BYTEA, created_at BIGINT NOT NULL, expires_at BIGINT, forgotten_at BIGINT,
  PRIMARY KEY (domain, token), UNIQUE (domain, bidx));
CREATE INDEX IF NOT EXISTS cloakbeam_vault_entries_subject_key ON cloakbeam_vault_entries (key_id) WHERE key_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS cloakbeam_vault_seals (
  seal_id BYTEA PRIMARY KEY, record TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS cloakbeam_vault_column_keys (
  key_id BYTEA PRIMARY KEY, subject BYTEA NOT NULL, seal_id BYTEA NOT NULL, wrapped BYTEA NOT NULL, created_at BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS cloakbeam_vault_column_keys_subject ON cloakbeam_vault_column_keys (subject);
CREATE TABLE IF NOT EXISTS cloakbeam_vault_salts (
  subject BYTEA PRIMARY KEY, salt BYTEA NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS cloakbeam_vault_forgotten_keys (
  key_id BYTEA PRIMARY KEY, forgotten_at BIGINT NOT NULL);
"""

_ENTRY_COLS = "token, bidx, key_id, counter, ciphertext, created_at, expires_at, forgotten_at"


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class SQLiteBackend(_Backend):
    """Embedded default: one file, WAL journal, `BEGIN IMMEDIATE` write transactions, secure_delete on."""

    name = "sqlite"
    _p = "?"
    _blob = "BLOB"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        # Two workers opening a new vault at once can see "database is locked" from the WAL switch or the
        # DDL without SQLite's busy handler being consulted; opening is idempotent, so retry for a while.
        deadline = time.monotonic() + 60.0
        while True:
            try:
                self._open()
                break
            except sqlite3.OperationalError as exc:
                self.close()
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise ConfigError(f"cannot open SQLite vault {self.path}: {exc.__class__.__name__}") from None
                time.sleep(0.05 + random.random() * 0.2)
            except sqlite3.DatabaseError as exc:
                raise ConfigError(f"cannot open SQLite vault {self.path}: {exc.__class__.__name__}") from None

    def _open(self) -> None:
        self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=60000")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA cache_size=-131072")  # 128 MiB page cache: random-key B-tree inserts
        self.conn.execute("PRAGMA secure_delete=ON")  # forgotten keys are overwritten, not left in free pages
        with self.transaction():
            for stmt in _SQLITE_DDL.split(";"):
                if stmt.strip():
                    self.conn.execute(stmt)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def domain_config(self, domain: str) -> str | None:
        row = self.conn.execute("SELECT format FROM cloakbeam_vault_domains WHERE domain = ?", (domain,)).fetchone()
        return row[0] if row else None

    def insert_domain(self, domain: str, normalize_: str, fmt: str, now: int) -> None:
        self.conn.execute(
            "INSERT INTO cloakbeam_vault_domains (domain, normalize, format, created_at) VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
            (domain, normalize_, fmt, now),
        )

    def tokens_by_bidx(self, domain: str, bidxs: Sequence[bytes]) -> dict[bytes, str]:
        out: dict[bytes, str] = {}
        for part in _chunks(sorted(bidxs), 500):  # index order: neighbouring probes share pages
            q = f"SELECT bidx, token FROM cloakbeam_vault_entries INDEXED BY cloakbeam_vault_entries_bidx WHERE domain = ? AND bidx IN ({','.join('?' * len(part))})"
            out.update(self.conn.execute(q, (domain, *part)).fetchall())
        return out

    def insert_keys(self, rows: Sequence[tuple[bytes, bytes, int]]) -> int:
        """Insert new keys; return how many rows were actually inserted (the rest already existed)."""
        before = self.conn.total_changes
        self.conn.executemany(
            "INSERT INTO cloakbeam_vault_keys (key_id, wrapped, created_at) VALUES (?,?,?) ON CONFLICT DO NOTHING", rows
        )
        return self.conn.total_changes - before

    def get_keys(self, key_ids: Sequence[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for part in _chunks(list(key_ids), 500):
            q = f"SELECT key_id, wrapped FROM cloakbeam_vault_keys WHERE key_id IN ({','.join('?' * len(part))})"
            out.update((bytes(k), bytes(w)) for k, w in self.conn.execute(q, tuple(part)))
        return out

    def insert_entries(self, domain: str, rows: Sequence[tuple[str, bytes, bytes | None, int, bytes]], now: int, expires: int | None) -> int:
        """Insert entries; return how many were actually inserted (conflicts on token or blind index skip)."""
        before = self.conn.total_changes
        self.conn.executemany(
            "INSERT INTO cloakbeam_vault_entries (domain, token, bidx, key_id, counter, ciphertext, created_at, expires_at)"
            " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            [(domain, t, b, k, c, x, now, expires) for t, b, k, c, x in rows],
        )
        return self.conn.total_changes - before

    def entries_by_token(self, domain: str, tokens: Sequence[str]) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for part in _chunks(list(tokens), 500):
            q = f"SELECT {_ENTRY_COLS} FROM cloakbeam_vault_entries WHERE domain = ? AND token IN ({','.join('?' * len(part))})"
            for r in self.conn.execute(q, (domain, *part)):
                out[r[0]] = _entry(r)
        return out

    def key_of_bidx(self, domain: str, bidx: bytes) -> bytes | None:
        row = self.conn.execute("SELECT key_id FROM cloakbeam_vault_entries INDEXED BY cloakbeam_vault_entries_bidx WHERE domain = ? AND bidx = ?", (domain, bidx)).fetchone()
        if row is None:
            return None
        return bytes(row[0]) if row[0] is not None else bidx

    def after_shred(self) -> None:
        # Old page images of the deleted key live in the WAL until a checkpoint; truncate it now.
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


class PostgresBackend(_Backend):
    """PostgreSQL through psycopg 3: array-valued INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING."""

    name = "postgres"
    _p = "%s"
    _blob = "BYTEA"

    def __init__(self, dsn: str, where: str) -> None:
        import psycopg

        self._psycopg = psycopg
        try:
            self.conn = psycopg.connect(dsn, autocommit=True, application_name="cloakbeam-vault")
        except psycopg.Error:
            # The DSN may hold a password: name only where it came from.
            raise ConfigError(f"cannot connect to the PostgreSQL vault named by {where}; check the DSN and that the server is up") from None
        with self.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(7243501)")  # concurrent first-time DDL
            self.conn.execute(_PG_DDL)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def domain_config(self, domain: str) -> str | None:
        row = self.conn.execute("SELECT format FROM cloakbeam_vault_domains WHERE domain = %s", (domain,)).fetchone()
        return row[0] if row else None

    def insert_domain(self, domain: str, normalize_: str, fmt: str, now: int) -> None:
        self.conn.execute(
            "INSERT INTO cloakbeam_vault_domains (domain, normalize, format, created_at) VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (domain, normalize_, fmt, now),
        )

    def tokens_by_bidx(self, domain: str, bidxs: Sequence[bytes]) -> dict[bytes, str]:
        if not bidxs:
            return {}
        cur = self.conn.execute(
            "SELECT bidx, token FROM cloakbeam_vault_entries WHERE domain = %s AND bidx = ANY(%b::bytea[])", (domain, list(bidxs)), binary=True
        )
        return {bytes(b): t for b, t in cur}

    def insert_keys(self, rows: Sequence[tuple[bytes, bytes, int]]) -> int:
        if not rows:
            return 0
        rows = sorted(rows)  # one lock order for every writer: no deadlocks between overlapping batches
        cur = self.conn.execute(
            "INSERT INTO cloakbeam_vault_keys (key_id, wrapped, created_at)"
            " SELECT k, w, %s FROM unnest(%b::bytea[], %b::bytea[]) AS u(k, w) ON CONFLICT DO NOTHING",
            (rows[0][2], [r[0] for r in rows], [r[1] for r in rows]),
            binary=True,  # binary arrays: text-format bytea escaping costs more than the insert itself
        )
        return cur.rowcount

    def get_keys(self, key_ids: Sequence[bytes]) -> dict[bytes, bytes]:
        if not key_ids:
            return {}
        cur = self.conn.execute("SELECT key_id, wrapped FROM cloakbeam_vault_keys WHERE key_id = ANY(%b::bytea[])", (list(key_ids),), binary=True)
        return {bytes(k): bytes(w) for k, w in cur}

    def insert_entries(self, domain: str, rows: Sequence[tuple[str, bytes, bytes | None, int, bytes]], now: int, expires: int | None) -> int:
        if not rows:
            return 0
        rows = sorted(rows, key=lambda r: r[1])
        cur = self.conn.execute(
            "INSERT INTO cloakbeam_vault_entries (domain, token, bidx, key_id, counter, ciphertext, created_at, expires_at)"
            " SELECT %s, t, b, k, c, x, %s, %s FROM unnest(%b::text[], %b::bytea[], %b::bytea[], %b::int[], %b::bytea[])"
            " AS u(t, b, k, c, x) ON CONFLICT DO NOTHING",
            (domain, now, expires, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows]),
            binary=True,
        )
        return cur.rowcount

    def entries_by_token(self, domain: str, tokens: Sequence[str]) -> dict[str, Entry]:
        if not tokens:
            return {}
        cur = self.conn.execute(
            f"SELECT {_ENTRY_COLS} FROM cloakbeam_vault_entries WHERE domain = %s AND token = ANY(%b::text[])", (domain, list(tokens)), binary=True
        )
        return {r[0]: _entry(r) for r in cur}

    def key_of_bidx(self, domain: str, bidx: bytes) -> bytes | None:
        row = self.conn.execute("SELECT key_id FROM cloakbeam_vault_entries WHERE domain = %s AND bidx = %s", (domain, bidx)).fetchone()
        if row is None:
            return None
        return bytes(row[0]) if row[0] is not None else bidx

    def after_shred(self) -> None:
        # Dead tuples keep the deleted DEK until VACUUM reclaims them.
        self.conn.execute("VACUUM cloakbeam_vault_keys")
        self.conn.execute("VACUUM cloakbeam_vault_entries")

    def is_retryable(self, exc: BaseException) -> bool:
        errors = self._psycopg.errors
        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure))

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


def _entry(r: Sequence[Any]) -> Entry:
    return Entry(
        token=r[0],
        bidx=None if r[1] is None else bytes(r[1]),
        key_id=None if r[2] is None else bytes(r[2]),
        counter=int(r[3]),
        ciphertext=None if r[4] is None else bytes(r[4]),
        created_at=int(r[5]),
        expires_at=None if r[6] is None else int(r[6]),
        forgotten_at=None if r[7] is None else int(r[7]),
    )


# --------------------------------------------------------------------------------------------------------------
# The vault
# --------------------------------------------------------------------------------------------------------------


_SUBJECT_DEK_CACHE = 200_000  # subject entry keys a worker keeps (32 bytes each), then starts over


def _is_subject_key(kid: bytes) -> bool:
    """A subject key row's id (subject key id || seal id), not an entry's own key (its blind index)."""
    return len(kid) == 32 + _SUBJECT_SUFFIX


class _LRU:
    """Per-worker cache of (domain, normalized value) -> token already confirmed in the vault."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict[tuple[str, str], str] = OrderedDict()

    def get(self, key: tuple[str, str]) -> str | None:
        tok = self.data.get(key)
        if tok is not None:
            self.data.move_to_end(key)
        return tok

    def put(self, key: tuple[str, str], tok: str) -> None:
        self.data[key] = tok
        if len(self.data) > self.capacity:
            self.data.popitem(last=False)

    def drop_domain(self, domain: str) -> None:
        for k in [k for k in self.data if k[0] == domain]:
            del self.data[k]


class Vault:
    """Token vault for one worker (not picklable: holds a connection and keys). Create it in `DoFn.setup()`."""

    def __init__(self, backend: _Backend, key_service: Any, cache_size: int = 200_000) -> None:
        self.backend = backend
        self._keys = key_service
        self._cache = _LRU(cache_size)
        self._prf: dict[str, bytes] = {}
        self._tokenizers: dict[tuple[str, TokenFormat], Tokenizer] = {}
        self._domains: dict[str, Domain] = {}
        self._lock = threading.Lock()
        self._seal_cache: dict[bytes, dict[str, Any]] = {}
        self._column_keys: dict[tuple[bytes, bytes], Any] = {}  # (seal id, subject key id) -> this batch's DataKey
        # Subject entry keys this process made and committed (key id = subject key id || seal id, so no other
        # process writes these rows): the other fields of the same subject reuse them without reading back and
        # unwrapping. Raw 32-byte keys only; bounded; cleared by every forget.
        self._subject_deks: dict[bytes, bytes] = {}

    def __reduce__(self):  # noqa: D105
        raise TypeError("Vault holds a database connection and keys; pickle the vault reference dict instead")

    def __repr__(self) -> str:
        return f"Vault(backend={self.backend.name!r})"

    # -- keys ----------------------------------------------------------------------------------------------
    def _key(self, purpose: str) -> bytes:
        k = self._prf.get(purpose)
        if k is None:
            k = self._prf[purpose] = self._keys.prf_key(purpose)
        return k

    def tokenizer(self, domain: Domain) -> Tokenizer:
        t = self._tokenizers.get((domain.name, domain.fmt))
        if t is None:
            t = self._tokenizers[(domain.name, domain.fmt)] = Tokenizer(self._key(f"tokenize/{domain.name}"), domain.fmt)
        return t

    def blind_index(self, domain: str, values: Sequence[str]) -> list[bytes]:
        """Keyed HMAC of normalized values: lets the vault find a value's row without storing the value.
        One native keyed-digest call for all values (`cloakbeam.keys.native.hmac_list`)."""
        return native.hmac_list(self._key(f"vault/{domain}/index"), values)

    def _subject_key_ids(self, subjects: Sequence[str]) -> list[bytes]:
        """Subject key ids (keyed HMAC of the subject id) of many subjects in one native call."""
        return native.hmac_list(self._key("vault/subject"), subjects)

    def _subject_key_id(self, subject: str) -> bytes:
        return self._subject_key_ids([subject])[0]

    def subject_ref(self, subject: str) -> str:
        """Keyed hash naming a subject in audit entries (the subject's key id, hex); never the id itself."""
        return self._subject_key_id(subject).hex()

    @staticmethod
    def _entry_key_id(domain: str, bidx: bytes) -> bytes:
        # The blind index is already a per-domain keyed hash: it names the entry's own key.
        return bidx

    def _reveal_keys(self, what: str, seal: dict[str, Any] | None = None) -> Any:
        reveal = getattr(self._keys, "reveal_keys", None)
        if reveal is None:
            from cloakbeam.keys.sealing import not_held_error

            raise not_held_error(what, seal)
        return reveal

    def _seal_record(self, seal_id: bytes) -> dict[str, Any]:
        rec = self._seal_cache.get(seal_id)
        if rec is None:
            raw = self.backend.get_seals([seal_id]).get(seal_id)
            if raw is None:
                raise IntegrityError("a vault data key names a seal that is not in the vault (tampered key table)")
            rec = self._seal_cache[seal_id] = json.loads(raw)
        return rec

    def _store_seal(self, batch: Any) -> None:
        """Record the batch's seal inside the current transaction, in every transaction that writes rows naming
        it (an idempotent insert). Not once per process: a "stored" flag set in a transaction that then rolled
        back (a lost worker, a busy retry) made every later key name a seal that was never committed, and their
        entries could not be revealed."""
        self.backend.insert_seal(batch.seal_id, json.dumps(batch.record, sort_keys=True), int(time.time()))

    def _unwrap(self, key_id: bytes, wrapped: bytes) -> AESGCM:
        """A vault DEK (reveal service only: needs the reveal keyring to unseal its batch key)."""
        seal_id, body = wrapped[:8], wrapped[8:]
        if len(wrapped) != 8 + 12 + 32 + 16:
            raise KeyAccessError("a vault data key is not in the sealed format (written by an older cloakbeam, or tampered)")
        seal = self._seal_record(seal_id)
        material = self._reveal_keys("a vault original", seal).unwrap(seal, body, _DEK_AAD + key_id)
        return AESGCM(material)

    def _batch(self) -> Any:
        return self._keys.seal_batch(REVEAL_KEY)

    # -- domains -------------------------------------------------------------------------------------------
    def register(self, domain: Domain) -> None:
        """Record a domain's format and normalization at first use; refuse a different one later."""
        known = self._domains.get(domain.name)
        if known is not None and known.config() == domain.config():
            return
        cfg = json.dumps(domain.config(), sort_keys=True)
        stored = self.backend.domain_config(domain.name)
        if stored is None:
            with self.backend.transaction():
                self.backend.insert_domain(domain.name, domain.normalize, cfg, int(time.time()))
            stored = self.backend.domain_config(domain.name)
        if stored != cfg:
            raise ConfigError(
                f"token domain '{domain.name}' already exists in the vault with a different format or normalization; "
                "use a new 'domain' name or the original settings"
            )
        self._domains[domain.name] = domain

    def domain(self, name: str) -> Domain:
        """The domain as stored in the vault (for detokenize/forget, which do not see the policy)."""
        known = self._domains.get(name)
        if known is not None:
            return known
        stored = self.backend.domain_config(name)
        if stored is None:
            raise CloakbeamError(f"token domain '{name}' does not exist in this vault")
        return Domain.from_config(name, json.loads(stored))

    # -- tokenize ------------------------------------------------------------------------------------------
    def tokenize(self, domain: Domain, values: Sequence[str], subjects: Sequence[str | None] | None = None) -> list[str]:
        """Tokens for already-normalized, distinct `values`, writing new ones to the vault in one transaction.

        `subjects` (optional, aligned with values) names the data subject each value belongs to; entries of
        one subject share a DEK, so `forget_subject` shreds all of them at once.
        """
        with self._lock:
            self.register(domain)
            out: list[str | None] = [None] * len(values)
            miss: list[int] = []
            for i, v in enumerate(values):
                tok = self._cache.get((domain.name, v))
                if tok is None:
                    miss.append(i)
                else:
                    out[i] = tok
            if miss:
                vals = [values[i] for i in miss]
                subj = [subjects[i] for i in miss] if subjects is not None else None
                toks = self._write(domain, vals, subj)
                for i, v, t in zip(miss, vals, toks):
                    out[i] = t
                    self._cache.put((domain.name, v), t)
            return out  # type: ignore[return-value]

    def _write(self, domain: Domain, vals: list[str], subj: list[str | None] | None) -> list[str]:
        for attempt in range(5):
            try:
                made: dict[bytes, bytes] = {}  # subject keys this transaction made or opened
                with self.backend.transaction():
                    out = self._write_tx(domain, vals, subj, made)
                # Only keys whose rows are committed may be reused (a rolled-back row would orphan entries).
                if len(self._subject_deks) + len(made) > _SUBJECT_DEK_CACHE:
                    self._subject_deks.clear()
                self._subject_deks.update(made)
                return out
            except Exception as exc:
                retry = getattr(self.backend, "is_retryable", None)
                if retry is None or not retry(exc) or attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _write_tx(self, domain: Domain, vals: list[str], subj: list[str | None] | None, made: dict[bytes, bytes]) -> list[str]:
        """One write transaction; the subject keys it makes or opens go into `made` (for `_write` to keep once
        the transaction has committed)."""
        name = domain.name
        be = self.backend
        bidx = self.blind_index(name, vals)
        found = be.tokens_by_bidx(name, bidx)
        result: list[str | None] = [found.get(b) for b in bidx]
        new = [i for i, t in enumerate(result) if t is None]
        if not new:
            return result  # type: ignore[return-value]
        now = int(time.time())
        expires = now + domain.ttl_seconds if domain.ttl_seconds else None
        # Data keys: one per subject and pipeline batch (id = subject key id || seal id) or one per entry (id =
        # blind index); random, wrapped under the process's sealed batch key, idempotent insert. Subject key ids
        # come from the native keyed-digest kernel, once per distinct subject.
        batch = self._batch()
        self._store_seal(batch)
        named = sorted({s for i in new if (s := subj[i])}) if subj is not None else []
        skid = dict(zip(named, self._subject_key_ids(named)))
        kids = [
            skid[s] + batch.seal_id if (s := (subj[i] if subj is not None else None)) else self._entry_key_id(name, bidx[i])
            for i in new
        ]
        # A subject key this process already made and committed under this seal (another field of the same
        # subject, an earlier batch) is used as is: no new key, no insert attempt, no read back and unwrap.
        deks: dict[bytes, AESGCM] = {}
        uniq = []
        for kid in sorted(set(kids)):
            known = self._subject_deks.get(kid) if _is_subject_key(kid) else None
            if known is not None:
                deks[kid] = AESGCM(known)
            else:
                uniq.append(kid)
        raw = os.urandom(32 * len(uniq))
        wrapped = batch.wrap_many([raw[32 * j : 32 * j + 32] for j in range(len(uniq))], [_DEK_AAD + kid for kid in uniq])
        key_rows = [(kid, batch.seal_id + w, now) for kid, w in zip(uniq, wrapped)]
        if not key_rows or be.insert_keys(key_rows) == len(key_rows):
            stored = {kid: w for kid, w, _ in key_rows}  # every key is ours: no read back needed
        else:
            stored = be.get_keys(uniq)
        for j, (kid, mine, _) in enumerate(key_rows):
            theirs = stored.get(kid)
            material = None
            if theirs == mine:  # our own insert won (the usual case): the DEK we just made
                material = raw[32 * j : 32 * j + 32]
            elif theirs is not None and theirs[:8] == batch.seal_id:  # made by this process earlier in this batch key
                material = batch.unwrap(theirs[8:], _DEK_AAD + kid)
            # else: an entry key another writer inserted together with its entry (we cannot and need not open it)
            if material is not None:
                deks[kid] = AESGCM(material)
                if _is_subject_key(kid):
                    made[kid] = material
        foreign = [i for i, kid in zip(new, kids) if kid not in deks]
        if foreign:
            have = be.tokens_by_bidx(name, [bidx[i] for i in foreign])
            for i in foreign:
                if bidx[i] not in have:
                    raise IntegrityError(f"token domain '{name}': a vault key row exists without its entry (tampered key table)")
                result[i] = have[bidx[i]]
            keep = [p for p, kid in enumerate(kids) if kid in deks]
            new = [new[p] for p in keep]
            kids = [kids[p] for p in keep]
            if not new:
                return result  # type: ignore[return-value]
        # Ciphertexts are bound to (domain, blind index): a row's value cannot be moved to another row.
        name_b = name.encode() + b"\x00"
        cts = []
        for i, kid in zip(new, kids):
            nonce = os.urandom(12)
            cts.append(nonce + deks[kid].encrypt(nonce, vals[i].encode(), _ENTRY_AAD + name_b + bidx[i]))
        tk = self.tokenizer(domain)
        counters = [0] * len(new)
        pending = list(range(len(new)))  # positions into `new`
        while pending:
            toks = tk.tokens([vals[new[p]] for p in pending], [counters[p] for p in pending])
            rows = [(t, bidx[new[p]], kids[p] if kids[p] != bidx[new[p]] else None, counters[p], cts[p]) for p, t in zip(pending, toks)]
            if be.insert_entries(name, rows, now, expires) == len(rows):
                check = {bidx[new[p]]: t for p, t in zip(pending, toks)}  # no conflict: every token is ours
            else:
                check = be.tokens_by_bidx(name, [bidx[new[p]] for p in pending])
            still = []
            for p in pending:
                tok = check.get(bidx[new[p]])
                if tok is None:  # our token belongs to another value: next counter, deterministically
                    counters[p] += 1
                    if counters[p] > MAX_COUNTER:
                        raise IntegrityError(f"token domain '{name}' has no free token left for a value; use a longer format")
                    still.append(p)
                else:
                    result[new[p]] = tok
            pending = still
        return result  # type: ignore[return-value]

    # -- read back -----------------------------------------------------------------------------------------
    def reveal(self, domain_name: str, tokens: Sequence[str], now: float | None = None) -> list[tuple[str, str | None]]:
        """(status, value) per token; status is ok | not_found | expired | forgotten. No authorization here:
        callers go through the reveal service (vault/service.py), which checks grants and audits. Needs the
        reveal keyring attached to the key service; the pipeline's keyring alone raises KeyAccessError."""
        domain = self.domain(domain_name)
        now = time.time() if now is None else now
        entries = self.backend.entries_by_token(domain_name, list(dict.fromkeys(tokens)))
        def kid(e: Entry) -> bytes | None:
            return e.key_id if e.key_id is not None else e.bidx  # NULL key_id: the entry's own key (id = bidx)

        kids = sorted({k for k in map(kid, entries.values()) if k is not None})
        wrapped = self.backend.get_keys(kids)
        deks: dict[bytes, AESGCM] = {k: self._unwrap(k, w) for k, w in wrapped.items()}
        tk = self.tokenizer(domain)
        name_b = domain_name.encode() + b"\x00"
        out: list[tuple[str, str | None]] = []
        for tok in tokens:
            e = entries.get(tok)
            if e is None:
                out.append(("not_found", None))
                continue
            k = kid(e)
            if e.forgotten_at is not None or k is None or k not in deks or e.ciphertext is None or e.bidx is None:
                out.append(("forgotten", None))
                continue
            if e.expires_at is not None and now >= e.expires_at:
                out.append(("expired", None))
                continue
            try:
                value = deks[k].decrypt(e.ciphertext[:12], e.ciphertext[12:], _ENTRY_AAD + name_b + e.bidx).decode()
            except InvalidTag:
                raise IntegrityError(f"vault entry for a token of domain '{domain_name}' fails authentication (tampered row)") from None
            if tk.token_at(value, e.counter) != tok or self.blind_index(domain_name, [value])[0] != e.bidx:
                raise IntegrityError(f"vault entry for a token of domain '{domain_name}' does not match its token (tampered row)")
            if domain.salted:  # stored as salt || separator || value: the caller gets the value
                value = value.split(SALT_SEPARATOR, 1)[-1]
            out.append(("ok", value))
        return out

    def find_token(self, domain_name: str, value: str) -> str | None:
        """The token of `value` in `domain_name` if the vault holds it (lookup by blind index)."""
        domain = self.domain(domain_name)
        _refuse_salted(domain)
        norm = normalize([value], domain.normalize)[0]
        b = self.blind_index(domain_name, [norm])[0]
        return self.backend.tokens_by_bidx(domain_name, [b]).get(b)

    # -- erasure -------------------------------------------------------------------------------------------
    def forget_value(self, domain_name: str, value: str) -> int:
        """Crypto-shred the key protecting `value`'s entry (and every entry of the same subject). Returns entries shredded."""
        domain = self.domain(domain_name)
        _refuse_salted(domain)
        norm = normalize([value], domain.normalize)[0]
        b = self.blind_index(domain_name, [norm])[0]
        with self.backend.transaction():
            kid = self.backend.key_of_bidx(domain_name, b)
            if kid is not None and _is_subject_key(kid):
                kid = kid[:32]  # a subject key row: shred the subject's entries
            n = self.backend.shred(kid, int(time.time()), domain_name) if kid is not None else 0
        self._after_forget()
        return n

    def forget_subject(self, subject: str) -> int:
        """Crypto-shred a subject: every vault entry tokenized with this subject id becomes irreversible, the
        subject's column keys (subject-linked encrypted columns, in every existing output) and its token salt are
        deleted. Returns the number of entries and keys destroyed."""
        kid = self._subject_key_id(subject)
        with self.backend.transaction():
            n = self.backend.shred(kid, int(time.time()))
            n += self.backend.shred_subject_extras(kid)
        self._column_keys = {k: v for k, v in self._column_keys.items() if k[1] != kid}
        self._after_forget()
        return n

    def forget_expired(self, domain: str | None = None, now: float | None = None) -> int:
        """Crypto-shred every entry whose TTL has passed (optionally in one domain); return how many."""
        now_i = int(time.time() if now is None else now)
        with self.backend.transaction():
            n = self.backend.shred_expired(domain, now_i)
        self._after_forget()
        return n

    def _after_forget(self) -> None:
        self._cache.data.clear()
        self._subject_deks.clear()
        self.backend.after_shred()

    # -- subject-linked encrypted columns --------------------------------------------------------------------
    def subject_column_keys(self, subjects: Sequence[str]) -> list[Any]:
        """One data key per distinct subject id (aligned with `subjects`) for a subject-linked encrypted column.

        Keys are random AES-256-GCM DEKs with random 8-byte cell key ids, wrapped under the process's sealed batch
        key and stored in `cloakbeam_vault_column_keys` with the subject's key id, so `forget_subject` deletes
        them; the same subject reuses its key for the life of the batch key (per process). The pipeline cannot
        read a key back after its batch key is gone.
        """
        from cloakbeam.keys.service import ALG_GCM, DataKey

        batch = self._batch()
        kids = self._subject_key_ids(subjects)  # one native HMAC call for the batch, not one per row
        out: list[Any] = [self._column_keys.get((batch.seal_id, k)) for k in kids]
        missing = sorted({k for k, key in zip(kids, out) if key is None})
        if missing:
            raw = os.urandom(32 * len(missing))
            ids = os.urandom(8 * len(missing))
            cell_ids = [ids[8 * j : 8 * j + 8] for j in range(len(missing))]
            materials = [raw[32 * j : 32 * j + 32] for j in range(len(missing))]
            wrapped = batch.wrap_many(materials, [_COLUMN_KEY_AAD + c + k for c, k in zip(cell_ids, missing)])
            now = int(time.time())
            rows = [(c, k, batch.seal_id, w, now) for c, k, w in zip(cell_ids, missing, wrapped)]
            with self._lock, self.backend.transaction():
                self._store_seal(batch)
                if self.backend.insert_column_keys(rows) != len(rows):  # 8-byte random ids collided: retry the batch
                    raise IntegrityError("a new column key id collided with an existing one; the batch is retried")
            if len(self._column_keys) > 200_000:
                self._column_keys.clear()
            for c, k, m in zip(cell_ids, missing, materials):
                self._column_keys[(batch.seal_id, k)] = DataKey(c, False, None, {"key_id": c.hex(), "alg": ALG_GCM, "subject_keyed": True}, m)
            out = [self._column_keys[(batch.seal_id, k)] for k in kids]
        return out

    def column_keys(self, cell_key_ids: Sequence[bytes]) -> dict[bytes, Any]:
        """cell key id -> DataKey for the subject column keys that still exist (reveal service only). Ids of
        forgotten subjects are absent: their cells can never be decrypted again. An id this vault never held (nor
        forgot) raises KeyAccessError: a wrong vault must not look like an erased one."""
        from cloakbeam.keys.service import ALG_GCM, DataKey

        rows = self.backend.get_column_keys(list(cell_key_ids))
        unknown = [k for k in cell_key_ids if k not in rows]
        if unknown:
            stray = sorted(set(unknown) - self.backend.forgotten_column_keys(unknown))
            if stray:
                raise KeyAccessError(f"column key {stray[0].hex()} is not in this vault and was never forgotten here (wrong vault, or a restored old backup)")
        out: dict[bytes, Any] = {}
        for cid, (subj, sid, wrapped) in rows.items():
            seal = self._seal_record(sid)
            material = self._reveal_keys("a subject column key", seal).unwrap(seal, wrapped, _COLUMN_KEY_AAD + cid + subj)
            out[cid] = DataKey(cid, False, AESGCM(material), {"key_id": cid.hex(), "alg": ALG_GCM, "subject_keyed": True}, material)
        return out

    def forgotten_column_keys(self, cell_key_ids: Sequence[bytes]) -> set[bytes]:
        """Which of these cell key ids belong to forgotten subjects (tombstones; no key material)."""
        return self.backend.forgotten_column_keys(list(cell_key_ids))

    def subject_salts(self, subjects: Sequence[str]) -> list[bytes]:
        """A random 16-byte salt per subject id (created at first use, deleted by `forget_subject`)."""
        kids = self._subject_key_ids(subjects)
        uniq = sorted(set(kids))
        have = self.backend.get_salts(uniq)
        missing = [k for k in uniq if k not in have]
        if missing:
            now = int(time.time())
            with self._lock, self.backend.transaction():
                self.backend.insert_salts([(k, os.urandom(16), now) for k in missing])
            have.update(self.backend.get_salts(missing))
        return [have[k] for k in kids]

    def count(self, domain: str | None = None) -> int:
        return self.backend.count_entries(domain)

    def close(self) -> None:
        self.backend.close()
        self._prf.clear()
        self._tokenizers.clear()


def _refuse_salted(domain: Domain) -> None:
    if domain.salted:
        raise CloakbeamError(f"token domain '{domain.name}' is salted per subject; a value alone does not name its entry: forget by subject")


def open_vault(ref: Mapping[str, Any], key_service: Any) -> Vault:
    """Open the vault a runtime reference names.

    `ref` examples: {"backend": "sqlite", "path": ".cloakbeam/vault.sqlite"} or
    {"backend": "postgres", "dsn_env": "CLOAKBEAM_VAULT_DSN"}. The PostgreSQL DSN is read from the named
    environment variable on the worker; a DSN inside the reference is refused (it would be pickled and logged).
    Optional: "cache_size" (tokens kept per worker, default 200000).
    """
    ref = dict(ref or {})
    backend = ref.get("backend", "sqlite")
    cache = int(ref.get("cache_size", 200_000))
    if "dsn" in ref:
        raise ConfigError("the vault reference must not contain a DSN; name an environment variable with 'dsn_env'")
    if backend == "sqlite":
        path = ref.get("path")
        if not path:
            raise ConfigError("the SQLite vault needs a 'path'")
        return Vault(SQLiteBackend(path), key_service, cache)
    if backend in ("postgres", "postgresql"):
        env = ref.get("dsn_env") or DEFAULT_DSN_ENV
        dsn = os.environ.get(env)
        if not dsn:
            raise ConfigError(f"the PostgreSQL vault DSN is read from environment variable {env}, which is not set on this worker")
        return Vault(PostgresBackend(dsn, f"environment variable {env}"), key_service, cache)
    raise ConfigError(f"unknown vault backend '{backend}'; use 'sqlite' or 'postgres'")


def check_vault_ref(ref: Mapping[str, Any], key_ref: Any) -> None:
    """Fail at pipeline construction (ConfigError, exit 2) when the vault a run needs cannot be opened.

    SQLite: opened (and created) once. PostgreSQL: connected once when the DSN variable is set here; when it is
    not, nothing is checked, because remote workers (Flink, Dataflow) may get the variable only on their side.
    """
    ref = dict(ref or {})
    if ref.get("backend", "sqlite") in ("postgres", "postgresql") and not os.environ.get(ref.get("dsn_env") or DEFAULT_DSN_ENV):
        if "dsn" in ref:
            raise ConfigError("the vault reference must not contain a DSN; name an environment variable with 'dsn_env'")
        return
    from cloakbeam.keys.service import open_key_service

    try:
        ks = open_key_service(key_ref)
    except KeyAccessError as exc:
        raise ConfigError(str(exc)) from None
    try:
        open_vault(ref, ks).close()
    finally:
        ks.close()
