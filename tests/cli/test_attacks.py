"""Every attack of issue 12, as a test that now fails to succeed (CLI, Python API, real reveal service on loopback).

Attacks covered elsewhere: forged/expired/wrong-audience/wrong-issuer/unsigned tokens, deleting or rewriting the
audit log + head, and recomputing a forgotten subject's token then decrypting its ssn are in
tests/vault/test_service.py (both vault backends)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cloakbeam.cli.main import main
from cloakbeam.errors import KeyAccessError
from cloakbeam.keys.service import KeyRef, dev_reveal_keyring_path, open_key_service
from cloakbeam.tests.paths import SCHEMA
from cloakbeam.tests.service_fixtures import REVEAL_POLICY as POLICY
from cloakbeam.tests.service_fixtures import ThreadServer, issuer, start_subprocess_server, write_service_config  # noqa: F401
from cloakbeam.vault.audit import AuditLog


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A --dev pipeline run (dirty input, so the quarantine is non-empty) in tmp/state -> tmp/out."""
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.schemas.generate import generate

    state = tmp_path / "state"
    monkeypatch.setenv("CLOAKBEAM_STATE_DIR", str(state))
    src = generate(tmp_path / "in" / "customers.jsonl", 150, seed=9, fmt="jsonl", dirty=0.05)
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(POLICY))
    out = tmp_path / "out"
    run_pipeline(RunSettings(inputs=[src["path"]], schema=str(SCHEMA), policy=str(pol), output=str(out), batch_size=60, progress=False, dev=True))
    ring = state / "keyring.json"
    return {"tmp": tmp_path, "state": state, "out": out, "ring": ring, "ref": KeyRef(path=str(ring)), "pub": _public_key(ring)}


def _public_key(ring: Path) -> str:
    return json.loads(ring.read_text())["signing_public_key"]


@pytest.fixture
def service(run: dict[str, Any], issuer: Any) -> Any:
    vault = {"backend": "sqlite", "path": str(run["state"] / "vault.sqlite")}
    srv = ThreadServer(write_service_config(run["tmp"], str(run["ring"]), str(dev_reveal_keyring_path(run["ring"])), vault, issuer))
    srv.log = run["tmp"] / "service" / "state" / "audit.jsonl"
    yield srv
    srv.close()


def _token_file(tmp: Path, issuer: Any, **kw: Any) -> str:
    p = tmp / f"token-{len(list(tmp.glob('token-*')))}"
    p.write_text(issuer.token(**kw) + "\n")
    return str(p)


# -- roles are no longer self-asserted --------------------------------------------------------------------------
def test_role_flag_roles_file_env_and_log_flag_grant_nothing(run: dict[str, Any], service: Any, issuer: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    out, tmp = run["out"], run["tmp"]
    evil = tmp / "evil.yaml"
    evil.write_text(yaml.safe_dump({"roles": {"intern": [{"action": ["decrypt", "detokenize"], "domains": ["*"], "purposes": ["*"]}]}}))
    intern = _token_file(tmp, issuer, sub="mallory@corp", roles=["intern"], purposes=["dsar"])
    base = ["decrypt", str(out), "--server", service.url, "--token-file", intern, "--purpose", "dsar", "--public-key", run["pub"]]
    # --role (self-asserted) is refused outright without --dev
    assert main([*base, "--out", str(tmp / "p1"), "--role", "privacy-officer"]) == 2
    assert "verified token" in capsys.readouterr().err
    # --roles FILE and --log FILE no longer exist
    for extra in (["--roles", str(evil)], ["--log", str(tmp / "throwaway.jsonl")]):
        with pytest.raises(SystemExit) as ei:
            main([*base, "--out", str(tmp / "p2"), *extra])
        assert ei.value.code == 2
    # $CLOAKBEAM_ROLES pointing at the caller's own grants changes nothing: the service holds the grants
    monkeypatch.setenv("CLOAKBEAM_ROLES", str(evil))
    monkeypatch.setenv("USER", "alice")
    assert main([*base, "--out", str(tmp / "p3")]) == 1
    assert not (tmp / "p3").exists() and not (tmp / "throwaway.jsonl").exists()
    e = list(AuditLog(service.log).entries())[-1]
    assert (e["event"], e["outcome"], e["actor"]) == ("decrypt", "denied", "mallory@corp")  # the verified subject, not $USER
    # the token itself must name the purpose; a flag cannot add one
    other = _token_file(tmp, issuer, sub="bob@corp", roles=["privacy-officer"], purposes=["erasure"])
    assert main(["decrypt", str(out), "--server", service.url, "--token-file", other, "--purpose", "dsar", "--public-key", run["pub"], "--out", str(tmp / "p4")]) == 1


def test_dev_mode_audits_the_real_os_account_not_user(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from cloakbeam.vault.roles import _current_user

    (run["state"] / "roles.yaml").write_text(yaml.safe_dump({"roles": {"dpo": [{"action": "decrypt", "domains": ["*"], "purposes": ["dsar"]}]}}))
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    assert main(["decrypt", str(run["out"]), "--dev", "--role", "dpo", "--purpose", "dsar", "--public-key", run["pub"], "--out", str(run["tmp"] / "plain")]) == 0
    entries = list(AuditLog(run["state"] / "audit.jsonl").entries())
    assert entries and {e["actor"] for e in entries} == {_current_user()}
    if _current_user() != "alice":
        assert all(e["actor"] != "alice" for e in entries)


# -- the pipeline's keyring cannot open what it wrote ------------------------------------------------------------
def test_pipeline_keyring_alone_opens_no_column_no_vault_original_no_quarantine(run: dict[str, Any]) -> None:
    import base64

    from cloakbeam.keys import service as svc
    from cloakbeam.keys.cells import decrypt_column, decrypt_column_keyed
    from cloakbeam.keys.quarantine import entry_location, open_quarantine_record
    from cloakbeam.vault.reveal import manifest_records
    from cloakbeam.vault.store import open_vault

    svc._PROCESS.clear()  # a fresh process: the attacker holds the keyring file, the vault file and the output
    ks = open_key_service(run["ref"])
    f = sorted((run["out"] / "data").glob("*.parquet"))[0]
    table = pq.read_table(f)
    records = manifest_records(str(run["out"]))
    # a run-DEK column (income): sealed to the reveal key
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        decrypt_column(table.column("income"), ks.key_lookup(records), dataset="customers", column="income", value_type=pa.float64())
    # a subject-keyed column (ssn): its keys are in the vault, sealed
    vault = open_vault({"backend": "sqlite", "path": str(run["state"] / "vault.sqlite")}, ks)
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        decrypt_column_keyed(table.column("ssn"), vault.column_keys, dataset="customers", column="ssn", value_type=pa.string())
    # a vault original
    tok = table.column("email")[0].as_py()
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        vault.reveal("email", [tok])
    # a quarantine entry
    q = sorted((run["out"] / "quarantine").glob("*.jsonl"))[0]
    entry = json.loads(q.read_text().splitlines()[0])
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        open_quarantine_record(base64.b64decode(entry["record_sealed"]), entry_location(entry), ks, "customers")
    # the reveal keyring is refused as a pipeline keyring, and it is not readable by group/others
    with pytest.raises(KeyAccessError, match="reveal keyring"):
        open_key_service(KeyRef(path=str(dev_reveal_keyring_path(run["ring"]))))


# -- anchored signatures -----------------------------------------------------------------------------------------
def test_verify_needs_a_pinned_key_and_refuses_a_resigned_manifest(run: dict[str, Any], capsys: Any) -> None:
    from cloakbeam.keys.signing import sign_manifest
    from cloakbeam.tests.keys_fixtures import open_dev

    out = run["out"]
    assert main(["verify", str(out)]) == 2
    assert "no pinned signing key" in capsys.readouterr().err
    assert main(["verify", str(out), "--public-key", run["pub"]]) == 0
    conf = run["tmp"] / "verify.yaml"
    conf.write_text(yaml.safe_dump({"signing_public_key": run["pub"]}))
    assert main(["verify", str(out), "--config", str(conf)]) == 0
    # mallory edits the manifest and re-signs it with a fresh key
    man = out / "manifest.json"
    doc = json.loads(man.read_text())
    doc["counts"]["quarantined"] = 0
    man.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    sign_manifest(man, open_dev(run["tmp"] / "mallory"))
    capsys.readouterr()
    assert main(["verify", str(out), "--public-key", run["pub"]]) == 1
    assert "not by the expected key" in capsys.readouterr().err


def test_signing_key_is_wrapped_under_its_own_kek(run: dict[str, Any]) -> None:
    doc = json.loads(run["ring"].read_text())
    assert doc["secrets"]["signing"]["kek"] == "signing" and doc["secrets"]["root"]["kek"] == "default"
    assert "signing" in doc["keks"] and "reveal_public_keys" in doc


def test_decrypt_verifies_the_output_before_asking_the_service(run: dict[str, Any], service: Any, issuer: Any, capsys: Any) -> None:
    out, tmp = run["out"], run["tmp"]
    token = _token_file(tmp, issuer, sub="dpo@corp", roles=["privacy-officer"], purposes=["dsar"])
    args = ["decrypt", str(out), "--server", service.url, "--token-file", token, "--purpose", "dsar"]
    assert main([*args, "--out", str(tmp / "a")]) == 2  # no pinned key: refuse before anything else
    f = sorted((out / "data").glob("*.parquet"))[0]
    good = f.read_bytes()
    t = pq.read_table(f)
    cells = t.column("ssn").to_pylist()
    cells[0], cells[1] = cells[1], cells[0]  # swap two rows' cells
    pq.write_table(t.set_column(t.schema.get_field_index("ssn"), t.schema.field("ssn"), pa.array(cells, pa.binary())), f)
    n_before = len(list(AuditLog(service.log).entries()))
    assert main([*args, "--public-key", run["pub"], "--out", str(tmp / "b")]) == 1
    assert f.name in capsys.readouterr().err and not (tmp / "b").exists()
    assert len(list(AuditLog(service.log).entries())) == n_before  # nothing was sent to the service
    f.write_bytes(good)
    assert main([*args, "--public-key", run["pub"], "--out", str(tmp / "c")]) == 0
    plain = pa.concat_tables([pq.read_table(p) for p in sorted((tmp / "c").rglob("*.parquet"))])
    assert plain.schema.field("ssn").type == pa.string() and plain.column("ssn").null_count == 0
    assert oct((tmp / "c").stat().st_mode & 0o777) == "0o700"
    # quarantine through the service: only the steward's grant opens it
    steward = _token_file(tmp, issuer, sub="st@corp", roles=["steward"], purposes=["data-quality"])
    q = ["decrypt", str(out), "--quarantine", "--server", service.url, "--purpose", "data-quality", "--public-key", run["pub"]]
    assert main([*q, "--token-file", token, "--out", str(tmp / "q0")]) == 1
    assert main([*q, "--token-file", steward, "--out", str(tmp / "q1")]) == 0
    lines = (tmp / "q1" / "quarantine.jsonl").read_text().splitlines()
    assert lines and all("record_base64" in json.loads(x) and "record_sealed" not in json.loads(x) for x in lines)


# -- no silent dev keyring ---------------------------------------------------------------------------------------
def test_run_without_keys_exits_2_unless_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from cloakbeam.schemas.generate import generate

    state = tmp_path / "fresh-state"
    monkeypatch.setenv("CLOAKBEAM_STATE_DIR", str(state))
    src = generate(tmp_path / "c.jsonl", 30, seed=1, fmt="jsonl")
    pol = tmp_path / "p.yaml"
    pol.write_text(yaml.safe_dump({"version": 1, "dataset": "d", "fields": {"gender": "keep", "ssn": "encrypt"},
                                   "uniqueness": {"max_unique_fraction": 1}}))  # 30 records: report only
    args = ["run", "--input", src["path"], "--schema", str(SCHEMA), "--policy", str(pol), "--output", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no keyring" in err and "--dev" in err and "Traceback" not in err
    assert not (state / "keyring.json").exists()
    assert main([*args, "--dev"]) == 0
    assert (state / "keyring.json").exists()
    # a keyring without the reveal key a policy seals to is refused at construction
    pol.write_text(yaml.safe_dump({"version": 1, "dataset": "d", "fields": {"gender": "keep", "ssn": {"action": "encrypt", "key": "pii-high"}},
                                   "uniqueness": {"max_unique_fraction": 1}}))
    assert main([*args, "--overwrite"]) == 2
    assert "no reveal public key 'pii-high'" in capsys.readouterr().err


# -- TLS and the real `cloakbeam serve` process ------------------------------------------------------------------
def _self_signed(tmp: Path) -> tuple[str, str]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    c, k = tmp / "cert.pem", tmp / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(c), str(k)


@pytest.mark.slow
def test_cloakbeam_serve_over_tls_with_cli_clients(run: dict[str, Any], issuer: Any, capsys: Any) -> None:
    from cloakbeam.vault.client import RevealClient

    tmp = run["tmp"]
    vault = {"backend": "sqlite", "path": str(run["state"] / "vault.sqlite")}
    cfg = write_service_config(tmp, str(run["ring"]), str(dev_reveal_keyring_path(run["ring"])), vault, issuer)
    assert main(["serve", "--config", str(cfg), "--host", "0.0.0.0", "--port", "1"]) == 2  # plain HTTP off loopback
    assert "plain HTTP" in capsys.readouterr().err
    cert, key = _self_signed(tmp)
    proc, url = start_subprocess_server(cfg, tls=(cert, key))
    try:
        token = _token_file(tmp, issuer, sub="dpo@corp", roles=["privacy-officer"], purposes=["dsar"])
        tok = pq.read_table(sorted((run["out"] / "data").glob("*.parquet"))[0]).column("email")[0].as_py()
        assert main(["vault", "detokenize", "--server", url, "--ca-file", cert, "--token-file", token, "--purpose", "dsar", "--domain", "email", tok]) == 0
        assert "@" in capsys.readouterr().out
        with pytest.raises(Exception):  # a client that does not trust the certificate refuses to talk
            RevealClient(url, "x").detokenize("email", [tok], "dsar")
        # the token can come from $CLOAKBEAM_TOKEN (the token itself, never a role)
        os.environ["CLOAKBEAM_TOKEN"] = Path(token).read_text().strip()
        try:
            rc = main(["vault", "forget", "--server", url, "--ca-file", cert, "--purpose", "dsar", "--subject", "C_NOBODY"])
        finally:
            del os.environ["CLOAKBEAM_TOKEN"]
        assert rc == 1 and "nothing to forget" in capsys.readouterr().err
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    shutil.rmtree(tmp / "service", ignore_errors=True)
