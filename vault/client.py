"""Clients of the reveal service: `RevealClient` over HTTP(S) with a bearer token, and `InProcessReveal` for the
CLI's explicit `--dev` mode (the same RevealCore in this process, identity = the OS account). Both offer the same
methods, so `cloakbeam vault detokenize|forget`, `cloakbeam decrypt` and `cloakbeam audit verify` do not care which
one they talk to. Neither ever holds a key: the HTTP client holds a token, the dev one a development state dir.

The decrypt request body is framed: u32 big-endian length || JSON {"wrapped_keys": [...]} (the output manifest's
sealed DEK records, not secret) || the Parquet file's bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cloakbeam.errors import AccessDenied, CloakbeamError, ConfigError, IntegrityError

TOKEN_ENV = "CLOAKBEAM_TOKEN"


def read_token(token_file: str | None, env: str = TOKEN_ENV) -> str:
    """The bearer token from a file (first line) or from the environment variable that holds the token itself."""
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from None
    else:
        text = os.environ.get(env, "").strip()
    if not text:
        raise ConfigError(f"no bearer token: pass --token-file FILE or set {env} to the token (a JWT from your identity provider)")
    return text.splitlines()[0].strip()


def frame_decrypt_body(parquet: bytes, wrapped_keys: Sequence[dict[str, Any]]) -> bytes:
    head = json.dumps({"wrapped_keys": list(wrapped_keys)}, sort_keys=True).encode()
    return len(head).to_bytes(4, "big") + head + parquet


def unframe_decrypt_body(body: bytes) -> tuple[list[dict[str, Any]], bytes]:
    try:
        n = int.from_bytes(body[:4], "big")
        head = json.loads(body[4 : 4 + n])
        records = [r for r in head.get("wrapped_keys", []) if isinstance(r, dict)]
    except Exception:
        raise ConfigError("the decrypt request body is not framed as length || JSON || Parquet") from None
    return records, body[4 + n :]


class RevealClient:
    """HTTP client of `cloakbeam serve` (httpx; TLS verified against the system store or `ca_file`)."""

    def __init__(self, url: str, token: str, ca_file: str | None = None, timeout: float = 300.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {token}"}, verify=ca_file or True, timeout=timeout)

    def __repr__(self) -> str:
        return f"RevealClient({self.url!r})"

    def close(self) -> None:
        self._client.close()

    def _check(self, r: Any) -> Any:
        if r.status_code < 400:
            return r
        try:
            msg = r.json().get("error", "")
        except Exception:
            msg = r.text[:200]
        msg = f"reveal service refused ({r.status_code}): {msg}"
        if r.status_code in (401, 403, 429):
            raise AccessDenied(msg)
        if r.status_code == 400:
            raise ConfigError(msg)
        if r.status_code == 422:
            raise IntegrityError(msg)
        raise CloakbeamError(msg)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            return self._check(self._client.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise CloakbeamError(f"cannot reach the reveal service at {self.url} ({type(exc).__name__})") from None

    def detokenize(self, domain: str, tokens: Sequence[str], purpose: str | None, label: str | None = None) -> list[tuple[str, str | None]]:
        r = self._call("POST", "/v1/detokenize", json={"domain": domain, "tokens": list(tokens), "purpose": purpose, "label": label})
        return [(x["status"], x["value"]) for x in r.json()["results"]]

    def decrypt_file(self, path: str, purpose: str | None, columns: Sequence[str] | None, wrapped_keys: Sequence[dict[str, Any]] = ()) -> tuple[Any, dict[str, int]]:
        """(pa.Table, unreadable cells per column) for one Parquet file, read from the streamed Arrow IPC answer."""
        import httpx
        import pyarrow as pa

        params = {"purpose": purpose or "", "file": Path(path).name}
        if columns:
            params["columns"] = ",".join(columns)
        body = frame_decrypt_body(Path(path).read_bytes(), wrapped_keys)
        try:
            with self._client.stream("POST", "/v1/decrypt", params=params, content=body) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                unreadable = json.loads(r.headers.get("x-cloakbeam-unreadable") or "{}")
                data = b"".join(r.iter_bytes())
        except httpx.TransportError as exc:
            raise CloakbeamError(f"cannot reach the reveal service at {self.url} ({type(exc).__name__})") from None
        try:
            table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        except pa.ArrowInvalid:
            raise CloakbeamError("the reveal service's answer was cut short (the stream is incomplete)") from None
        return table, unreadable

    def open_quarantine(self, path: str, dataset: str, purpose: str | None) -> list[dict[str, Any]]:
        r = self._call("POST", "/v1/quarantine", params={"purpose": purpose or "", "dataset": dataset, "file": Path(path).name}, content=Path(path).read_bytes())
        return [json.loads(x) for x in r.text.splitlines() if x.strip()]

    def forget(self, purpose: str | None, **what: Any) -> int:
        return int(self._call("POST", "/v1/forget", json={"purpose": purpose, **what}).json()["forgotten"])

    def audit_verify(self, purpose: str | None) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/audit/verify", params={"purpose": purpose or ""}).json())


class InProcessReveal:
    """The `--dev` stand-in: RevealCore in this process, identity = the OS account, role as given."""

    def __init__(self, core: Any, identity: Any) -> None:
        self.core = core
        self.identity = identity

    def close(self) -> None:
        self.core.close()

    def detokenize(self, domain: str, tokens: Sequence[str], purpose: str | None, label: str | None = None) -> list[tuple[str, str | None]]:
        return self.core.detokenize(self.identity, purpose, domain, tokens, label)

    def decrypt_file(self, path: str, purpose: str | None, columns: Sequence[str] | None, wrapped_keys: Sequence[dict[str, Any]] = ()) -> tuple[Any, dict[str, int]]:
        import pyarrow as pa

        schema, batches, unreadable = self.core.decrypt(self.identity, purpose, Path(path).read_bytes(), columns, Path(path).name, list(wrapped_keys))
        tables = list(batches)
        return (pa.concat_tables(tables) if tables else schema.empty_table()), unreadable

    def open_quarantine(self, path: str, dataset: str, purpose: str | None) -> list[dict[str, Any]]:
        return self.core.open_quarantine(self.identity, purpose, dataset, Path(path).read_bytes(), Path(path).name)

    def forget(self, purpose: str | None, **what: Any) -> int:
        return int(self.core.forget(self.identity, purpose, **what))

    def audit_verify(self, purpose: str | None) -> dict[str, Any]:
        return dict(self.core.audit_verify(self.identity, purpose))


def iter_output_files(src: Path) -> Iterator[tuple[Path, str]]:
    """(file, path relative to the output) for every Parquet data file under an output dir (or one file)."""
    if src.is_dir():
        for f in sorted(src.rglob("*.parquet")):
            if f.is_file() and not f.name.startswith("."):
                yield f, f.relative_to(src).as_posix()
    elif src.is_file():
        yield src, src.name
