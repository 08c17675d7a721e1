"""The keyring file and the `local` KEK provider.

A keyring file (JSON, mode 0600, refused when group/others can read it) holds:

- `keks` (local provider only): named key-encryption keys, each a list of versions
  `{version, state: active|retired, created, material}`. `material` is the 32-byte KEK sealed with
  AES-256-GCM under the keyring's protection key; a retired version has its material destroyed.
- `secrets`: long-lived secrets wrapped under a KEK: `root` (the PRF root behind `KeyService.prf_key`) and
  `signing` (the Ed25519 manifest signing key). Rotation re-wraps them, so pseudonyms stay stable.
- `signing_public_key`: base64 Ed25519 public key (not secret).

Protection of the KEK material (`protection.mode`):
- `passphrase`: scrypt(passphrase from the env var named in `protection.env`, default
  CLOAKBEAM_KEYRING_PASSPHRASE) -> 32-byte key; new keyrings use N = 2^17, r = 8, p = 1 (OWASP's scrypt
  minimum) and the parameters are recorded in the file, so keyrings made with other N still open. A new
  passphrase must pass `check_passphrase` (length and estimated entropy);
- `env-key`: a raw 32-byte key, base64 or hex, from the env var named in `protection.env`
  (default CLOAKBEAM_KEYRING_KEY);
- `dev`: no protection, only with an explicit `"dev": true`; opening it logs a warning. Zero-setup demos only.

For the KMS providers (aws-kms, gcp-kms, vault-transit) the same file holds only `secrets` and the public key;
the KEKs stay in the KMS. Nothing here logs or raises with key bytes.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cloakbeam.errors import ConfigError, KeyAccessError

FORMAT = "cloakbeam-keyring"
FORMAT_VERSION = 2
DEFAULT_PASSPHRASE_ENV = "CLOAKBEAM_KEYRING_PASSPHRASE"
DEFAULT_KEY_ENV = "CLOAKBEAM_KEYRING_KEY"
DEFAULT_SCRYPT_N = 2**17
#: The passphrase floor for new keyrings: at least this many characters and this many estimated bits.
MIN_PASSPHRASE_CHARS = 12
MIN_PASSPHRASE_BITS = 60
_COMMON = ("password", "passphrase", "passw0rd", "cloakbeam", "qwerty", "letmein", "changeme", "secret", "admin", "welcome", "123456", "abcdef")
_log = logging.getLogger("cloakbeam.keys")
_warned_dev: set[str] = set()


def b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def b64d(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"), validate=True)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def read_keyring_file(path: str | Path) -> dict[str, Any]:
    """Read a keyring file, refusing one that is missing, readable by group/others, or malformed."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise KeyAccessError(f"keyring {p} does not exist; create it with 'cloakbeam keys init'") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyAccessError(f"keyring {p} is readable by other users; run 'chmod 600 {p}'")
    try:
        doc = json.loads(p.read_text())
    except Exception:
        raise KeyAccessError(f"keyring {p} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise KeyAccessError(f"keyring {p} is not a cloakbeam keyring")
    if doc.get("format") == "cloakbeam-dev-keyring":
        raise KeyAccessError(
            f"keyring {p} uses the pre-release format; move it away and run 'cloakbeam keys init --dev' (or the demo) again"
        )
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise KeyAccessError(f"keyring {p} is not a cloakbeam keyring of format version {FORMAT_VERSION}")
    return doc


def write_keyring_file(path: str | Path, doc: dict[str, Any], *, create: bool = False) -> None:
    """Atomically replace (or create exclusively) the keyring file with mode 0600."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    if create:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def new_protection(mode: str, env: str | None = None, scrypt_n: int = DEFAULT_SCRYPT_N) -> dict[str, Any]:
    """The `protection` block for a new keyring."""
    if mode == "dev":
        return {"mode": "dev"}
    if mode == "passphrase":
        return {"mode": "passphrase", "env": env or DEFAULT_PASSPHRASE_ENV, "kdf": {"name": "scrypt", "salt": b64e(os.urandom(16)), "n": scrypt_n, "r": 8, "p": 1}}
    if mode == "env-key":
        return {"mode": "env-key", "env": env or DEFAULT_KEY_ENV}
    raise ConfigError(f"unknown keyring protection '{mode}'; use passphrase, env-key or dev")


def passphrase_bits(secret: str) -> float:
    """A conservative entropy estimate: length x log2(size of the character classes used), where runs of one
    character and repeated chunks count once (so 'aaaaaaaaaaaaaaaa' or 'abcabcabcabc' score low)."""
    import math
    import re

    pool = 0
    for present, size in ((re.search(r"[a-z]", secret), 26), (re.search(r"[A-Z]", secret), 26), (re.search(r"[0-9]", secret), 10),
                          (re.search(r"[ -/:-@\[-`{-~]", secret), 33), (re.search(r"[^\x00-\x7f]", secret), 100)):
        if present:
            pool += size
    squeezed = re.sub(r"(.+?)\1+", r"\1", secret)  # repeated characters or chunks count once
    return len(squeezed) * math.log2(max(pool, 2))


def check_new_passphrase(protection: str, env: str | None) -> None:
    """For a keyring about to be created with passphrase protection: refuse a weak passphrase (a missing one is
    refused later, when the protection key is derived). Both keyrings use it: the pipeline's and the reveal's."""
    if protection != "passphrase":
        return
    name = env or DEFAULT_PASSPHRASE_ENV
    phrase = os.environ.get(name)
    if phrase:
        check_passphrase(phrase, name)


def check_passphrase(secret: str, env: str) -> None:
    """Refuse a weak passphrase for a new keyring with a sentence (never quoting it)."""
    lowered = secret.lower()
    if len(secret) < MIN_PASSPHRASE_CHARS:
        raise ConfigError(f"the passphrase in {env} is shorter than {MIN_PASSPHRASE_CHARS} characters; use a long passphrase (several random words)")
    rest = lowered
    for word in _COMMON:
        rest = rest.replace(word, "")
    if rest != lowered and passphrase_bits(rest) < MIN_PASSPHRASE_BITS:
        raise ConfigError(f"the passphrase in {env} is built on a common password; use several random words")
    if passphrase_bits(secret) < MIN_PASSPHRASE_BITS:
        raise ConfigError(f"the passphrase in {env} is too easy to guess (under {MIN_PASSPHRASE_BITS} bits by length and character variety); use several random words")


def protection_key(doc: dict[str, Any], where: str) -> bytes | None:
    """The 32-byte key sealing KEK material, or None for a dev keyring."""
    prot = doc.get("protection") or {}
    mode = prot.get("mode")
    if mode == "dev":
        if doc.get("dev") is not True:
            raise KeyAccessError(f"keyring {where} is unprotected but lacks the explicit 'dev: true' flag; refusing it")
        if where not in _warned_dev:
            _warned_dev.add(where)
            _log.warning("keyring %s is an UNPROTECTED development keyring; do not use it for real data", where)
        return None
    env = prot.get("env")
    if not env:
        raise KeyAccessError(f"keyring {where} does not name the environment variable that holds its secret")
    secret = os.environ.get(env)
    if not secret:
        raise KeyAccessError(f"keyring {where} is protected; set the environment variable {env}")
    if mode == "passphrase":
        kdf = prot.get("kdf") or {}
        try:
            return Scrypt(salt=b64d(kdf["salt"]), length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])).derive(secret.encode("utf-8"))
        except (KeyError, ValueError, binascii.Error):
            raise KeyAccessError(f"keyring {where} has invalid scrypt parameters") from None
    if mode == "env-key":
        raw: bytes | None = None
        try:
            raw = bytes.fromhex(secret) if len(secret) == 64 else b64d(secret)
        except (ValueError, binascii.Error):
            raw = None
        if raw is None or len(raw) != 32:
            raise KeyAccessError(f"environment variable {env} must hold a 32-byte key as base64 or 64 hex digits")
        return raw
    raise KeyAccessError(f"keyring {where} has an unknown protection mode")


def _kek_aad(name: str, version: int) -> bytes:
    return f"cloakbeam-keyring/v2/kek/{name}/{version}".encode()


class LocalKekProvider:
    """KEKs held in the keyring file itself, sealed under the protection key. Wraps with AES-256-GCM."""

    name = "local"

    def __init__(self, path: str | Path, doc: dict[str, Any]) -> None:
        self.path = str(path)
        self._doc = doc
        self._pkey = protection_key(doc, self.path)
        self._keks: dict[tuple[str, int], AESGCM] = {}

    def __reduce__(self):  # noqa: D105
        raise TypeError("a KEK provider holds key material and cannot be pickled")

    def __repr__(self) -> str:
        return f"LocalKekProvider(path={self.path!r})"

    # -- material ------------------------------------------------------------------------------------
    def _seal(self, name: str, version: int, kek: bytes) -> str:
        if self._pkey is None:
            return b64e(kek)
        nonce = os.urandom(12)
        return b64e(nonce + AESGCM(self._pkey).encrypt(nonce, kek, _kek_aad(name, version)))

    def _open(self, name: str, version: int, material: str) -> bytes:
        raw = b64d(material)
        if self._pkey is None:
            return raw
        try:
            return AESGCM(self._pkey).decrypt(raw[:12], raw[12:], _kek_aad(name, version))
        except InvalidTag:
            raise KeyAccessError(f"keyring {self.path}: wrong passphrase or key for KEK '{name}' version {version}") from None

    def _versions(self, name: str) -> list[dict[str, Any]]:
        keks = self._doc.setdefault("keks", {})
        if name not in keks:
            raise KeyAccessError(f"keyring {self.path} has no key named '{name}'; create it with 'cloakbeam keys rotate --name {name}'")
        return keks[name]

    def _aead(self, name: str, version: int) -> AESGCM:
        cached = self._keks.get((name, version))
        if cached is not None:
            return cached
        for v in self._versions(name):
            if v["version"] == version:
                if v.get("state") == "retired" or not v.get("material"):
                    raise KeyAccessError(
                        f"KEK '{name}' version {version} is retired and can no longer unwrap keys; "
                        "data keys still wrapped under it must be rewrapped before retiring ('cloakbeam keys rewrap')"
                    )
                aead = AESGCM(self._open(name, version, v["material"]))
                self._keks[(name, version)] = aead
                return aead
        raise KeyAccessError(f"keyring {self.path} has no version {version} of key '{name}'")

    # -- provider interface ---------------------------------------------------------------------------
    def primary_version(self, name: str) -> str:
        active = [v["version"] for v in self._versions(name) if v.get("state") == "active"]
        if not active:
            raise KeyAccessError(f"key '{name}' in keyring {self.path} has no active version; run 'cloakbeam keys rotate --name {name}'")
        return str(max(active))

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> tuple[str, bytes]:
        version = self.primary_version(name)
        nonce = os.urandom(12)
        return version, nonce + self._aead(name, int(version)).encrypt(nonce, plaintext, aad)

    def unwrap(self, name: str, version: str, wrapped: bytes, aad: bytes) -> bytes:
        try:
            v = int(version)
        except ValueError:
            raise KeyAccessError(f"key version '{version}' is not a local keyring version") from None
        aead = self._aead(name, v)
        try:
            return aead.decrypt(wrapped[:12], wrapped[12:], aad)
        except InvalidTag:
            raise KeyAccessError(f"a data key wrapped under KEK '{name}' version {v} failed to unwrap (wrong keyring or altered record)") from None

    def rotate(self, name: str) -> str:
        versions = self._doc.setdefault("keks", {}).setdefault(name, [])
        version = max((v["version"] for v in versions), default=0) + 1
        versions.append({"version": version, "state": "active", "created": now_iso(), "material": self._seal(name, version, os.urandom(32))})
        return str(version)

    def retire(self, name: str, version: str) -> None:
        v = int(version)
        versions = self._versions(name)
        if str(v) == self.primary_version(name):
            raise KeyAccessError(f"version {v} is the newest version of key '{name}'; rotate first, then rewrap, then retire it")
        for entry in versions:
            if entry["version"] == v:
                entry["state"] = "retired"
                entry.pop("material", None)  # destroyed: a retired version can never unwrap again
                entry["retired"] = now_iso()
                self._keks.pop((name, v), None)
                return
        raise KeyAccessError(f"key '{name}' has no version {v}")

    def list_keys(self) -> list[dict[str, Any]]:
        out = []
        for name, versions in sorted((self._doc.get("keks") or {}).items()):
            for v in versions:
                out.append({"name": name, "version": str(v["version"]), "state": v.get("state"), "created": v.get("created"), **({"retired": v["retired"]} if "retired" in v else {})})
        return out
