"""Signed manifests and output verification.

`sign_manifest(path, key_service)` signs the exact bytes of OUT/manifest.json with the keyring's Ed25519 key
(the private key is stored wrapped under the KEK in the keyring; the public key is stored in clear) and
writes OUT/manifest.json.sig:

    {"format": "cloakbeam-signature/1", "alg": "Ed25519", "public_key": b64, "key_fingerprint": hex16,
     "manifest_sha256": hex, "signature": b64}

The signed message is b"cloakbeam-manifest-signature/v1\\x00" || manifest bytes.

`verify_output(dir)` returns a list of problems (empty = intact): the signature, then every file the manifest
lists under "outputs" and "quarantine" ({path, rows, bytes, sha256}) for existence, size, SHA-256 and row
count, and any file under data/ or quarantine/ that the manifest does not list. Messages name files, never
contents.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MANIFEST_NAME = "manifest.json"
SIGNATURE_SUFFIX = ".sig"
_CONTEXT = b"cloakbeam-manifest-signature/v1\x00"
_OUTPUT_DIRS = ("data", "quarantine")
_SIG_FIELDS = {"format", "alg", "public_key", "key_fingerprint", "manifest_sha256", "signature"}


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def sign_manifest(manifest_path: str | Path, key_service: Any) -> str:
    """Sign `manifest_path` with the keyring's signing key; write `<manifest>.sig`; return its path."""
    p = Path(manifest_path)
    data = p.read_bytes()
    sk = key_service.signing_key()
    pub = public_key_bytes(sk.public_key())
    doc = {
        "format": "cloakbeam-signature/1",
        "alg": "Ed25519",
        "public_key": base64.b64encode(pub).decode(),
        "key_fingerprint": fingerprint(pub),
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "signature": base64.b64encode(sk.sign(_CONTEXT + data)).decode(),
    }
    sig = p.with_name(p.name + SIGNATURE_SUFFIX)
    tmp = sig.with_name(sig.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, sig)
    return str(sig)


def load_public_key(spec: str) -> bytes:
    """A raw 32-byte Ed25519 public key from base64 text, or from a file holding base64, PEM or a keyring."""
    p = Path(spec)
    text = p.read_text().strip() if p.is_file() else spec.strip()
    if text.startswith("{"):
        text = json.loads(text)["signing_public_key"]
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return public_key_bytes(key)
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return raw


def _file_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _row_count(path: Path) -> int | None:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows
        except Exception:
            return None
    if path.suffix == ".jsonl":
        rows = 0
        try:
            for line in path.read_bytes().splitlines():
                if line.strip():
                    rows += int(json.loads(line).get("records", 1))
        except Exception:
            return None
        return rows
    return None


def _tail(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < 4:
            return b""
        fh.seek(-4, os.SEEK_END)
        return fh.read(4)


def verify_signature(out_dir: str | Path, public_key: bytes | None = None) -> list[str]:
    """Problems with OUT/manifest.json's signature (empty when it verifies, against `public_key` if given)."""
    d = Path(out_dir)
    man = d / MANIFEST_NAME
    sig = d / (MANIFEST_NAME + SIGNATURE_SUFFIX)
    if not man.exists():
        return [f"{MANIFEST_NAME} is missing from {d}"]
    if not sig.exists():
        return [f"{MANIFEST_NAME} is not signed ({sig.name} is missing)"]
    try:
        doc = json.loads(sig.read_text())
        pub = base64.b64decode(doc["public_key"], validate=True)
        signature = base64.b64decode(doc["signature"], validate=True)
        canonical = json.dumps(doc, indent=1, sort_keys=True) + "\n"  # the exact form sign_manifest writes
        if sig.read_text() != canonical or doc.get("alg") != "Ed25519" or doc.get("format") != "cloakbeam-signature/1" or set(doc) != _SIG_FIELDS:
            raise ValueError
    except Exception:
        return [f"{sig.name} is malformed; {MANIFEST_NAME} cannot be trusted"]
    problems = []
    if doc["key_fingerprint"] != fingerprint(pub):
        problems.append(f"{sig.name} was altered (key fingerprint does not match its public key); {MANIFEST_NAME} cannot be trusted")
    if doc["manifest_sha256"] != hashlib.sha256(man.read_bytes()).hexdigest():
        problems.append(f"{MANIFEST_NAME} does not match the SHA-256 recorded in {sig.name}")
    if public_key is not None and pub != public_key:
        problems.append(
            f"{MANIFEST_NAME} is signed by key {fingerprint(pub)}, not by the expected key {fingerprint(public_key)}"
        )
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(signature, _CONTEXT + man.read_bytes())
    except (InvalidSignature, ValueError):
        problems.append(f"{MANIFEST_NAME} was modified after signing (its signature does not verify)")
    return problems


def verify_output(out_dir: str | Path, public_key: bytes | None = None) -> list[str]:
    """Every problem with an output directory: signature, listed files (size, SHA-256, rows), unlisted files."""
    d = Path(out_dir)
    problems = verify_signature(d, public_key)
    man = d / MANIFEST_NAME
    if not man.exists():
        return problems
    try:
        manifest = json.loads(man.read_text())
        entries = list(manifest.get("outputs") or []) + list(manifest.get("quarantine") or [])
    except Exception:
        return problems + [f"{MANIFEST_NAME} is not valid JSON"]
    listed = set()
    for e in entries:
        rel = str(e.get("path", ""))
        listed.add(rel)
        f = d / rel
        if not rel or ".." in Path(rel).parts or not f.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
            continue
        size, digest = _file_sha256(f)
        changed = digest != e.get("sha256")
        if changed:
            problems.append(f"{rel}: content changed (SHA-256 differs from the manifest)")
        if size != e.get("bytes"):
            problems.append(f"{rel}: size is {size} bytes, the manifest says {e.get('bytes')}")
        rows = _row_count(f)
        encrypted_footer = f.suffix == ".parquet" and _tail(f) == b"PARE"  # Parquet modular encryption
        if rows is None and not changed and not encrypted_footer and f.suffix in (".parquet", ".jsonl"):
            problems.append(f"{rel}: cannot be read to count rows")
        elif rows is not None and rows != e.get("rows"):
            problems.append(f"{rel}: holds {rows} rows, the manifest says {e.get('rows')}")
    for sub in _OUTPUT_DIRS:
        base = d / sub
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*")):
            if f.is_file():
                rel = f.relative_to(d).as_posix()
                if rel not in listed:
                    problems.append(f"{rel}: present in the output but not listed in the manifest")
    return problems
