"""The token vault: token -> original (encrypted), keyed blind index, per-subject keys, on SQLite or PostgreSQL.

Tables (same logical schema on both backends; see docs/token-vault.md):

    cloakbeam_vault_domains  domain PK, normalize, format (JSON), created_at
    cloakbeam_vault_keys     key_id PK, wrapped (nonce || AES-256-GCM(KEK, DEK)), created_at
    cloakbeam_vault_entries  (domain, token) PK, (domain, bidx) UNIQUE, key_id (subject keys only; NULL = the
                             entry's own key, whose id is its bidx), counter, ciphertext
                             (nonce || AES-256-GCM(DEK, value)), created_at, expires_at, forgotten_at

Writes are idempotent and convergent: the token is a PRF of the value (no read needed to compute it); rows go in
with INSERT ... ON CONFLICT DO NOTHING, so a replayed bundle adds no rows and changes no tokens; a token that is
already taken by another value (short digit formats) is detected through the primary key and resolved by raising
that value's PRF counter. `forget` deletes the DEK (crypto-shredding) and blanks the entries it protected; the
token stays reserved so it can never be handed to another value or reversed again.

The vault never stores, logs or raises with a plaintext value. Keys come from the KeyService (`prf_key`):
`tokenize/<domain>` (token PRF), `vault/<domain>/index` (blind index), `vault/kek` (wraps DEKs),
`vault/subject` (subject key ids; an entry's own key id is its blind index).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloakbeam.errors import CloakbeamError, ConfigError, IntegrityError, KeyAccessError
from cloakbeam.keys import native
from cloakbeam.vault.tokens import TokenFormat, Tokenizer, normalize

MAX_COUNTER = 10_000
_ENTRY_AAD = b"cloakbeam-vault-entry/v1\x00"
_DEK_AAD = b"cloakbeam-vault-dek/v1\x00"
DEFAULT_DSN_ENV = "CLOAKBEAM_VAULT_DSN"


@dataclass(frozen=True)
class Domain:
    """A token domain: values of one kind that share a token space and key (e.g. 'email', 'card_number')."""

    name: str
    fmt: TokenFormat = TokenFormat()
    normalize: str = "trim"
    ttl_seconds: int | None = None

    def config(self) -> dict[str, Any]:
        """What must never change for a domain once tokens exist (format and normalization)."""
        return {
            "normalize": self.normalize,
            "kind": self.fmt.kind,
            "prefix": self.fmt.prefix if self.fmt.kind == "opaque" else "",
            "keep_last": self.fmt.keep_last,
            "luhn": self.fmt.luhn,
        }

    @staticmethod
    def from_config(name: str, cfg: Mapping[str, Any]) -> "Domain":
        fmt = TokenFormat(kind=cfg["kind"], prefix=cfg.get("prefix") or "tok_", keep_last=int(cfg["keep_last"]), luhn=bool(cfg["luhn"]))
        return Domain(name, fmt, cfg["normalize"])


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

    def shred(self, key_id: bytes, now: int, domain: str | None = None) -> int:
        """Delete a data key and blank the entries it protected: subject-keyed entries (key_id = it) and, with
        `domain`, the entry whose own key it is (key_id NULL, bidx = it)."""
        self.conn.execute(f"DELETE FROM cloakbeam_vault_keys WHERE key_id = {self._p}", (key_id,))
        p = self._p
        blank = f"UPDATE cloakbeam_vault_entries SET bidx = NULL, key_id = NULL, ciphertext = NULL, forgotten_at = {p}"
        n = self.conn.execute(blank + f" WHERE key_id = {p}", (now, key_id)).rowcount
        if domain is not None:
            n += self.conn.execute(blank + f" WHERE domain = {p} AND bidx = {p} AND key_id IS NULL", (now, domain, key_id)).rowcount
        return n

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
        for part in _chunks(list(bidxs), 500):
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
        self._kek = AESGCM(self._key("vault/kek"))

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

    def _unwrap(self, key_id: bytes, wrapped: bytes) -> AESGCM:
        try:
            return AESGCM(self._kek.decrypt(wrapped[:12], wrapped[12:], _DEK_AAD + key_id))
        except InvalidTag:
            raise KeyAccessError("a vault data key does not unwrap under this keyring (wrong keyring or tampered key table)") from None

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
                with self.backend.transaction():
                    return self._write_tx(domain, vals, subj)
            except Exception as exc:
                retry = getattr(self.backend, "is_retryable", None)
                if retry is None or not retry(exc) or attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _write_tx(self, domain: Domain, vals: list[str], subj: list[str | None] | None) -> list[str]:
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
        # Data keys: one per subject (when given) or per entry; random, wrapped under the KEK, idempotent insert.
        named = sorted({subj[i] for i in new if subj[i]}) if subj is not None else []
        skid = dict(zip(named, self._subject_key_ids(named)))
        kids = [skid[subj[i]] if subj is not None and subj[i] else self._entry_key_id(name, bidx[i]) for i in new]
        uniq = sorted(set(kids))
        raw = os.urandom(32 * len(uniq))
        nonces = os.urandom(12 * len(uniq))
        key_rows = []
        for j, kid in enumerate(uniq):
            nonce = nonces[12 * j : 12 * j + 12]
            key_rows.append((kid, nonce + self._kek.encrypt(nonce, raw[32 * j : 32 * j + 32], _DEK_AAD + kid), now))
        if be.insert_keys(key_rows) == len(key_rows):
            stored = {kid: w for kid, w, _ in key_rows}  # every key is ours: no read back needed
        else:
            stored = be.get_keys(uniq)
        deks = {}
        for j, (kid, mine, _) in enumerate(key_rows):
            theirs = stored[kid]
            # Our own insert won (the usual case): use the DEK we just made instead of unwrapping it again.
            deks[kid] = AESGCM(raw[32 * j : 32 * j + 32]) if theirs == mine else self._unwrap(kid, theirs)
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
        callers go through `cloakbeam.vault.access.VaultAccess`, which checks roles and audits."""
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
            out.append(("ok", value))
        return out

    def find_token(self, domain_name: str, value: str) -> str | None:
        """The token of `value` in `domain_name` if the vault holds it (lookup by blind index)."""
        domain = self.domain(domain_name)
        norm = normalize([value], domain.normalize)[0]
        b = self.blind_index(domain_name, [norm])[0]
        return self.backend.tokens_by_bidx(domain_name, [b]).get(b)

    # -- erasure -------------------------------------------------------------------------------------------
    def forget_value(self, domain_name: str, value: str) -> int:
        """Crypto-shred the key protecting `value`'s entry (and every entry sharing that key). Returns entries shredded."""
        domain = self.domain(domain_name)
        norm = normalize([value], domain.normalize)[0]
        b = self.blind_index(domain_name, [norm])[0]
        with self.backend.transaction():
            kid = self.backend.key_of_bidx(domain_name, b)
            n = self.backend.shred(kid, int(time.time()), domain_name) if kid is not None else 0
        self._after_forget()
        return n

    def forget_subject(self, subject: str) -> int:
        """Crypto-shred a subject's key: every entry tokenized with this subject id becomes irreversible."""
        kid = self._subject_key_id(subject)
        with self.backend.transaction():
            n = self.backend.shred(kid, int(time.time()))
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
        self.backend.after_shred()

    def count(self, domain: str | None = None) -> int:
        return self.backend.count_entries(domain)

    def close(self) -> None:
        self.backend.close()
        self._prf.clear()
        self._tokenizers.clear()


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
