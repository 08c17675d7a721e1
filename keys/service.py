"""KeyService: the one door through which pipeline code obtains keys.

Pipeline code holds a picklable `KeyRef` (provider name and non-secret settings) and calls
`open_key_service(ref)` in `DoFn.setup()`. A KeyService holds key material and therefore refuses to be
pickled. Nothing here logs, prints or puts key bytes in exception text.

Interface used by the other layers (keep it stable):
- `prf_key(purpose) -> bytes`: a 32-byte key, the same on every worker, run and retry for the same keyring
  and purpose (pseudonyms, tokens, date shifts, keyed hashes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cloakbeam.errors import KeyAccessError


@dataclass(frozen=True)
class KeyRef:
    """Where keys live, without any key material: safe to pickle into a DoFn and to write in a manifest."""

    provider: str = "local"
    path: str | None = None
    params: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def param(self, name: str, default: str | None = None) -> str | None:
        return dict(self.params).get(name, default)

    def describe(self) -> dict[str, Any]:
        return {"provider": self.provider, "path": self.path, **dict(self.params)}


class KeyService:
    """Key material for one worker. Not picklable; create it in `DoFn.setup()`."""

    def __init__(self, ref: KeyRef, root: bytes) -> None:
        self.ref = ref
        self._root = root

    def __reduce__(self):  # noqa: D105
        raise TypeError("KeyService holds key material and cannot be pickled; pickle its KeyRef instead")

    def __repr__(self) -> str:
        return f"KeyService(provider={self.ref.provider!r})"

    def prf_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose`, derived with HKDF-SHA256 from the keyring's root secret."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"cloakbeam/prf/" + purpose.encode()).derive(self._root)

    def keyed_hash(self, purpose: str, data: bytes) -> str:
        """Hex HMAC-SHA256 of `data` under the purpose key (for quarantine fingerprints and blind indexes)."""
        return hmac.new(self.prf_key(purpose), data, hashlib.sha256).hexdigest()

    def close(self) -> None:
        self._root = b""


def ensure_local_keyring(path: str | Path) -> bool:
    """Create a development keyring at `path` (mode 0600) if absent. Returns True when it was created."""
    p = Path(path)
    if p.exists():
        return False
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": "cloakbeam-dev-keyring", "version": 1, "root": base64.b64encode(os.urandom(32)).decode()}
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    return True


def open_key_service(ref: KeyRef) -> KeyService:
    """Open the keys `ref` points to; raise KeyAccessError with a sentence saying what to fix."""
    if ref.provider != "local":
        raise KeyAccessError(f"key provider '{ref.provider}' is not available in this build")
    if not ref.path:
        raise KeyAccessError("the local key provider needs a keyring path")
    p = Path(ref.path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise KeyAccessError(f"keyring {p} does not exist; create it with 'cloakbeam keys init'") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyAccessError(f"keyring {p} is readable by other users; run 'chmod 600 {p}'")
    try:
        doc = json.loads(p.read_text())
        root = base64.b64decode(doc["root"])
    except Exception:
        raise KeyAccessError(f"keyring {p} is not a valid cloakbeam keyring") from None
    if len(root) != 32:
        raise KeyAccessError(f"keyring {p} holds a root key of the wrong size")
    return KeyService(ref, root)
