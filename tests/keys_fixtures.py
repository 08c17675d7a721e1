"""Shared helpers for the keys/encryption tests: keyrings in temporary directories."""

from __future__ import annotations

import logging
from pathlib import Path

from cloakbeam.keys.service import KeyRef, KeyService, init_keyring, open_key_service

logging.getLogger("cloakbeam.keys").setLevel(logging.ERROR)


def dev_keyring(tmp_path: Path, name: str = "keyring.json", **params: str) -> KeyRef:
    """An unprotected dev keyring (fast); extra KeyRef params such as dek_max_uses."""
    ref = init_keyring(tmp_path / name, protection="dev")
    return KeyRef(provider="local", path=ref.path, params=tuple(sorted(params.items())))


def open_dev(tmp_path: Path, **params: str) -> KeyService:
    return open_key_service(dev_keyring(tmp_path, **params))


def all_key_bytes(ks: KeyService) -> list[bytes]:
    """Every secret byte string the service holds or can derive, for "never leaks" assertions."""
    from cloakbeam.keys import keyring as kr

    out = [ks._root, ks.prf_key("x")]
    doc = ks._doc
    prov = ks._provider
    for name, versions in (doc.get("keks") or {}).items():
        for v in versions:
            if v.get("material"):
                out.append(prov._open(name, v["version"], v["material"]))
    from cloakbeam.keys.service import _dek_aad

    for rec in ks.wrapped_keys_used():
        out.append(prov.unwrap(rec["kek"], rec["kek_version"], kr.b64d(rec["wrapped"]), _dek_aad(rec)))
    return out
