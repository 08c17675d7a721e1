"""Shared helpers for the keys/encryption tests: keyrings in temporary directories."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cloakbeam.keys.service import KeyRef, KeyService, init_keyring, open_key_service

logging.getLogger("cloakbeam.keys").setLevel(logging.ERROR)


def dev_keyring(tmp_path: Path, name: str = "keyring.json", **params: str) -> KeyRef:
    """An unprotected dev keyring pair (fast): the pipeline keyring, and beside it the reveal keyring it seals
    to (`dev_reveal_keyring_path`); extra KeyRef params such as dek_max_uses."""
    from cloakbeam.keys.sealing import init_reveal_keyring, read_reveal_public_keys
    from cloakbeam.keys.service import dev_reveal_keyring_path

    reveal = dev_reveal_keyring_path(tmp_path / name)
    init_reveal_keyring(reveal, protection="dev")
    ref = init_keyring(tmp_path / name, protection="dev", reveal_public_keys=read_reveal_public_keys(str(reveal)))
    return KeyRef(provider="local", path=ref.path, params=tuple(sorted(params.items())))


def reveal_ref(ref: KeyRef) -> KeyRef:
    """The reveal keyring of a dev keyring pair."""
    from cloakbeam.keys.service import dev_reveal_keyring_path

    return KeyRef(provider="local", path=str(dev_reveal_keyring_path(ref.path or "")))


def with_reveal(ks: KeyService) -> KeyService:
    """Attach the dev pair's reveal keyring: the reveal service's view (can open sealed keys)."""
    from cloakbeam.keys.sealing import open_reveal_keys

    ks.attach_reveal(open_reveal_keys(reveal_ref(ks.ref)))
    return ks


def open_dev(tmp_path: Path, **params: str) -> KeyService:
    """A dev key service with its reveal keyring attached (round trips in one process)."""
    return with_reveal(open_key_service(dev_keyring(tmp_path, **params)))


def open_pipeline_dev(tmp_path: Path, **params: str) -> KeyService:
    """A dev key service as the pipeline holds it: no reveal keyring."""
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
    from cloakbeam.keys.sealing import is_sealed, open_reveal_keys
    from cloakbeam.keys.service import _dek_aad

    reveal = open_reveal_keys(reveal_ref(ks.ref))
    for rec in ks.wrapped_keys_used():
        if is_sealed(rec):
            out.append(reveal.unwrap(rec["seal"], kr.b64d(rec["wrapped"]), _dek_aad(rec)))
            out.append(kr.b64d(rec["seal"]["sealed"])[-48:])  # (ciphertext of the batch key; never equals a key)
        else:
            out.append(prov.unwrap(rec["kek"], rec["kek_version"], kr.b64d(rec["wrapped"]), _dek_aad(rec)))
    for batch in ks._state.seals.values():  # the process's batch keys: never in a pickle or a log either
        out.append(_batch_raw(reveal, batch.record))
    return [x for x in out if x]


def _batch_raw(reveal, seal) -> bytes:
    from cloakbeam.keys.sealing import _batch_key_bytes

    return _batch_key_bytes(reveal, seal, reveal.batch_aead(seal))


# -- loopback KMS servers (real HTTP on 127.0.0.1; they implement only the endpoints cloakbeam uses) --------

import base64 as _b64
import json as _json
import os as _os
import socket as _socket
import threading as _threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from cryptography.exceptions import InvalidTag as _InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM


def free_port() -> int:
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, handler_cls) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
        self.httpd.state = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.calls: list[str] = []
        self.thread = _threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        return _json.loads(self.rfile.read(n) or b"{}") if n else {}

    def _send(self, code: int, doc: dict | None) -> None:
        data = b"" if doc is None else _json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeVaultTransit(_Server):
    """Vault transit subset: keys create/read/rotate/config, encrypt, decrypt (AES-256-GCM, versioned)."""

    def __init__(self, token: str = "test-token") -> None:
        self.token = token
        self.keys: dict[str, dict] = {}
        super().__init__(_VaultHandler)


class _VaultHandler(_Handler):
    def _route(self, method: str) -> None:
        st: FakeVaultTransit = self.server.state  # type: ignore[attr-defined]
        if self.headers.get("X-Vault-Token") != st.token:
            return self._send(403, {"errors": ["permission denied"]})
        parts = urlparse(self.path).path.strip("/").split("/")  # v1 transit <op> <name> [rotate|config]
        st.calls.append(f"{method} {'/'.join(parts[2:3] + parts[4:])}")
        body = self._body() if method == "POST" else {}
        if len(parts) < 4 or parts[:2] != ["v1", "transit"]:
            return self._send(404, {"errors": []})
        op, name, rest = parts[2], parts[3], parts[4:]
        key = st.keys.get(name)
        if op == "keys" and not rest and method == "POST":
            st.keys.setdefault(name, {"versions": {1: _os.urandom(32)}, "latest": 1, "min_dec": 1})
            return self._send(204, None)
        if key is None:
            return self._send(404, {"errors": []})
        if op == "keys" and not rest:
            return self._send(200, {"data": {"latest_version": key["latest"], "min_decryption_version": key["min_dec"], "keys": {str(v): 0 for v in key["versions"]}}})
        if op == "keys" and rest == ["rotate"]:
            key["latest"] += 1
            key["versions"][key["latest"]] = _os.urandom(32)
            return self._send(204, None)
        if op == "keys" and rest == ["config"]:
            key["min_dec"] = int(body.get("min_decryption_version", key["min_dec"]))
            return self._send(204, None)
        aad = _b64.b64decode(body.get("associated_data") or "")
        if op == "encrypt":
            v = int(body.get("key_version") or key["latest"])
            nonce = _os.urandom(12)
            ct = _AESGCM(key["versions"][v]).encrypt(nonce, _b64.b64decode(body["plaintext"]), aad)
            return self._send(200, {"data": {"ciphertext": f"vault:v{v}:" + _b64.b64encode(nonce + ct).decode()}})
        if op == "decrypt":
            _, vtag, b64 = body["ciphertext"].split(":", 2)
            v = int(vtag[1:])
            if v < key["min_dec"] or v not in key["versions"]:
                return self._send(400, {"errors": ["ciphertext or signature version is disallowed by policy (too old)"]})
            raw = _b64.b64decode(b64)
            try:
                pt = _AESGCM(key["versions"][v]).decrypt(raw[:12], raw[12:], aad)
            except _InvalidTag:
                return self._send(400, {"errors": ["cipher: message authentication failed"]})
            return self._send(200, {"data": {"plaintext": _b64.b64encode(pt).decode()}})
        return self._send(404, {"errors": []})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("POST")


class FakeGcpKms(_Server):
    """Cloud KMS REST subset: get CryptoKey, create version, update primary, encrypt, decrypt, destroy version."""

    def __init__(self, crypto_key: str) -> None:
        self.crypto_key = crypto_key
        self.versions: dict[int, dict] = {1: {"key": _os.urandom(32), "state": "ENABLED"}}
        self.primary = 1
        super().__init__(_GcpHandler)

    def vname(self, v: int) -> str:
        return f"{self.crypto_key}/cryptoKeyVersions/{v}"

    def key_doc(self) -> dict:
        return {"name": self.crypto_key, "purpose": "ENCRYPT_DECRYPT", "primary": {"name": self.vname(self.primary), "state": "ENABLED"}}


class _GcpHandler(_Handler):
    def do_GET(self) -> None:
        st: FakeGcpKms = self.server.state  # type: ignore[attr-defined]
        path = urlparse(self.path).path[len("/v1/") :]
        st.calls.append(f"GET {path}")
        if path == st.crypto_key:
            return self._send(200, st.key_doc())
        return self._send(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})

    def do_POST(self) -> None:
        st: FakeGcpKms = self.server.state  # type: ignore[attr-defined]
        path = urlparse(self.path).path[len("/v1/") :]
        body = self._body()
        name, _, verb = path.partition(":")
        st.calls.append(f"POST {verb or name.rsplit('/', 1)[-1]}")
        err = lambda code, status, msg: self._send(code, {"error": {"code": code, "message": msg, "status": status}})  # noqa: E731
        if path == f"{st.crypto_key}/cryptoKeyVersions":
            v = max(st.versions) + 1
            st.versions[v] = {"key": _os.urandom(32), "state": "ENABLED"}
            return self._send(200, {"name": st.vname(v), "state": "ENABLED"})
        if verb == "updatePrimaryVersion" and name == st.crypto_key:
            st.primary = int(body["cryptoKeyVersionId"])
            return self._send(200, st.key_doc())
        aad = _b64.b64decode(body.get("additionalAuthenticatedData") or "")
        if verb == "encrypt":
            v = st.primary if name == st.crypto_key else int(name.rsplit("/", 1)[1])
            if st.versions.get(v, {}).get("state") != "ENABLED":
                return err(400, "FAILED_PRECONDITION", "key version is not enabled")
            nonce = _os.urandom(12)
            ct = _AESGCM(st.versions[v]["key"]).encrypt(nonce, _b64.b64decode(body["plaintext"]), aad)
            return self._send(200, {"name": st.vname(v), "ciphertext": _b64.b64encode(v.to_bytes(4, "big") + nonce + ct).decode()})
        if verb == "decrypt" and name == st.crypto_key:
            raw = _b64.b64decode(body["ciphertext"])
            v = int.from_bytes(raw[:4], "big")
            if st.versions.get(v, {}).get("state") != "ENABLED":
                return err(400, "FAILED_PRECONDITION", "key version is not enabled")
            try:
                pt = _AESGCM(st.versions[v]["key"]).decrypt(raw[4:16], raw[16:], aad)
            except _InvalidTag:
                return err(400, "INVALID_ARGUMENT", "Decryption failed")
            return self._send(200, {"plaintext": _b64.b64encode(pt).decode()})
        if verb == "destroy":
            v = int(name.rsplit("/", 1)[1])
            st.versions[v]["state"] = "DESTROY_SCHEDULED"
            return self._send(200, {"name": name, "state": "DESTROY_SCHEDULED"})
        return err(404, "NOT_FOUND", "not found")


def reveal_tables(out_dir: Path, ref: KeyRef, vault_ref: dict | None = None, columns: list[str] | None = None) -> list:
    """What the reveal service decrypts from an output (the mechanism, without HTTP, grants or audit)."""
    import pyarrow as pa

    from cloakbeam.vault.reveal import decrypt_parquet, encrypted_targets, manifest_records, parquet_file
    from cloakbeam.vault.store import open_vault

    ks = with_reveal(open_key_service(ref))
    vault = open_vault(vault_ref, ks) if vault_ref else None
    records = manifest_records(str(out_dir))
    tables = []
    for f in sorted((Path(out_dir) / "data").rglob("*.parquet")):
        pf = parquet_file(str(f))
        parts = [t for t, _ in decrypt_parquet(pf, ks, vault, encrypted_targets(pf.schema_arrow, columns), records)]
        tables.append(pa.concat_tables(parts))
    return tables


def reveal_quarantine(out_dir: Path, ks: KeyService, dataset: str) -> list[bytes]:
    """Raw records of every sealed quarantine entry of an output, opened as the reveal service does."""
    import base64

    from cloakbeam.vault.reveal import open_quarantine_lines

    out = []
    for f in sorted((Path(out_dir) / "quarantine").rglob("*.jsonl")):
        out.extend(base64.b64decode(e["record_base64"]) for e in open_quarantine_lines(f.read_bytes().splitlines(), ks, dataset))
    return out


# -- shared by the cell and encrypt-action tests ------------------------------------------------------------

def nist_gcm_vectors(name: str) -> list[dict[str, str]]:
    """The AES-256-GCM NIST CAVP vectors (96-bit IV, 128-bit tag) of one `cryptography-vectors` file."""
    import cryptography_vectors

    path = Path(cryptography_vectors.__file__).parent / "ciphers" / "AES" / "GCM" / name
    vectors, cur, keylen, ivlen, taglen = [], None, None, None, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[Keylen"):
            keylen = int(line.split("=")[1].strip(" ]"))
        elif line.startswith("[IVlen"):
            ivlen = int(line.split("=")[1].strip(" ]"))
        elif line.startswith("[Taglen"):
            taglen = int(line.split("=")[1].strip(" ]"))
        elif line.startswith("Count"):
            cur = {"keylen": keylen, "ivlen": ivlen, "taglen": taglen}
            vectors.append(cur)
        elif cur is not None and "=" in line:
            k, v = (x.strip() for x in line.split("=", 1))
            cur[k] = v
        elif cur is not None and line == "FAIL":
            cur["FAIL"] = "1"
    # The cell format uses 256-bit keys, 96-bit nonces and 128-bit tags: exactly those vectors.
    return [v for v in vectors if v["keylen"] == 256 and v["ivlen"] == 96 and v["taglen"] == 128]


def encrypt_policy(schema: Any, **fields: Any) -> Any:
    """A compiled policy keeping `gender` plus the given field actions (for encrypt tests)."""
    from cloakbeam.transforms.policy import compile_policy

    spec = {"gender": "keep", **fields}
    return compile_policy({"version": 1, "dataset": "customers", "fields": spec}, schema)


def encrypt_batch(schema: Any, n: int = 5) -> Any:
    """`n` reference records as one RecordBatch."""
    from cloakbeam.schemas.generate import _pools, generate_table

    return generate_table(n, seed=3, start=0, pools=_pools(3)).to_batches()[0]
