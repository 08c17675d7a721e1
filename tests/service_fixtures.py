"""Fixtures for the reveal service: a test token issuer (Ed25519) with its JWKS on a real loopback HTTP server,
real JWTs, and the service itself on a real uvicorn server (thread or subprocess) on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ISSUER = "https://issuer.test/"
AUDIENCE = "cloakbeam-reveal"

GRANTS = {
    "version": 1,
    "roles": {
        "support": [{"action": "detokenize", "domains": ["email"], "purposes": ["ticket"], "rows_per_day": 50}],
        "privacy-officer": [
            {"action": ["detokenize", "decrypt", "forget"], "domains": ["*"], "purposes": ["dsar", "erasure"]},
        ],
        "steward": [{"action": "decrypt", "domains": ["quarantine"], "purposes": ["data-quality"]}],
        "auditor": [{"action": "audit", "domains": ["*"], "purposes": ["review"]}],
        "limited": [{"action": "detokenize", "domains": ["*"], "purposes": ["ticket"], "requests_per_minute": 3}],
        "lapsed": [{"action": "detokenize", "domains": ["*"], "purposes": ["ticket"], "valid_until": "2020-01-01T00:00:00Z"}],
    },
}


# The policy the reveal tests run: subject-keyed tokens and cells, so detokenize, decrypt and forget all apply.
REVEAL_POLICY = {
    "version": 1,
    "dataset": "customers",
    "fields": {
        "customer_id": {"action": "tokenize", "prefix": "cust_", "subject": "customer_id"},
        "email": {"action": "tokenize", "normalize": "lower", "subject": "customer_id"},
        "ssn": {"action": "encrypt", "subject": "customer_id"},
        "income": "encrypt",
        "gender": "keep",
        "churned": "keep",
    },
    # 150-record releases single people out whatever they keep: the uniqueness scan reports without failing here.
    "uniqueness": {"max_unique_fraction": 1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Issuer:
    """A token issuer: Ed25519 signing key, JWKS served over real HTTP on loopback."""

    def __init__(self) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.key = Ed25519PrivateKey.generate()
        self.kid = uuid.uuid4().hex[:8]
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "EdDSA"})
        body = json.dumps({"keys": [jwk]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.jwks_url = f"http://127.0.0.1:{self.httpd.server_port}/.well-known/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, sub: str = "alice@corp", roles: list[str] | None = None, purposes: list[str] | None = None, key: Any = None,
              alg: str = "EdDSA", kid: str | None = None, **claims: Any) -> str:
        import jwt

        now = int(time.time())
        doc = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "nbf": now - 5, "exp": now + 600,
               "roles": roles if roles is not None else ["privacy-officer"], "purposes": purposes if purposes is not None else ["dsar"]}
        doc.update(claims)
        doc = {k: v for k, v in doc.items() if v is not None}
        return jwt.encode(doc, key or self.key, algorithm=alg, headers={"kid": kid or self.kid})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    i = Issuer()
    yield i
    i.close()


def write_service_config(root: Path, keyring: str, reveal_keyring: str, vault: dict[str, Any], issuer: Issuer, grants: dict[str, Any] | None = None) -> Path:
    """serve.yaml under root/service with the audit log in its state dir and checkpoints outside it."""
    svc = root / "service"
    (svc / "state").mkdir(parents=True, exist_ok=True)
    (root / "worm").mkdir(exist_ok=True)
    (svc / "grants.yaml").write_text(yaml.safe_dump(grants or GRANTS))
    doc = {
        "state_dir": "state",
        "keys": {"provider": "local", "path": keyring},
        "reveal_keys": {"provider": "local", "path": reveal_keyring},
        "vault": vault,
        "grants": "grants.yaml",
        "audit": {"log": "state/audit.jsonl", "checkpoints": str(root / "worm" / "checkpoints.jsonl")},
        "auth": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": issuer.jwks_url, "algorithms": ["EdDSA", "RS256"]},
    }
    path = svc / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class ThreadServer:
    """The reveal service app on a real uvicorn server in a thread (loopback, free port)."""

    def __init__(self, config_path: Path) -> None:
        import uvicorn

        from cloakbeam.vault.service import Authenticator, build_app, load_service_config, open_core

        self.cfg = load_service_config(config_path)
        self.core = open_core(self.cfg)
        app = build_app(self.core, Authenticator(self.cfg.auth))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.core.close()


def wait_healthy(url: str, timeout: float = 30.0, verify: Any = True) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"reveal service at {url} did not come up")
        time.sleep(0.1)


def start_subprocess_server(config_path: Path, tls: tuple[str, str] | None = None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`cloakbeam serve` as a real subprocess; returns (process, base URL). Caller terminates it."""
    port = free_port()
    cmd = [sys.executable, "-m", "cloakbeam.cli.main", "serve", "--config", str(config_path), "--port", str(port)]
    if tls:
        cmd += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        wait_healthy(url, verify=False if tls else True)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"cloakbeam serve did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}") from None
    return proc, url
