"""Fixtures for the vault tests: a real PostgreSQL server, a dev keyring, and a worker for multi-process tests.

PostgreSQL: when CLOAKBEAM_TEST_PG_DSN is set, that server is used (each test gets its own database created
through it, so the role needs CREATEDB). Otherwise a throwaway server is started once per test session:
`initdb` + `pg_ctl` from /usr/lib/postgresql/*/bin in a temporary directory, listening on 127.0.0.1 on a free
port, run as the `postgres` user when the tests run as root (initdb refuses root), stopped at exit. Tests skip,
saying why, only when no PostgreSQL binaries exist at all.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_DSN_ENV = "CLOAKBEAM_TEST_PG_DSN"
_SERVER: dict[str, Any] = {}


def pg_bin(name: str) -> str | None:
    """Path of a PostgreSQL binary (newest /usr/lib/postgresql/*/bin first, then PATH)."""
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return candidates[-1]
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]


def _start_server() -> str:
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip(f"no PostgreSQL binaries (initdb, pg_ctl) found and {PG_DSN_ENV} is not set; apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="cloakbeam-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run(
        _as_postgres([pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "server.log"), "-w", "-t", "60", "start"]),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )

    def stop() -> None:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def pg_server_dsn() -> str:
    """DSN of the admin database of the test server (started on first call)."""
    if "dsn" not in _SERVER:
        _SERVER["dsn"] = os.environ.get(PG_DSN_ENV) or _start_server()
    return _SERVER["dsn"]


def _with_db(dsn: str, db: str) -> str:
    import psycopg.conninfo

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = db
    return psycopg.conninfo.make_conninfo(**params)


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh, empty database on a real PostgreSQL server; dropped after the test."""
    import psycopg

    admin = pg_server_dsn()
    name = "cb_vault_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def keyring(tmp_path: Path) -> Any:
    """A KeyRef to a fresh development keyring."""
    from cloakbeam.keys.service import KeyRef, ensure_local_keyring

    path = tmp_path / "keyring.json"
    ensure_local_keyring(path)
    return KeyRef(provider="local", path=str(path))


def service_keys(ref: Any) -> Any:
    """The reveal service's view of a dev keyring pair: the pipeline keyring plus its reveal keyring attached."""
    from cloakbeam.keys.sealing import open_reveal_keys
    from cloakbeam.keys.service import KeyRef, dev_reveal_keyring_path, open_key_service

    ks = open_key_service(ref)
    ks.attach_reveal(open_reveal_keys(KeyRef(path=str(dev_reveal_keyring_path(ref.path)))))
    return ks


@pytest.fixture
def pg_ref(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A vault reference to the fresh PostgreSQL database (DSN in an environment variable, as in production)."""
    monkeypatch.setenv("CLOAKBEAM_VAULT_DSN", pg_dsn)
    return {"backend": "postgres", "dsn_env": "CLOAKBEAM_VAULT_DSN"}


def pg_dump(dsn: str) -> bytes:
    """Plain-SQL dump of a database (for the no-plaintext scan)."""
    exe = pg_bin("pg_dump")
    if not exe:
        pytest.skip("pg_dump not found")
    return subprocess.run([exe, "--no-owner", "-d", dsn], check=True, capture_output=True).stdout


# --------------------------------------------------------------------------------------------------------------
# Multi-process worker (module-level so that spawned processes can import it).
# --------------------------------------------------------------------------------------------------------------


def tokenize_worker(
    key_path: str, ref: dict[str, Any], dsn: str | None, domain: dict[str, Any], batches: list[list[str]], barrier: Any, out: Any
) -> None:
    """Open keys and vault like a DoFn.setup() would, wait for the other worker, tokenize batches, report tokens."""
    from cloakbeam.keys.service import KeyRef, open_key_service
    from cloakbeam.vault import Domain, TokenFormat, open_vault

    try:
        if dsn:
            os.environ["CLOAKBEAM_VAULT_DSN"] = dsn
        ks = open_key_service(KeyRef(provider="local", path=key_path))
        vault = open_vault(ref, ks)
        dom = Domain(domain["name"], TokenFormat(**domain["fmt"]), domain["normalize"])
        barrier.wait(timeout=300)
        result: dict[str, str] = {}
        for batch in batches:
            result.update(zip(batch, vault.tokenize(dom, batch)))
        vault.close()
        out.put(result)
    except BaseException as exc:  # report instead of leaving the parent waiting
        import traceback

        out.put({"__error__": f"{exc.__class__.__name__}: {traceback.format_exc()[-1500:]}"})
        raise


class DedicatedPostgres:
    """A PostgreSQL server of one's own (for fault tests that restart it), on loopback, removed by `close()`."""

    def __init__(self) -> None:
        initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not initdb or not self.pg_ctl:
            pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) found; apt-get install postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="cloakbeam-pg-fault-"))
        self.data, sock = self.root / "data", self.root / "sock"
        sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(sock, "postgres", "postgres")
        self.port = _free_port()
        subprocess.run(_as_postgres([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._opts = f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        self.start()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres([self.pg_ctl, "-D", str(self.data), *args]), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self._ctl("-o", self._opts, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")

    def restart(self) -> None:
        """Stop at once (every connection is cut, as in a crash) and start again."""
        self._ctl("-m", "immediate", "-w", "stop")
        self.start()

    def database(self) -> str:
        import psycopg

        name = "cb_fault_" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return _with_db(self.dsn, name)

    def close(self) -> None:
        subprocess.run(_as_postgres([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)
