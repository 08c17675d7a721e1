"""`cloakbeam vault detokenize|forget` and `cloakbeam audit verify` through the real CLI entry point, in the explicit
`--dev` in-process mode (grants from the state dir, identity = the OS account). The same commands against a real
reveal service with tokens are in tests/cli/test_attacks.py and tests/vault/test_service.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloakbeam.cli.main import main
from cloakbeam.keys.service import KeyRef, ensure_local_keyring, open_key_service
from cloakbeam.tests.vault_fixtures import pg_dsn, pg_ref  # noqa: F401
from cloakbeam.vault import Domain, TokenFormat, open_vault
from cloakbeam.vault.audit import AuditLog

ROLES = """
version: 1
roles:
  support:
    - {action: detokenize, domains: [email], purposes: [ticket]}
  dpo:
    - {action: [detokenize, forget], domains: ["*"], purposes: [erasure]}
  auditor:
    - {action: audit, domains: ["*"], purposes: [review]}
"""
AUDIT = ["audit", "verify", "--dev", "--role", "auditor", "--purpose", "review"]


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    s = tmp_path / "state"
    s.mkdir()
    monkeypatch.setenv("CLOAKBEAM_STATE_DIR", str(s))
    ensure_local_keyring(s / "keyring.json")
    (s / "roles.yaml").write_text(ROLES)
    return s


def _vault(state: Path, ref: dict[str, Any] | None = None) -> Any:
    ks = open_key_service(KeyRef(path=str(state / "keyring.json")))  # the pipeline's view: tokenize only
    return open_vault(ref or {"backend": "sqlite", "path": str(state / "vault.sqlite")}, ks)


def _audit(state: Path) -> list[dict[str, Any]]:
    return list(AuditLog(state / "audit.jsonl").entries())


def test_detokenize_single_values(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toks = _vault(state).tokenize(Domain("email", normalize="lower"), ["ann@x.org", "bob@x.org"])
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "--domain", "email", *toks]) == 0
    assert capsys.readouterr().out.split() == ["ann@x.org", "bob@x.org"]
    e = _audit(state)[-1]
    assert (e["event"], e["outcome"], e["count"], e["role"], e["purpose"]) == ("detokenize", "allowed", 2, "support", "ticket")
    # Unknown token: exit 1 and said so, without failing the others.
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "--domain", "email", "tok_nope"]) == 1
    assert "not found" in capsys.readouterr().err
    assert _audit(state)[-1]["outcome"] == "not_found"


def test_unauthorized_detokenize_is_refused_and_audited(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = _vault(state).tokenize(Domain("card_number", TokenFormat("digits", keep_last=4, luhn=True), "digits"), ["4111111111111111"])[0]
    rc = main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "--domain", "card_number", tok])
    captured = capsys.readouterr()
    assert rc == 1
    assert "4111111111111111" not in captured.out + captured.err
    assert "no grant lets roles [support] detokenize 'card_number'" in captured.err
    e = _audit(state)[-1]
    assert (e["outcome"], e["role"], e["domain"], e["subject"]) == ("denied", "support", "card_number", tok)
    # An undefined role is refused the same way.
    assert main(["vault", "detokenize", "--dev", "--role", "intern", "--purpose", "ticket", "--domain", "email", tok]) == 1
    assert _audit(state)[-1]["outcome"] == "denied"
    assert main(AUDIT) == 0


def test_audit_verify_fails_after_delete_or_edit(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = _vault(state).tokenize(Domain("email"), ["c@x.org"])[0]
    for _ in range(3):
        main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "--domain", "email", tok])
    assert main(AUDIT) == 0
    log = state / "audit.jsonl"
    good = log.read_text()
    anchors = {f: f.read_bytes() for f in (state / "audit.jsonl.head", state / "audit.checkpoints.jsonl")}
    lines = good.splitlines(keepends=True)
    log.write_text(lines[0] + lines[2])  # delete entry 2
    capsys.readouterr()
    assert main(AUDIT) == 1
    assert "entry 2" in capsys.readouterr().err
    log.write_text(good.replace('"role":"support"', '"role":"dpo"', 1))  # edit entry 1
    assert main(AUDIT) == 1
    assert "entry 1 was edited" in capsys.readouterr().err
    log.write_text(good)
    assert main(AUDIT) == 1  # the failed verifications were audited too: the old log no longer matches its anchors
    log.write_text(good)
    for f, data in anchors.items():
        f.write_bytes(data)
    assert main(AUDIT) == 0


def test_forget_by_value_and_subject(state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    v = _vault(state)
    t1, t2 = v.tokenize(Domain("email", normalize="lower"), ["dee@x.org", "eve@x.org"], subjects=[None, "cust-9"])
    v.close()
    monkeypatch.setattr("sys.stdin", io.StringIO("DEE@x.org\n"))
    # Not granted to support: refused and audited, nothing forgotten.
    assert main(["vault", "forget", "--dev", "--role", "support", "--purpose", "ticket", "--domain", "email", "--value-stdin"]) == 1
    assert _audit(state)[-1]["outcome"] == "denied"
    monkeypatch.setattr("sys.stdin", io.StringIO("DEE@x.org\n"))
    assert main(["vault", "forget", "--dev", "--role", "dpo", "--purpose", "erasure", "--domain", "email", "--value-stdin"]) == 0
    assert main(["vault", "forget", "--dev", "--role", "dpo", "--purpose", "erasure", "--subject", "cust-9"]) == 0
    entries = _audit(state)
    assert [e["outcome"] for e in entries[-2:]] == ["forgotten", "forgotten"]
    assert entries[-2]["subject"].startswith("bidx:") and entries[-1]["subject"].startswith("subject:")
    text = (state / "audit.jsonl").read_text()
    assert "dee@x.org" not in text.lower() and "cust-9" not in text
    capsys.readouterr()
    assert main(["vault", "detokenize", "--dev", "--role", "dpo", "--purpose", "erasure", "--domain", "email", t1, t2]) == 1
    assert capsys.readouterr().err.count("forgotten") == 2
    assert main(AUDIT) == 0


def test_usage_errors_exit_2(state: Path) -> None:
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket"]) == 2
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "tok"]) == 2  # no domain
    with pytest.raises(SystemExit):  # no --roles option: grants belong to the service
        main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "--domain", "e", "t", "--roles", str(state / "none.yaml")])
    assert main(["vault", "detokenize", "--role", "support", "--purpose", "ticket", "--domain", "e", "t"]) == 2  # --role needs --dev
    assert main(["vault", "detokenize", "--purpose", "ticket", "--domain", "e", "t"]) == 2  # no server
    assert main(["vault", "forget", "--dev", "--role", "dpo", "--purpose", "erasure", "--value", "x"]) == 2  # no domain
    assert main(["vault", "detokenize", "--dev", "--role", "r", "--purpose", "p", "--domain", "e", "t", "--vault-dsn-env", "CB_UNSET_DSN_VAR"]) == 2


def test_detokenize_parquet_column(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mails = ["f@x.org", "g@x.org", None, "f@x.org"]
    toks = _vault(state).tokenize(Domain("email", normalize="lower"), ["f@x.org", "g@x.org"])
    col = [toks[0], toks[1], None, toks[0]]
    meta = {b"cloakbeam.action": json.dumps({"action": "tokenize", "domain": "email"}).encode()}
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("email", pa.string(), metadata=meta)])
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "email": col}, schema=schema), data / "part-a.parquet")
    dest = tmp_path / "revealed"
    # Unauthorized: nothing is written.
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "marketing", "--input", str(data), "--column", "email", "--out", str(dest)]) == 1
    assert not dest.exists()
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "--input", str(data), "--column", "email", "--out", str(dest)]) == 0
    got = pq.read_table(dest / "part-a.parquet")
    assert got.column("email").to_pylist() == mails and got.column("id").to_pylist() == [1, 2, 3, 4]
    assert oct((dest / "part-a.parquet").stat().st_mode & 0o777) == "0o600"
    e = _audit(state)[-1]
    assert e["subject"] == "column:email:part-a.parquet" and e["count"] == 2 and e["outcome"] == "allowed"
    # Never into a non-empty directory (no in-place overwrite).
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "--input", str(data), "--column", "email", "--out", str(dest)]) == 2


def test_detokenize_against_postgres_via_dsn_env(state: Path, pg_ref: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    tok = _vault(state, pg_ref).tokenize(Domain("email"), ["pg@x.org"])[0]
    assert main(["vault", "detokenize", "--dev", "--vault-dsn-env", "CLOAKBEAM_VAULT_DSN", "--role", "support", "--purpose", "ticket", "--domain", "email", tok]) == 0
    assert capsys.readouterr().out.strip() == "pg@x.org"


def test_tokens_from_stdin_and_missing_state(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    toks = _vault(state).tokenize(Domain("email"), ["h@x.org", "i@x.org"])
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(toks) + "\n"))
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "ticket", "--domain", "email", "-"]) == 0
    assert capsys.readouterr().out.split() == ["h@x.org", "i@x.org"]
    assert main([*AUDIT, "--state-dir", str(tmp_path / "nowhere")]) == 2
    (state / "roles.yaml").write_text("roles: {support: [{action: peek, domains: [email], purposes: [x]}]}\n")
    assert main(["vault", "detokenize", "--dev", "--role", "support", "--purpose", "x", "--domain", "email", toks[0]]) == 2
    assert "unknown action 'peek'" in capsys.readouterr().err


def test_forget_expired_cli(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v = _vault(state)
    v.tokenize(Domain("email", normalize="lower", ttl_seconds=1), ["old@x.org"])
    v.backend.conn.execute("UPDATE cloakbeam_vault_entries SET expires_at = 1")  # long expired
    assert main(["vault", "forget", "--dev", "--role", "support", "--purpose", "ticket", "--expired"]) == 1  # no grant
    assert main(["vault", "forget", "--dev", "--role", "dpo", "--purpose", "erasure", "--expired"]) == 0
    assert "forgot 1 vault entry" in capsys.readouterr().out
    e = _audit(state)[-1]
    assert (e["event"], e["subject"], e["count"], e["domain"]) == ("forget", "expired", 1, "*")
    assert main(AUDIT) == 0
