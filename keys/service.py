"""KeyService: the one door through which pipeline code obtains keys.

Pipeline code holds a picklable `KeyRef` (provider name and non-secret settings) and calls
`open_key_service(ref)` in `DoFn.setup()`. A KeyService holds key material and therefore refuses to be
pickled. Nothing here logs, prints or puts key bytes in exception text or reprs.

Key hierarchy (docs/keys-and-encryption.md):

    KMS / keyring  --  KEK (named, versioned; "default" always exists)
                         |-- wraps the PRF root secret   -> prf_key(purpose) = HKDF(root, purpose)   [stable]
                         `-- wraps deterministic AES-256-SIV DEKs per (dataset, column) derived from the root
    KEK "signing" (its own KEK: in a KMS, only the launcher may decrypt it) -- wraps the Ed25519 manifest key
    reveal public key (X25519, in clear) -- seals one random batch key per process (keys/sealing.py), and the
                         batch key wraps the random AES-256-GCM DEKs per (run, column, worker process) and the
                         quarantine DEKs. Only the reveal service's keyring can unseal them.

Interface used by the other layers (keep it stable):
- `prf_key(purpose) -> bytes`: a 32-byte key, the same on every worker, run and retry for the same keyring
  and purpose (pseudonyms, tokens, date shifts, keyed hashes). Survives KEK rotation.
- `keyed_hash(purpose, data) -> hex str`.
- `data_key(dataset, column, deterministic=..., kek=..., uses=n) -> DataKey` (the encrypt action).
- `wrapped_keys_used() -> list[dict]`: every wrapped DEK this worker process made or loaded for this keyring.
  Writers put `parquet_key_metadata()` into each Parquet file's key-value metadata
  (`pq.ParquetWriter.add_key_value_metadata(...)` just before `close()`), and the launcher puts
  `keys_manifest_section(ref, records)` into the manifest under "keys" (records merged from every worker).
- `seal(...)` / `open_sealed(...)`: self-contained envelope for quarantine records (keys/quarantine.py).
- `seal_batch(name)`: the process's current sealed batch key for reveal key `name` (the vault wraps its DEKs
  under it). `attach_reveal(reveal_keys)` lets the reveal service open sealed records; without it, opening a
  sealed record raises KeyAccessError: the pipeline cannot open what it wrote.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloakbeam.core.config import KeyRef
from cloakbeam.errors import ConfigError, KeyAccessError
from cloakbeam.keys import keyring as _kr

ALG_GCM = "AES-256-GCM"
ALG_SIV = "AES-256-SIV"
PARQUET_KEYS_METADATA = "cloakbeam.wrapped_keys"
DEFAULT_KEK = "default"
DEFAULT_DEK_TTL_SECONDS = 3600.0
#: Encryptions per random-nonce DEK; NIST SP 800-38D bounds random 96-bit nonces at 2^32 per key.
DEFAULT_DEK_MAX_USES = 2**24
DEK_MAX_USES_CEILING = 2**30


class DataKey:
    """One data key: its id, mode and AEAD object. Never pickled, never printed.

    `material` (the raw 32-byte GCM or 64-byte SIV key) is kept only for the native cell kernel, which
    needs the key itself rather than a `cryptography` object; it is reachable through
    `_native_material()` alone, and is in no repr, pickle or record.
    """

    __slots__ = ("key_id", "deterministic", "_aead", "record", "_material")

    def __init__(self, key_id: bytes, deterministic: bool, aead: Any, record: dict[str, Any], material: bytes | None = None) -> None:
        self.key_id = key_id
        self.deterministic = deterministic
        self._aead = aead
        self.record = record
        self._material = material

    @property
    def aead(self) -> Any:
        """The `cryptography` AEAD object; made on first use when the key was built from its material with
        `aead=None` (a cryptography AESGCM holds ~2.5 KB of native state: caches of many subject keys for
        the native kernel, which needs the material only, do not pay it)."""
        if self._aead is None and self._material is not None:
            self._aead = _aead_for(ALG_SIV if self.deterministic else ALG_GCM, self._material)
        return self._aead

    def _native_material(self) -> bytes | None:
        """The raw key for `cloakbeam.keys.native` (None when this key was built without it)."""
        return self._material

    def __reduce__(self):  # noqa: D105
        raise TypeError("a DataKey holds key material and cannot be pickled")

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id.hex()}, mode={'deterministic' if self.deterministic else 'random'})"


@dataclass
class _Entry:
    key: DataKey
    created: float
    uses: int = 0


class _ProcessDeks:
    """Per-process DEK cache shared by every KeyService of one keyring (so several DoFns share DEKs)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[tuple[str, str, str, bool, str | None], _Entry] = {}
        self.records: dict[str, dict[str, Any]] = {}  # key id hex -> wrapped record
        self.unwrapped: dict[str, DataKey] = {}
        self.seals: dict[str, Any] = {}  # reveal key name -> current SealBatch
        self.kms_calls = 0


_PROCESS: dict[tuple[KeyRef, str], _ProcessDeks] = {}
_PROCESS_LOCK = threading.Lock()


_BOUND_FIELDS = ("key_id", "alg", "dataset", "column", "kek", "kek_version", "wrapped", "provider", "seal")


def _dek_aad(record: dict[str, Any]) -> bytes:
    bound = {k: record[k] for k in ("key_id", "alg", "dataset", "column")}
    return b"cloakbeam-dek/v1\x00" + json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()


def _secret_aad(name: str) -> bytes:
    return b"cloakbeam-secret/v1\x00" + name.encode()


def _aead_for(alg: str, key: bytes) -> Any:
    if alg == ALG_GCM and len(key) == 32:
        return AESGCM(key)
    if alg == ALG_SIV and len(key) == 64:
        return AESSIV(key)
    raise KeyAccessError(f"unsupported data key algorithm or size ({alg})")


class KeyService:
    """Key material for one worker. Not picklable; create it in `DoFn.setup()` with `open_key_service`."""

    def __init__(self, ref: KeyRef, provider: Any, doc: dict[str, Any]) -> None:
        self.ref = ref
        self._provider = provider
        self._doc = doc
        self._state = _process_state(ref, doc.get("keyring_id", ""))
        self._ttl = _float_param(ref, "dek_ttl_seconds", DEFAULT_DEK_TTL_SECONDS)
        self._max_uses = int(_float_param(ref, "dek_max_uses", DEFAULT_DEK_MAX_USES))
        if not 1 <= self._max_uses <= DEK_MAX_USES_CEILING:
            raise ConfigError(f"dek_max_uses must be between 1 and {DEK_MAX_USES_CEILING}")
        self._root = self._unwrap_secret("root", 32)
        self._signing: Ed25519PrivateKey | None = None
        self._prf_cache: dict[str, bytes] = {}
        self._reveal: Any = None  # RevealKeys, attached by the reveal service only

    def __reduce__(self):  # noqa: D105
        raise TypeError("KeyService holds key material and cannot be pickled; pickle its KeyRef instead")

    def __repr__(self) -> str:
        return f"KeyService(provider={self.ref.provider!r})"

    # -- long-lived secrets ------------------------------------------------------------------------
    def _unwrap_secret(self, name: str, size: int) -> bytes:
        entry = (self._doc.get("secrets") or {}).get(name)
        if not entry:
            raise KeyAccessError(f"keyring {self.ref.path} has no '{name}' secret; it was not created by 'cloakbeam keys init'")
        with self._state.lock:
            self._state.kms_calls += 1
        raw = self._provider.unwrap(entry["kek"], entry["kek_version"], _kr.b64d(entry["wrapped"]), _secret_aad(name))
        if len(raw) != size:
            raise KeyAccessError(f"keyring {self.ref.path}: secret '{name}' has the wrong size")
        return raw

    def prf_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose`, derived with HKDF-SHA256 from the keyring's long-lived root secret."""
        if not self._root:
            raise KeyAccessError("this KeyService was closed")
        key = self._prf_cache.get(purpose)
        if key is None:
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"cloakbeam/prf/" + purpose.encode()).derive(self._root)
            self._prf_cache[purpose] = key
        return key

    def keyed_hash(self, purpose: str, data: bytes) -> str:
        """Hex HMAC-SHA256 of `data` under the purpose key (for quarantine fingerprints and blind indexes)."""
        return hmac.new(self.prf_key(purpose), data, hashlib.sha256).hexdigest()

    def signing_key(self) -> Ed25519PrivateKey:
        """The Ed25519 manifest signing key (unwrapped on first use)."""
        if self._signing is None:
            self._signing = Ed25519PrivateKey.from_private_bytes(self._unwrap_secret("signing", 32))
        return self._signing

    def signing_public_key(self) -> Ed25519PublicKey:
        raw = _kr.b64d(self._doc["signing_public_key"])
        return Ed25519PublicKey.from_public_bytes(raw)

    # -- data keys ----------------------------------------------------------------------------------
    @property
    def kms_calls(self) -> int:
        """KEK operations (wrap/unwrap) made by this process for this keyring; for tests and metrics."""
        return self._state.kms_calls

    def data_key(self, dataset: str, column: str, *, deterministic: bool = False, kek: str = DEFAULT_KEK, uses: int = 1, run: str | None = None) -> DataKey:
        """A data key for `uses` cell encryptions of (`dataset`, `column`).

        Random mode: the process's cached DEK while it is younger than the TTL and has fewer than
        `dek_max_uses` encryptions, otherwise a fresh random DEK wrapped under the newest version of KEK `kek`
        (one KMS call). Deterministic mode: AES-SIV key derived from the root secret for (kek, dataset,
        column), identical on every worker and run. `run` scopes random DEKs to one run (recorded, not secret).
        """
        if uses > self._max_uses:
            raise ValueError(f"a single request for {uses} encryptions exceeds dek_max_uses; split the batch")
        slot = (dataset, column, kek, deterministic, None if deterministic else run)
        now = time.monotonic()
        with self._state.lock:
            entry = self._state.active.get(slot)
            if entry is not None and (deterministic or (now - entry.created < self._ttl and entry.uses + uses <= self._max_uses)):
                entry.uses += uses
                return entry.key
        key = self._new_data_key(dataset, column, deterministic, kek)
        if run is not None and not deterministic:
            key.record["run"] = run
        with self._state.lock:
            entry = _Entry(key=key, created=now, uses=uses)
            self._state.active[slot] = entry
            self._state.records[key.key_id.hex()] = key.record
            if deterministic:  # a sealed key is never cached for decryption: the pipeline cannot open it
                self._state.unwrapped[key.key_id.hex()] = key
        return key

    def _new_data_key(self, dataset: str, column: str, deterministic: bool, kek: str) -> DataKey:
        if deterministic:
            info = json.dumps(["siv", kek, dataset, column]).encode()
            material = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=b"cloakbeam/dek/" + info).derive(self._root)
            key_id = HKDF(algorithm=hashes.SHA256(), length=8, salt=None, info=b"cloakbeam/dek-id/" + info).derive(self._root)
            record: dict[str, Any] = {"key_id": key_id.hex(), "alg": ALG_SIV, "dataset": dataset, "column": column, "provider": self.ref.provider, "kek": kek}
            with self._state.lock:
                self._state.kms_calls += 1
            version, wrapped = self._provider.wrap(kek, material, _dek_aad(record))
            record.update({"kek_version": version, "wrapped": _kr.b64e(wrapped), "created": _kr.now_iso()})
            return DataKey(key_id, True, _aead_for(ALG_SIV, material), record, material)
        # Random mode: wrapped under the process's sealed batch key for reveal key `kek` (keys/sealing.py).
        material = os.urandom(32)
        key_id = os.urandom(8)
        batch = self.seal_batch(kek)
        record = {"key_id": key_id.hex(), "alg": ALG_GCM, "dataset": dataset, "column": column, "provider": "sealed", "seal": dict(batch.record)}
        record.update({"wrapped": _kr.b64e(batch.wrap(material, _dek_aad(record))), "created": _kr.now_iso()})
        return DataKey(key_id, False, _aead_for(ALG_GCM, material), record, material)

    # -- sealing (keys/sealing.py) --------------------------------------------------------------------
    def reveal_public_key(self, name: str = "default") -> tuple[int, bytes]:
        """(version, raw X25519 public key) of reveal key `name`, as recorded in the keyring (not secret)."""
        entry = (self._doc.get("reveal_public_keys") or {}).get(name)
        if not entry:
            raise KeyAccessError(
                f"keyring {self.ref.path} has no reveal public key '{name}'; add it with "
                f"'cloakbeam keys set-reveal-key --name {name} REVEAL_KEYRING_OR_BASE64' (from 'cloakbeam keys init-reveal' on the reveal service)"
            )
        return int(entry["version"]), _kr.b64d(entry["public_key"])

    def seal_batch(self, name: str = "default") -> Any:
        """The process's current sealed batch key for reveal key `name`: one HPKE seal per TTL / usage limit."""
        from cloakbeam.keys.sealing import new_seal_batch

        now = time.monotonic()
        with self._state.lock:
            batch = self._state.seals.get(name)
            if batch is not None and now - batch.created < self._ttl and batch.uses < self._max_uses:
                batch.uses += 1
                return batch
        version, pub = self.reveal_public_key(name)
        batch = new_seal_batch(pub, name, version, created=now)
        batch.uses = 1
        with self._state.lock:
            self._state.seals[name] = batch
        return batch

    @property
    def reveal_keys(self) -> Any:
        """The attached reveal keyring (RevealKeys) or None: the pipeline never has one."""
        return self._reveal

    def attach_reveal(self, reveal_keys: Any) -> None:
        """Give this service the reveal keyring (reveal service only): sealed records can then be opened."""
        self._reveal = reveal_keys

    def require_reveal_keys(self, names: Iterable[str]) -> None:
        """Fail (KeyAccessError) unless the keyring has a reveal public key for every name."""
        for name in sorted(set(names)):
            self.reveal_public_key(name)

    def wrapped_keys_used(self) -> list[dict[str, Any]]:
        """Wrapped records (no key material) of every DEK this process made or used for this keyring, sorted."""
        with self._state.lock:
            return [dict(self._state.records[k]) for k in sorted(self._state.records)]

    def parquet_key_metadata(self) -> dict[str, str]:
        """Key-value metadata for a Parquet file: {"cloakbeam.wrapped_keys": JSON list}, or {} when none."""
        records = self.wrapped_keys_used()
        return {PARQUET_KEYS_METADATA: json.dumps(records, sort_keys=True)} if records else {}

    def unwrap_data_key(self, record: dict[str, Any]) -> DataKey:
        """Unwrap one recorded DEK (cached per process); KeyAccessError when its KEK version is retired/wrong."""
        kid = str(record.get("key_id", ""))
        with self._state.lock:
            hit = self._state.unwrapped.get(kid)
        # A cache hit must be for the very same record: a relabelled copy (other column, dataset, version)
        # is unwrapped again and fails its AAD check.
        if hit is not None and all(str(hit.record.get(f)) == str(record.get(f)) for f in _BOUND_FIELDS):
            return hit
        from cloakbeam.keys.sealing import is_sealed, not_held_error

        if is_sealed(record):
            if self._reveal is None:
                raise not_held_error(f"data key {kid or '?'}", record.get("seal"))
            try:
                wrapped = _kr.b64d(record["wrapped"])
                key_id = bytes.fromhex(kid)
                alg = record["alg"]
            except Exception:
                raise KeyAccessError(f"wrapped key record {kid or '?'} is malformed") from None
            material = self._reveal.unwrap(record["seal"], wrapped, _dek_aad(record))
            key = DataKey(key_id, alg == ALG_SIV, _aead_for(alg, material), dict(record), material)
            with self._state.lock:
                self._state.unwrapped[kid] = key
            return key
        try:
            alg = record["alg"]
            wrapped = _kr.b64d(record["wrapped"])
            key_id = bytes.fromhex(kid)
        except Exception:
            raise KeyAccessError(f"wrapped key record {kid or '?'} is malformed") from None
        if record.get("provider", self.ref.provider) != self.ref.provider:
            raise KeyAccessError(f"data key {kid} was wrapped by provider '{record.get('provider')}', not '{self.ref.provider}'")
        with self._state.lock:
            self._state.kms_calls += 1
        material = self._provider.unwrap(record["kek"], str(record["kek_version"]), wrapped, _dek_aad(record))
        key = DataKey(key_id, alg == ALG_SIV, _aead_for(alg, material), dict(record), material)
        with self._state.lock:
            self._state.unwrapped[kid] = key
        return key

    def key_lookup(self, records: Iterable[dict[str, Any]]) -> Callable[[bytes], DataKey | None]:
        """A key-id -> DataKey function over `records` (from Parquet metadata and/or the manifest)."""
        by_id = {str(r.get("key_id")): r for r in records}

        def lookup(kid: bytes) -> DataKey | None:
            rec = by_id.get(kid.hex())
            return None if rec is None else self.unwrap_data_key(rec)

        return lookup

    def rewrap_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """The same DEK wrapped under the newest version of its KEK (the data is not touched); a sealed DEK
        is resealed to the newest version of its reveal key (needs the reveal keyring, `attach_reveal`)."""
        from cloakbeam.keys.sealing import is_sealed, not_held_error

        if is_sealed(record):
            if self._reveal is None:
                raise not_held_error(f"data key {record.get('key_id', '?')}", record.get("seal"))
            new_seal = self._reveal.reseal(record["seal"])
            return record if new_seal == record["seal"] else dict(record, seal=new_seal, rewrapped=_kr.now_iso())
        try:
            wrapped_old = _kr.b64d(record["wrapped"])
        except Exception:
            raise KeyAccessError(f"wrapped key record {record.get('key_id', '?')} is malformed") from None
        with self._state.lock:
            self._state.kms_calls += 1
        material = self._provider.unwrap(record["kek"], str(record["kek_version"]), wrapped_old, _dek_aad(record))
        base = {k: record[k] for k in ("key_id", "alg", "dataset", "column")}
        out = dict(record, provider=self.ref.provider)
        with self._state.lock:
            self._state.kms_calls += 1
        version, wrapped = self._provider.wrap(record["kek"], material, _dek_aad(base))
        out.update({"kek_version": version, "wrapped": _kr.b64e(wrapped), "rewrapped": _kr.now_iso()})
        return out

    # -- envelope for single blobs (quarantine) -----------------------------------------------------
    def seal(self, plaintext: bytes, *, dataset: str, purpose: str, context: str) -> bytes:
        """Self-contained envelope: u16 record length || wrapped-DEK JSON || GCM cell (context bound as AAD)."""
        import pyarrow as pa

        from cloakbeam.keys.cells import encrypt_column

        key = self.data_key(dataset, f"__{purpose}__", uses=1)
        cell = encrypt_column(pa.array([plaintext], pa.binary()), key, dataset=dataset, column=f"__{purpose}__/{context}")[0].as_py()
        rec = json.dumps(key.record, sort_keys=True, separators=(",", ":")).encode()
        return len(rec).to_bytes(4, "big") + rec + cell

    def open_sealed(self, blob: bytes, *, dataset: str, purpose: str, context: str) -> bytes:
        import pyarrow as pa

        from cloakbeam.errors import IntegrityError
        from cloakbeam.keys.cells import decrypt_column

        try:
            n = int.from_bytes(blob[:4], "big")
            record = json.loads(blob[4 : 4 + n])
            cell = blob[4 + n :]
        except Exception:
            raise IntegrityError(f"sealed {purpose} record is malformed") from None
        key = self.unwrap_data_key(record)
        out = decrypt_column(pa.array([cell], pa.binary()), {key.key_id: key}, dataset=dataset, column=f"__{purpose}__/{context}")
        return out[0].as_py()

    # -- administration (CLI) -----------------------------------------------------------------------
    def list_keys(self) -> list[dict[str, Any]]:
        return self._provider.list_keys()

    def wrap_with_kek(self, kek: str, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        """Wrap key bytes under the newest version of KEK `kek` (Parquet modular encryption's KmsClient)."""
        with self._state.lock:
            self._state.kms_calls += 1
        return self._provider.wrap(kek, plaintext, aad)

    def unwrap_with_kek(self, kek: str, version: str, wrapped: bytes, aad: bytes) -> bytes:
        with self._state.lock:
            self._state.kms_calls += 1
        return self._provider.unwrap(kek, version, wrapped, aad)

    def newest_kek_version(self, kek: str = DEFAULT_KEK) -> str:
        """The version new data keys are wrapped under (what `rewrap` moves old records to)."""
        return self._provider.primary_version(kek)

    def rotate(self, kek: str = DEFAULT_KEK) -> str:
        """Add a new version of KEK `kek` and re-wrap the keyring's own secrets under it; saves the keyring."""
        version = self._provider.rotate(kek)
        secrets = self._doc.setdefault("secrets", {})
        for name, size in (("root", 32), ("signing", 32)):
            entry = secrets.get(name)
            if entry and entry["kek"] == kek:
                raw = self._unwrap_secret(name, size)
                v, wrapped = self._provider.wrap(kek, raw, _secret_aad(name))
                secrets[name] = {"kek": kek, "kek_version": v, "wrapped": _kr.b64e(wrapped)}
        self.save()
        return version

    def retire(self, kek: str, version: str) -> None:
        """Retire (destroy) an old KEK version. Refused while the keyring's own secrets still need it."""
        if str(version) == self._provider.primary_version(kek):
            raise KeyAccessError(f"version {version} is the newest version of key '{kek}'; rotate first, then rewrap, then retire it")
        for name, entry in (self._doc.get("secrets") or {}).items():
            if entry["kek"] == kek and str(entry["kek_version"]) == str(version):
                raise KeyAccessError(f"the keyring's '{name}' secret is still wrapped under version {version}; rotate first")
        self._provider.retire(kek, version)
        with self._state.lock:  # forget cached keys: retirement must take effect in this process too
            self._state.unwrapped.clear()
            self._state.active.clear()
        self.save()

    def save(self) -> None:
        if not self.ref.path:
            raise KeyAccessError("this key reference has no keyring path to save to")
        _kr.write_keyring_file(self.ref.path, self._doc)

    def close(self) -> None:
        self._root = b""
        self._signing = None
        self._prf_cache.clear()


def _float_param(ref: KeyRef, name: str, default: float) -> float:
    raw = ref.param(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"key setting '{name}' must be a number") from None
    if value <= 0:
        raise ConfigError(f"key setting '{name}' must be positive")
    return value


def _process_state(ref: KeyRef, keyring_id: str) -> _ProcessDeks:
    with _PROCESS_LOCK:
        st = _PROCESS.get((ref, keyring_id))
        if st is None:
            st = _PROCESS[(ref, keyring_id)] = _ProcessDeks()
        return st


def process_wrapped_keys(ref: KeyRef) -> list[dict[str, Any]]:
    """Wrapped-DEK records made or used in this process for keyring `ref`, without opening the keyring.

    For writers whose own context never opened keys (the DEK cache is per process, shared by DoFns).
    """
    with _PROCESS_LOCK:
        states = [st for (r, _), st in _PROCESS.items() if r.provider == ref.provider and r.path == ref.path]
    out: list[dict[str, Any]] = []
    for st in states:
        with st.lock:
            out.extend(dict(st.records[k]) for k in sorted(st.records))
    return merge_wrapped_keys(out)


def read_parquet_wrapped_keys(path: str) -> list[dict[str, Any]]:
    """The wrapped-DEK records stored in one Parquet file's key-value metadata ([] when none)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path).metadata or {}
    except Exception:
        return []
    raw = meta.get(PARQUET_KEYS_METADATA.encode())
    if not raw:
        return []
    try:
        records = json.loads(raw)
    except ValueError:
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def collect_wrapped_keys(out_dir: str, manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every wrapped DEK an output needs: from each data file's Parquet metadata and from the manifest
    (`wrapped_keys`, `keys.wrapped_keys`, `extra.wrapped_keys`), deduplicated by key id."""
    import os

    lists: list[list[dict[str, Any]]] = []
    files: list[str] = []
    if manifest is not None:
        files = [os.path.join(out_dir, o["path"]) for o in manifest.get("outputs", []) if str(o.get("path", "")).endswith(".parquet")]
        for where in (manifest.get("wrapped_keys"), (manifest.get("keys") or {}).get("wrapped_keys") if isinstance(manifest.get("keys"), dict) else None, (manifest.get("extra") or {}).get("wrapped_keys")):
            if isinstance(where, list):
                lists.append(where)
    else:
        for root, _dirs, names in os.walk(out_dir):
            files.extend(os.path.join(root, n) for n in names if n.endswith(".parquet"))
    for f in sorted(files):
        lists.append(read_parquet_wrapped_keys(f))
    return merge_wrapped_keys(*lists)


def keys_manifest_section(ref: KeyRef, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's "keys" section: the key reference and every wrapped DEK (deduplicated by key id)."""
    return {"ref": ref.describe(), "wrapped_keys": merge_wrapped_keys(records)}


def merge_wrapped_keys(*lists: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Union of wrapped-key records by key id; the most recently (re)wrapped record wins."""
    out: dict[str, dict[str, Any]] = {}
    for records in lists:
        for r in records or []:
            kid = str(r.get("key_id"))
            prev = out.get(kid)
            if prev is None or str(r.get("rewrapped", r.get("created", ""))) >= str(prev.get("rewrapped", prev.get("created", ""))):
                out[kid] = dict(r)
    return [out[k] for k in sorted(out)]


# -- providers ----------------------------------------------------------------------------------------

def make_provider(ref: KeyRef, doc: dict[str, Any]) -> Any:
    """The KEK provider for `ref` (local keyring, aws-kms, gcp-kms, vault-transit)."""
    if ref.provider == "local":
        return _kr.LocalKekProvider(ref.path or "", doc)
    from cloakbeam.keys import kms

    return kms.make_provider(ref, doc)


def signing_kek_name(provider: str, params: dict[str, str] | None = None) -> str:
    """The KEK that wraps the manifest signing key: its own KEK ("signing"), apart from the data KEKs, so a
    KMS policy can give decrypt permission on it to the launcher alone. gcp-kms needs `key.signing` for that
    (without it the signing key shares the "default" CryptoKey)."""
    if provider == "gcp-kms" and not (params or {}).get("key.signing"):
        return DEFAULT_KEK
    return "signing"


def init_keyring(
    path: str | Path,
    *,
    provider: str = "local",
    protection: str = "dev",
    env: str | None = None,
    scrypt_n: int = _kr.DEFAULT_SCRYPT_N,
    params: dict[str, str] | None = None,
    reveal_public_keys: dict[str, dict[str, Any]] | None = None,
) -> KeyRef:
    """Create a new pipeline keyring at `path` (refuses to overwrite). Returns the KeyRef that opens it.

    `reveal_public_keys` ({name: {version, public_key}}, from `sealing.read_reveal_public_keys`) are the keys
    the pipeline seals to; without them the keyring can tokenize and pseudonymize but not encrypt or seal.
    """
    p = Path(path)
    if p.exists():
        raise ConfigError(f"keyring {p} already exists; use 'cloakbeam keys rotate' to add a key version")
    ref = KeyRef(provider=provider, path=str(p), params=tuple(sorted((params or {}).items())))
    if provider == "local":
        _kr.check_new_passphrase(protection, env)
    doc: dict[str, Any] = {
        "format": _kr.FORMAT,
        "version": _kr.FORMAT_VERSION,
        "provider": provider,
        "keyring_id": os.urandom(8).hex(),
        "created": _kr.now_iso(),
        "dev": protection == "dev",
        "protection": _kr.new_protection(protection if provider == "local" else "dev", env, scrypt_n) if provider == "local" else {"mode": "kms"},
        "keks": {},
        "secrets": {},
        "reveal_public_keys": dict(reveal_public_keys or {}),
    }
    if provider != "local":
        doc["dev"] = False
    prov = make_provider(ref, doc)
    prov.rotate(DEFAULT_KEK)  # KEK 'default' version 1 (a KMS provider may adopt an existing key)
    sign_kek = signing_kek_name(provider, params)
    if sign_kek != DEFAULT_KEK:
        prov.rotate(sign_kek)
    signing = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization

    raw_signing = signing.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    for name, secret, kek in (("root", os.urandom(32), DEFAULT_KEK), ("signing", raw_signing, sign_kek)):
        v, wrapped = prov.wrap(kek, secret, _secret_aad(name))
        doc["secrets"][name] = {"kek": kek, "kek_version": v, "wrapped": _kr.b64e(wrapped)}
    doc["signing_public_key"] = _kr.b64e(
        signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    _kr.write_keyring_file(p, doc, create=True)
    return ref


def set_reveal_public_keys(ref: KeyRef, keys: dict[str, dict[str, Any]]) -> None:
    """Record (add or replace) reveal public keys in a pipeline keyring; no secret is touched."""
    if not ref.path:
        raise ConfigError("no keyring path")
    doc = _kr.read_keyring_file(ref.path)
    if doc.get("purpose") == "reveal":
        raise ConfigError(f"{ref.path} is a reveal keyring; set reveal keys on the pipeline keyring")
    doc.setdefault("reveal_public_keys", {}).update(keys)
    _kr.write_keyring_file(ref.path, doc)


def dev_reveal_keyring_path(path: str | Path) -> Path:
    """Where a development keyring's reveal keyring lives (beside it; never do this with real data)."""
    p = Path(path)
    return p.with_name("reveal-" + p.name)


def ensure_local_keyring(path: str | Path) -> bool:
    """Create an unprotected development keyring pair at `path` if absent: the pipeline keyring (`dev: true`,
    mode 0600) and, beside it, a development reveal keyring whose public key the pipeline keyring seals to.

    Returns True when it was created. Only `--dev` runs and the demo call this; for real data use
    `cloakbeam keys init-reveal` on the reveal service and `cloakbeam keys init --reveal-key ...` for the pipeline.
    """
    from cloakbeam.keys.sealing import init_reveal_keyring, read_reveal_public_keys

    p = Path(path)
    if p.exists():
        return False
    reveal = dev_reveal_keyring_path(p)
    try:
        if not reveal.exists():
            init_reveal_keyring(reveal, protection="dev")
    except ConfigError:  # another process created it concurrently
        pass
    try:
        init_keyring(p, protection="dev", reveal_public_keys=read_reveal_public_keys(str(reveal)))
    except (FileExistsError, ConfigError):  # another process created it concurrently
        return False
    return True


def open_key_service(ref: KeyRef) -> KeyService:
    """Open the keys `ref` points to; raise KeyAccessError with a sentence saying what to fix."""
    if not ref.path:
        raise KeyAccessError(f"the '{ref.provider}' key provider needs a keyring path")
    doc = _kr.read_keyring_file(ref.path)
    if doc.get("purpose") == "reveal":
        raise KeyAccessError(f"{ref.path} is a reveal keyring; only the reveal service opens it (as 'reveal_keys'), the pipeline uses its own keyring")
    if doc.get("provider", "local") != ref.provider:
        raise KeyAccessError(f"keyring {ref.path} belongs to provider '{doc.get('provider')}', not '{ref.provider}'")
    return KeyService(ref, make_provider(ref, doc), doc)
