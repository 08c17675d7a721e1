"""Sealing: what the pipeline writes, only the reveal service can open.

The pipeline holds a reveal *public* key (X25519, in clear in its keyring); the matching private key lives in a
separate **reveal keyring** that only the reveal service (`cloakbeam serve`) opens. Sealing is cheap because it is
done once per batch, not per row or subject:

    seal batch  = a random 32-byte batch key K and an 8-byte seal id, HPKE-sealed once to the reveal public key
                  (RFC 9180: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM; info binds the seal id and
                  the reveal key name and version)
    data keys   = per-column DEKs, per-subject and per-entry vault DEKs, quarantine DEKs: AES-256-GCM-wrapped
                  under K (nonce || ciphertext || tag), with associated data naming what the key protects

A seal record (JSON, no secret) travels with what it protects: `{seal_id, alg, reveal_key, reveal_version,
sealed}`. The pipeline keeps K in memory only while it seals new keys (one batch key per process and reveal key,
renewed after its TTL or usage limit, like DEKs); nothing it writes to disk lets it recover K. The reveal service
unseals K once per seal id (cached) and then unwraps DEKs with one AES-GCM call each. Deleting a DEK row (a
forgotten subject) leaves K alone useless for that subject.

Reveal keyring (same file format and protection as keys/keyring.py, `purpose: "reveal"`): secrets `reveal/<name>/
<version>` (X25519 private keys), `audit` (the audit MAC key, only the service holds it) and `checkpoint` (the
Ed25519 key that signs audit checkpoints), each wrapped under the reveal keyring's own KEK (local passphrase /
env-key, or a KMS key on which only the reveal service's identity has decrypt permission). Nothing here logs or
raises with key bytes.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from cloakbeam.core.config import KeyRef
from cloakbeam.errors import ConfigError, IntegrityError, KeyAccessError
from cloakbeam.keys import keyring as _kr

SEAL_ALG = "HPKE-X25519-HKDF-SHA256-AES-256-GCM"
SEAL_ID_LEN = 8
DEFAULT_REVEAL_KEY = "default"
REVEAL_PURPOSE = "reveal"
_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
_INFO = b"cloakbeam-seal/v1\x00"
_SECRET_AAD = b"cloakbeam-reveal-secret/v1\x00"
_NOT_HELD = (
    "it is sealed to the reveal key '{name}', whose private half only the reveal service holds; "
    "ask the reveal service ('cloakbeam serve') instead"
)


def _raw_x25519(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _info(seal_id: str, name: str, version: int) -> bytes:
    return _INFO + json.dumps([seal_id, name, int(version)], separators=(",", ":")).encode()


class SealBatch:
    """A batch key the pipeline seals once and then wraps many data keys under. Never pickled or printed."""

    __slots__ = ("seal_id", "record", "_aead", "uses", "created")

    def __init__(self, seal_id: bytes, record: dict[str, Any], aead: AESGCM, created: float) -> None:
        self.seal_id = seal_id
        self.record = record
        self._aead = aead
        self.uses = 0
        self.created = created

    def __reduce__(self):  # noqa: D105
        raise TypeError("a SealBatch holds a batch key and cannot be pickled")

    def __repr__(self) -> str:
        return f"SealBatch(seal_id={self.seal_id.hex()})"

    def wrap(self, material: bytes, aad: bytes) -> bytes:
        """nonce (12) || AES-256-GCM(batch key, material, aad); the nonce comes from os.urandom."""
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, material, aad)

    def wrap_many(self, materials: list[bytes], aads: list[bytes]) -> list[bytes]:
        """`wrap` for many keys with one os.urandom draw for all nonces."""
        nonces = os.urandom(12 * len(materials))
        enc = self._aead.encrypt
        return [nonces[12 * i : 12 * i + 12] + enc(nonces[12 * i : 12 * i + 12], m, a) for i, (m, a) in enumerate(zip(materials, aads))]

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Unwrap a key this very batch wrapped (the pipeline re-reads its own rows within one batch)."""
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], aad)
        except InvalidTag:
            raise KeyAccessError("a data key does not unwrap under its batch key (altered row)") from None


def new_seal_batch(public_key: bytes, name: str, version: int, created: float = 0.0) -> SealBatch:
    """A fresh random batch key, HPKE-sealed once to the reveal public key `public_key` (32 raw bytes)."""
    seal_id = os.urandom(SEAL_ID_LEN)
    batch_key = AESGCM.generate_key(bit_length=256)
    try:
        pub = X25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise KeyAccessError(f"reveal public key '{name}' is not a 32-byte X25519 key") from None
    sealed = _SUITE.encrypt(batch_key, pub, info=_info(seal_id.hex(), name, version))
    record = {"seal_id": seal_id.hex(), "alg": SEAL_ALG, "reveal_key": name, "reveal_version": int(version), "sealed": _kr.b64e(sealed)}
    return SealBatch(seal_id, record, AESGCM(batch_key), created)


def is_sealed(record: dict[str, Any]) -> bool:
    """True for a wrapped-key record whose key is sealed to a reveal key (not KEK-wrapped)."""
    return isinstance(record.get("seal"), dict)


def not_held_error(what: str, seal: dict[str, Any] | None) -> KeyAccessError:
    name = (seal or {}).get("reveal_key", DEFAULT_REVEAL_KEY)
    return KeyAccessError(f"{what} cannot be opened with this keyring: " + _NOT_HELD.format(name=name))


# --------------------------------------------------------------------------------------------------------------
# The reveal keyring (reveal service side)
# --------------------------------------------------------------------------------------------------------------


class RevealKeys:
    """The reveal service's private keys: unseal batch keys, the audit MAC key, the checkpoint signing key.

    Not picklable. Open with `open_reveal_keys(ref)`. Unsealed batch keys are cached per seal id.
    """

    def __init__(self, ref: KeyRef, provider: Any, doc: dict[str, Any]) -> None:
        self.ref = ref
        self._provider = provider
        self._doc = doc
        self._private: dict[tuple[str, int], X25519PrivateKey] = {}
        self._batches: dict[str, AESGCM] = {}
        self._lock = threading.Lock()
        self._audit_key: bytes | None = None
        self._checkpoint: Ed25519PrivateKey | None = None

    def __reduce__(self):  # noqa: D105
        raise TypeError("RevealKeys holds the reveal private keys and cannot be pickled")

    def __repr__(self) -> str:
        return f"RevealKeys(provider={self.ref.provider!r})"

    # -- secrets ------------------------------------------------------------------------------------------------
    def _secret(self, name: str, size: int) -> bytes:
        entry = (self._doc.get("secrets") or {}).get(name)
        if not entry:
            raise KeyAccessError(f"reveal keyring {self.ref.path} has no '{name}' secret (destroyed or never created)")
        raw = self._provider.unwrap(entry["kek"], entry["kek_version"], _kr.b64d(entry["wrapped"]), _SECRET_AAD + name.encode())
        if len(raw) != size:
            raise KeyAccessError(f"reveal keyring {self.ref.path}: secret '{name}' has the wrong size")
        return raw

    def audit_key(self) -> bytes:
        """The audit chain MAC key: held only by the reveal service, never derived from the pipeline root."""
        if self._audit_key is None:
            self._audit_key = self._secret("audit", 32)
        return self._audit_key

    def checkpoint_key(self) -> Ed25519PrivateKey:
        if self._checkpoint is None:
            self._checkpoint = Ed25519PrivateKey.from_private_bytes(self._secret("checkpoint", 32))
        return self._checkpoint

    def checkpoint_public_key(self) -> bytes:
        return _kr.b64d(self._doc["checkpoint_public_key"])

    def public_keys(self) -> dict[str, dict[str, Any]]:
        """The newest reveal public key per name: {name: {"version": v, "public_key": b64}} (for the pipeline)."""
        out = {}
        for name, versions in sorted((self._doc.get("reveal_keys") or {}).items()):
            active = [v for v in versions if v.get("state") == "active"]
            if active:
                v = max(active, key=lambda e: e["version"])
                out[name] = {"version": v["version"], "public_key": v["public_key"]}
        return out

    def _private_key(self, name: str, version: int) -> X25519PrivateKey:
        key = self._private.get((name, version))
        if key is None:
            for v in (self._doc.get("reveal_keys") or {}).get(name, []):
                if v["version"] == version and v.get("state") == "retired":
                    raise KeyAccessError(f"reveal key '{name}' version {version} is retired; what was sealed to it can no longer be opened")
            key = X25519PrivateKey.from_private_bytes(self._secret(f"reveal/{name}/{version}", 32))
            self._private[(name, version)] = key
        return key

    # -- unsealing ----------------------------------------------------------------------------------------------
    def batch_aead(self, seal: dict[str, Any]) -> AESGCM:
        """The batch key of a seal record (HPKE-opened once per seal id, then cached)."""
        try:
            sid = str(seal["seal_id"])
            name = str(seal["reveal_key"])
            version = int(seal["reveal_version"])
            sealed = _kr.b64d(seal["sealed"])
            if seal.get("alg") != SEAL_ALG:
                raise ValueError
        except Exception:
            raise IntegrityError("a seal record is malformed") from None
        with self._lock:
            hit = self._batches.get(sid)
        if hit is not None:
            return hit
        try:
            batch_key = _SUITE.decrypt(sealed, self._private_key(name, version), info=_info(sid, name, version))
        except InvalidTag:
            raise KeyAccessError(f"seal {sid} does not open under reveal key '{name}' version {version} (another reveal keyring, or an altered seal)") from None
        aead = AESGCM(batch_key)
        with self._lock:
            self._batches[sid] = aead
        return aead

    def unwrap(self, seal: dict[str, Any], wrapped: bytes, aad: bytes) -> bytes:
        """A data key wrapped under the batch key of `seal`."""
        try:
            return self.batch_aead(seal).decrypt(wrapped[:12], wrapped[12:], aad)
        except InvalidTag:
            raise KeyAccessError("a sealed data key failed to unwrap (altered record or relabelled key)") from None

    def reseal(self, seal: dict[str, Any]) -> dict[str, Any]:
        """The same batch key sealed to the newest version of its reveal key (what `keys rewrap` moves to)."""
        name = str(seal["reveal_key"])
        newest = self.public_keys().get(name)
        if newest is None:
            raise KeyAccessError(f"reveal keyring {self.ref.path} has no active reveal key '{name}'")
        if int(newest["version"]) == int(seal["reveal_version"]):
            return dict(seal)
        aead = self.batch_aead(seal)
        raw = _batch_key_bytes(self, seal, aead)
        pub = X25519PublicKey.from_public_bytes(_kr.b64d(newest["public_key"]))
        sid = str(seal["seal_id"])
        sealed = _SUITE.encrypt(raw, pub, info=_info(sid, name, int(newest["version"])))
        return {**seal, "reveal_version": int(newest["version"]), "sealed": _kr.b64e(sealed)}

    # -- administration -----------------------------------------------------------------------------------------
    def rotate(self, name: str = DEFAULT_REVEAL_KEY) -> int:
        """A new reveal key version; give its public key to the pipeline keyring ('keys set-reveal-key')."""
        versions = self._doc.setdefault("reveal_keys", {}).setdefault(name, [])
        version = max((v["version"] for v in versions), default=0) + 1
        _add_reveal_version(self._doc, self._provider, name, version)
        self.save()
        return version

    def retire(self, name: str, version: int) -> None:
        """Destroy a reveal key version: what was sealed to it and not resealed is unreadable for good."""
        versions = (self._doc.get("reveal_keys") or {}).get(name, [])
        if not versions or max(v["version"] for v in versions) == version:
            raise KeyAccessError(f"version {version} is the newest version of reveal key '{name}'; rotate first, then rewrap, then retire it")
        for v in versions:
            if v["version"] == version:
                v["state"] = "retired"
                v["retired"] = _kr.now_iso()
                self._doc["secrets"].pop(f"reveal/{name}/{version}", None)
                self._private.pop((name, version), None)
                with self._lock:
                    self._batches.clear()
                self.save()
                return
        raise KeyAccessError(f"reveal key '{name}' has no version {version}")

    def save(self) -> None:
        _kr.write_keyring_file(self.ref.path or "", self._doc)

    def close(self) -> None:
        self._private.clear()
        with self._lock:
            self._batches.clear()
        self._audit_key = None
        self._checkpoint = None


def _batch_key_bytes(keys: RevealKeys, seal: dict[str, Any], aead: AESGCM) -> bytes:
    # AESGCM does not expose its key; re-open the HPKE envelope for the raw bytes (rare: rewrap only).
    name, version, sid = str(seal["reveal_key"]), int(seal["reveal_version"]), str(seal["seal_id"])
    return _SUITE.decrypt(_kr.b64d(seal["sealed"]), keys._private_key(name, version), info=_info(sid, name, version))


def _wrap_secret(doc: dict[str, Any], provider: Any, name: str, raw: bytes) -> None:
    v, wrapped = provider.wrap("default", raw, _SECRET_AAD + name.encode())
    doc.setdefault("secrets", {})[name] = {"kek": "default", "kek_version": v, "wrapped": _kr.b64e(wrapped)}


def _add_reveal_version(doc: dict[str, Any], provider: Any, name: str, version: int) -> None:
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    _wrap_secret(doc, provider, f"reveal/{name}/{version}", raw)
    doc.setdefault("reveal_keys", {}).setdefault(name, []).append(
        {"version": version, "state": "active", "created": _kr.now_iso(), "public_key": _kr.b64e(_raw_x25519(private.public_key()))}
    )


def init_reveal_keyring(
    path: str | Path,
    *,
    provider: str = "local",
    protection: str = "dev",
    env: str | None = None,
    scrypt_n: int = _kr.DEFAULT_SCRYPT_N,
    params: dict[str, str] | None = None,
    names: tuple[str, ...] = (DEFAULT_REVEAL_KEY,),
) -> KeyRef:
    """Create a reveal keyring (refuses to overwrite): reveal key pairs, audit MAC key, checkpoint signing key."""
    from cloakbeam.keys.service import make_provider

    p = Path(path)
    if p.exists():
        raise ConfigError(f"reveal keyring {p} already exists")
    ref = KeyRef(provider=provider, path=str(p), params=tuple(sorted((params or {}).items())))
    if provider == "local":
        _kr.check_new_passphrase(protection, env)
    doc: dict[str, Any] = {
        "format": _kr.FORMAT,
        "version": _kr.FORMAT_VERSION,
        "purpose": REVEAL_PURPOSE,
        "provider": provider,
        "keyring_id": os.urandom(8).hex(),
        "created": _kr.now_iso(),
        "dev": protection == "dev" and provider == "local",
        "protection": _kr.new_protection(protection, env, scrypt_n) if provider == "local" else {"mode": "kms"},
        "keks": {},
        "secrets": {},
    }
    prov = make_provider(ref, doc)
    prov.rotate("default")
    for name in names:
        _add_reveal_version(doc, prov, name, 1)
    _wrap_secret(doc, prov, "audit", os.urandom(32))
    ck = Ed25519PrivateKey.generate()
    _wrap_secret(doc, prov, "checkpoint", ck.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))
    doc["checkpoint_public_key"] = _kr.b64e(ck.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    _kr.write_keyring_file(p, doc, create=True)
    return ref


def open_reveal_keys(ref: KeyRef) -> RevealKeys:
    """Open a reveal keyring; KeyAccessError with a sentence when it is missing, exposed or not a reveal keyring."""
    from cloakbeam.keys.service import make_provider

    if not ref.path:
        raise KeyAccessError("the reveal keyring needs a path")
    doc = _kr.read_keyring_file(ref.path)
    if doc.get("purpose") != REVEAL_PURPOSE:
        raise KeyAccessError(f"{ref.path} is not a reveal keyring (create one with 'cloakbeam keys init-reveal')")
    return RevealKeys(ref, make_provider(ref, doc), doc)


def read_reveal_public_keys(spec: str) -> dict[str, dict[str, Any]]:
    """Reveal public keys from a reveal keyring file (no secret is read) or from `[name:]base64` text."""
    p = Path(spec)
    if p.is_file():
        try:
            doc = json.loads(p.read_text())
        except ValueError:
            raise ConfigError(f"{p} is not a reveal keyring") from None
        if doc.get("purpose") != REVEAL_PURPOSE:
            raise ConfigError(f"{p} is not a reveal keyring")
        out = {}
        for name, versions in (doc.get("reveal_keys") or {}).items():
            active = [v for v in versions if v.get("state") == "active"]
            if active:
                v = max(active, key=lambda e: e["version"])
                out[name] = {"version": v["version"], "public_key": v["public_key"]}
        return out
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63}):(.+)$", spec.strip())
    name, b64 = (m.group(1), m.group(2)) if m else ("", spec)
    try:
        raw = _kr.b64d(b64.strip())
        X25519PublicKey.from_public_bytes(raw)
    except Exception:
        raise ConfigError("a reveal public key must be a reveal keyring file or base64 of a 32-byte X25519 key") from None
    return {name or DEFAULT_REVEAL_KEY: {"version": 1, "public_key": _kr.b64e(raw)}}


def verify_checkpoint_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False
