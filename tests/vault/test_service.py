"""The reveal service on a real uvicorn server (loopback), real JWTs from a test issuer whose JWKS is served over
real HTTP: token refusals, grants, limits, audit before answer, anchored audit, and erasure that reaches outputs.
Vault-backed tests run on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cloakbeam.keys.service import KeyRef, dev_reveal_keyring_path, ensure_local_keyring, open_key_service
from cloakbeam.tests.paths import SCHEMA
from cloakbeam.tests.service_fixtures import AUDIENCE, ISSUER, ThreadServer, issuer, write_service_config  # noqa: F401
from cloakbeam.tests.service_fixtures import REVEAL_POLICY as POLICY
from cloakbeam.tests.vault_fixtures import pg_dsn, pg_ref  # noqa: F401
from cloakbeam.vault import Domain, open_vault
from cloakbeam.vault.audit import AuditLog


@pytest.fixture(params=["sqlite", "postgres"])
def vault_ref(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"backend": "sqlite", "path": str(tmp_path / "state" / "vault.sqlite")}
    return request.getfixturevalue("pg_ref")


@pytest.fixture
def world(tmp_path: Path, issuer: Any, vault_ref: dict[str, Any]) -> Any:
    """A pipeline keyring pair in tmp/state, a vault, and the reveal service over them."""
    state = tmp_path / "state"
    state.mkdir()
    ring = state / "keyring.json"
    ensure_local_keyring(ring)
    cfg = write_service_config(tmp_path, str(ring), str(dev_reveal_keyring_path(ring)), vault_ref, issuer)
    srv = ThreadServer(cfg)

    class World:
        pass

    w = World()
    w.tmp, w.state, w.ring, w.vault_ref, w.issuer, w.server, w.url, w.cfg = tmp_path, state, ring, vault_ref, issuer, srv, srv.url, cfg
    w.log = tmp_path / "service" / "state" / "audit.jsonl"
    w.checkpoints = tmp_path / "worm" / "checkpoints.jsonl"
    yield w
    srv.close()


def _pipeline_vault(w: Any) -> Any:
    """The vault as the pipeline opens it: its keyring only (can tokenize, cannot read back)."""
    return open_vault(w.vault_ref, open_key_service(KeyRef(path=str(w.ring))))


def _post(w: Any, path: str, token: str | None, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(w.url + path, headers=headers, timeout=30, **kw)


def _entries(w: Any) -> list[dict[str, Any]]:
    return list(AuditLog(w.log).entries())


def test_refused_tokens_are_401_and_audited(world: Any) -> None:
    import jwt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

    w = world
    tok = _pipeline_vault(w).tokenize(Domain("email", normalize="lower"), ["ann@x.org"])[0]
    body = {"domain": "email", "tokens": [tok], "purpose": "dsar"}
    mallory = Ed25519PrivateKey.generate()
    now = int(time.time())
    unsigned = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "eve", "exp": now + 60, "roles": ["privacy-officer"], "purposes": ["dsar"]}, None, algorithm="none")
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "missing": None,
        "garbage": "not-a-jwt",
        "forged": w.issuer.token(key=mallory),
        "expired": w.issuer.token(exp=now - 120, iat=now - 700),
        "not yet valid": w.issuer.token(nbf=now + 600),
        "wrong audience": w.issuer.token(aud="someone-else"),
        "wrong issuer": w.issuer.token(iss="https://evil.test/"),
        "unsigned": unsigned,
        "unknown kid": w.issuer.token(key=rsa, alg="RS256", kid="other"),
        "no subject": w.issuer.token(sub=None),
    }
    for name, token in cases.items():
        r = _post(w, "/v1/detokenize", token, json=body)
        assert r.status_code == 401, (name, r.text)
        assert "ann@x.org" not in r.text
    entries = _entries(w)
    assert len(entries) == len(cases)
    assert all(e["outcome"] == "denied" and e["actor"] == "-" and e["detail"].startswith("auth:") for e in entries)
    # the same request with a valid token is answered
    r = _post(w, "/v1/detokenize", w.issuer.token(), json=body)
    assert r.status_code == 200 and r.json()["results"] == [{"status": "ok", "value": "ann@x.org"}]
    assert _entries(w)[-1]["actor"] == "alice@corp"


def test_grants_purposes_and_limits(world: Any) -> None:
    w = world
    v = _pipeline_vault(w)
    mails = [f"p{i}@x.org" for i in range(60)]
    toks = v.tokenize(Domain("email", normalize="lower"), mails)
    card = v.tokenize(Domain("card_number"), ["4111111111111111"])[0]
    support = w.issuer.token(sub="sam@corp", roles=["support"], purposes=["ticket"])
    # valid token, no grant for the role
    r = _post(w, "/v1/detokenize", w.issuer.token(sub="nobody@corp", roles=["intern"], purposes=["ticket"]), json={"domain": "email", "tokens": toks[:1]})
    assert r.status_code == 403
    assert _entries(w)[-1]["actor"] == "nobody@corp" and _entries(w)[-1]["outcome"] == "denied"
    # granted domain, purpose taken from the token (only one)
    r = _post(w, "/v1/detokenize", support, json={"domain": "email", "tokens": toks[:2]})
    assert r.status_code == 200 and [x["value"] for x in r.json()["results"]] == mails[:2]
    # a purpose the token does not grant, a domain the grant does not name
    assert _post(w, "/v1/detokenize", support, json={"domain": "email", "tokens": toks[:1], "purpose": "marketing"}).status_code == 403
    assert _post(w, "/v1/detokenize", support, json={"domain": "card_number", "tokens": [card]}).status_code == 403
    # rows per day: 50 for support; 2 used
    assert _post(w, "/v1/detokenize", support, json={"domain": "email", "tokens": toks[2:50]}).status_code == 200
    r = _post(w, "/v1/detokenize", support, json={"domain": "email", "tokens": toks[50:52]})
    assert r.status_code == 429 and "50 rows per day" in r.json()["error"]
    # requests per minute: 3 for 'limited'
    limited = w.issuer.token(sub="lim@corp", roles=["limited"], purposes=["ticket"])
    codes = [_post(w, "/v1/detokenize", limited, json={"domain": "email", "tokens": toks[:1]}).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    # an expired grant
    r = _post(w, "/v1/detokenize", w.issuer.token(sub="old@corp", roles=["lapsed"], purposes=["ticket"]), json={"domain": "email", "tokens": toks[:1]})
    assert r.status_code == 403 and "expired" in r.json()["error"]
    # every request was audited with its verified subject, no value in the log
    entries = _entries(w)
    assert {e["actor"] for e in entries} == {"nobody@corp", "sam@corp", "lim@corp", "old@corp"}
    text = w.log.read_text()
    assert not any(m in text for m in mails)


def test_daily_limit_survives_a_restart(world: Any) -> None:
    w = world
    toks = _pipeline_vault(w).tokenize(Domain("email", normalize="lower"), [f"r{i}@x.org" for i in range(50)])
    support = w.issuer.token(sub="sam@corp", roles=["support"], purposes=["ticket"])
    assert _post(w, "/v1/detokenize", support, json={"domain": "email", "tokens": toks[:45]}).status_code == 200
    w.server.close()
    w.server = srv = ThreadServer(w.cfg)
    w.url = srv.url
    r = _post(w, "/v1/detokenize", support, json={"domain": "email", "tokens": toks[45:50] + toks[:1]})
    assert r.status_code == 429


def test_failed_audit_write_fails_the_request(world: Any) -> None:
    w = world
    tok = _pipeline_vault(w).tokenize(Domain("email", normalize="lower"), ["zed@x.org"])[0]
    os.chmod(w.checkpoints.parent, 0o500)  # the checkpoint sink refuses writes
    try:
        if os.geteuid() == 0:  # root ignores permission bits: make the sink a directory instead
            os.chmod(w.checkpoints.parent, 0o700)
            w.checkpoints.unlink(missing_ok=True)
            w.checkpoints.mkdir()
        r = _post(w, "/v1/detokenize", w.issuer.token(), json={"domain": "email", "tokens": [tok]})
        assert r.status_code == 503 and "zed@x.org" not in r.text
    finally:
        os.chmod(w.checkpoints.parent, 0o700)


def test_audit_verify_detects_deleted_rewritten_or_truncated_log_and_checkpoints(world: Any) -> None:
    w = world
    tok = _pipeline_vault(w).tokenize(Domain("email", normalize="lower"), ["q@x.org"])[0]
    for _ in range(4):
        assert _post(w, "/v1/detokenize", w.issuer.token(), json={"domain": "email", "tokens": [tok]}).status_code == 200
    auditor = w.issuer.token(sub="aud@corp", roles=["auditor"], purposes=["review"])

    def verify() -> dict[str, Any]:
        r = httpx.get(w.url + "/v1/audit/verify", headers={"authorization": f"Bearer {auditor}"}, timeout=30)
        assert r.status_code == 200
        return r.json()

    assert verify()["ok"] is True
    log_bytes, head = w.log.read_bytes(), w.log.with_name("audit.jsonl.head")
    head_bytes, cp_bytes = head.read_bytes(), w.checkpoints.read_bytes()

    def restore() -> None:
        w.log.write_bytes(log_bytes)
        head.write_bytes(head_bytes)
        w.checkpoints.write_bytes(cp_bytes)

    # 1. delete the log and its head file
    w.log.unlink()
    head.unlink()
    res = verify()
    assert res["ok"] is False and "truncated or deleted" in res["problem"]
    restore()
    # 2. rewrite the whole chain consistently under a key of the attacker's choosing (they lack the service's)
    forged = AuditLog(w.tmp / "forged.jsonl", b"k" * 32)
    for _ in range(5):
        forged.append("detokenize", role="support", purpose="ticket", domain="email", outcome="allowed", actor="alice@corp")
    w.log.write_bytes(forged.path.read_bytes())
    head.write_bytes(forged.head_path.read_bytes())
    res = verify()
    assert res["ok"] is False and "edited" in res["problem"]
    restore()
    # 3. drop the last entries of the log and make the head agree
    lines = log_bytes.splitlines(keepends=True)
    w.log.write_bytes(b"".join(lines[:2]))
    last = json.loads(lines[1])
    head.write_text(json.dumps({"seq": last["seq"], "mac": last["mac"]}))
    res = verify()
    assert res["ok"] is False and "truncated" in res["problem"]
    restore()
    # 4. truncate or delete the checkpoints
    w.checkpoints.write_bytes(b"".join(cp_bytes.splitlines(keepends=True)[:2]))
    assert verify()["ok"] is False
    w.checkpoints.unlink()
    assert "missing" in verify()["problem"]
    restore()
    # 5. a checkpoint edited to match an edited log
    cps = [json.loads(x) for x in cp_bytes.splitlines()]
    cps[-1]["head"] = "0" * 64
    w.checkpoints.write_text("".join(json.dumps(c) + "\n" for c in cps))
    assert "not signed by the checkpoint key" in verify()["problem"]
    restore()
    assert verify()["ok"] is True
    # the operator's command on the service host agrees
    from cloakbeam.cli.main import main

    assert main(["audit", "verify", "--service-config", str(w.cfg)]) == 0
    w.log.unlink()
    assert main(["audit", "verify", "--service-config", str(w.cfg)]) == 1


def _run(w: Any, rows: int = 120) -> tuple[Path, dict[str, str]]:
    """A pipeline run with the world's keyring and vault; returns (output dir, customer_id -> ssn)."""
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.schemas.generate import generate

    src = generate(w.tmp / "in" / "customers.jsonl", rows, seed=5, fmt="jsonl", dirty=0.0)
    pol = w.tmp / "policy.yaml"
    pol.write_text(yaml.safe_dump(POLICY))
    conf = w.tmp / "pipeline.yaml"
    conf.write_text(yaml.safe_dump({"state_dir": str(w.state), "keys": {"provider": "local", "path": str(w.ring)}, "vault": w.vault_ref}))
    out = w.tmp / "out"
    run_pipeline(RunSettings(inputs=[src["path"]], schema=str(SCHEMA), policy=str(pol), output=str(out), config=str(conf), batch_size=50, progress=False))
    truth = {}
    for line in Path(src["path"]).read_text().splitlines():
        rec = json.loads(line)
        truth[rec["customer_id"]] = rec["ssn"]
    return out, truth


def test_decrypt_through_service_then_forget_reaches_existing_outputs(world: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cloakbeam.keys.sealing import open_reveal_keys
    from cloakbeam.vault.client import RevealClient
    from cloakbeam.vault.reveal import manifest_records

    w = world
    out, truth = _run(w)
    files = sorted((out / "data").glob("*.parquet"))
    client = RevealClient(w.url, w.issuer.token(sub="dpo@corp", purposes=["dsar"]))
    records = manifest_records(str(out))
    before = pa.concat_tables([client.decrypt_file(str(f), "dsar", None, records)[0] for f in files])
    # customer_id is a token: detokenize it to line rows up with the source
    cids = client.detokenize("customer_id", before.column("customer_id").to_pylist(), "dsar")
    assert [truth[c] for _, c in cids] == before.column("ssn").to_pylist()
    assert before.schema.field("income").type == pa.float64()  # the run-DEK column decrypts too
    # forget one customer: their ssn is unreadable in the EXISTING output, everybody else's is intact
    victim_row = 7
    victim = cids[victim_row][1]
    assert client.forget("dsar", subject=victim) >= 3  # customer_id + email entries, the ssn column key
    after_parts, gone = [], 0
    for f in files:
        t, unreadable = client.decrypt_file(str(f), "dsar", ["ssn"], records)
        after_parts.append(t)
        gone += unreadable.get("ssn", 0)
    after = pa.concat_tables(after_parts)
    assert gone == 1 and after.column("ssn")[victim_row].as_py() is None
    assert after.column("ssn").null_count == 1
    assert client.detokenize("customer_id", [before.column("customer_id")[victim_row].as_py()], "dsar") == [("forgotten", None)]
    # Attack: a holder of the pipeline keyring AND the reveal keyring recomputes the forgotten customer's token,
    # finds the row and tries to decrypt the cell: its key is gone from the vault.
    from cloakbeam.vault.tokens import Tokenizer

    ks = open_key_service(KeyRef(path=str(w.ring)))
    recomputed = Tokenizer(ks.prf_key("tokenize/customer_id"), Domain("customer_id").fmt).token_at(victim, 0)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    row = table.column("customer_id").to_pylist().index(recomputed.replace("tok_", "cust_"))
    ks.attach_reveal(open_reveal_keys(KeyRef(path=str(dev_reveal_keyring_path(w.ring)))))
    vault = open_vault(w.vault_ref, ks)
    cell = table.column("ssn")[row].as_py()
    assert vault.column_keys([cell[1:9]]) == {}
    client.close()


def test_grant_covers_every_column_and_quarantine_is_its_own_domain(world: Any) -> None:
    from cloakbeam.errors import AccessDenied
    from cloakbeam.vault.client import RevealClient
    from cloakbeam.vault.reveal import manifest_records

    w = world
    out, _ = _run(w, rows=60)
    f = sorted((out / "data").glob("*.parquet"))[0]
    steward = RevealClient(w.url, w.issuer.token(sub="st@corp", roles=["steward"], purposes=["data-quality"]))
    with pytest.raises(AccessDenied):
        steward.decrypt_file(str(f), None, None, manifest_records(str(out)))
    e = _entries(w)[-1]
    assert (e["event"], e["outcome"], e["actor"], e["domain"]) == ("decrypt", "denied", "st@corp", "income,ssn")
    steward.close()


def test_salted_tokens_erase_linkage_and_subject_fields_are_checked_at_compile(world: Any, customers_schema: Any) -> None:
    import pyarrow as pa

    from cloakbeam.core.config import RuntimeConfig
    from cloakbeam.errors import PolicyError
    from cloakbeam.transforms.policy import compile_policy
    from cloakbeam.transforms.protect import protect_batch
    from cloakbeam.transforms.registry import ActionContext
    from cloakbeam.vault.client import RevealClient
    from cloakbeam.vault.tokens import Tokenizer

    w = world
    fields = {"email": {"action": "tokenize", "normalize": "lower", "subject": "customer_id", "salt": "subject"}, "gender": "keep"}
    pol = compile_policy({"version": 1, "dataset": "customers", "fields": fields}, customers_schema)
    batch = pa.RecordBatch.from_pylist(
        [{"customer_id": "C1", "email": "Shared@x.org", "gender": "f"}, {"customer_id": "C2", "email": "shared@x.org", "gender": "m"},
         {"customer_id": "C1", "email": "shared@x.org ", "gender": "f"}, {"customer_id": None, "email": "lone@x.org", "gender": "f"}]
    )
    ctx = ActionContext(RuntimeConfig(run_id="r", dataset_id="customers", state_dir=str(w.state), keys=KeyRef(path=str(w.ring)), vault=w.vault_ref))
    from cloakbeam.transforms.protect import protect_batch_with_rejects

    out, rejected = protect_batch_with_rejects(batch, pol, ctx)
    assert [r[1] for r in rejected] == ["missing_subject"]  # no subject: never an unsalted token
    toks = out.column(out.schema.get_field_index("email")).to_pylist()
    assert toks[0] == toks[2] != toks[1]  # same subject: same token; another subject: another token
    client = RevealClient(w.url, w.issuer.token(purposes=["dsar"]))
    assert [v for _, v in client.detokenize("email", toks[:2], "dsar")] == ["shared@x.org", "shared@x.org"]
    assert client.forget("dsar", subject="C1") >= 2  # entry + salt
    # the unsalted token of the guessed value matches nothing, and the salt that made C1's token is gone
    ks = open_key_service(KeyRef(path=str(w.ring)))
    assert Tokenizer(ks.prf_key("tokenize/email"), Domain("email").fmt).token_at("shared@x.org", 0) not in toks
    again = protect_batch(batch.slice(0, 1), pol, ActionContext(ctx.runtime))
    assert again.column(0).to_pylist()[0] != toks[0]  # C1 seen again: a new salt, a new token
    assert client.detokenize("email", [toks[0]], "dsar") == [("forgotten", None)]
    client.close()
    bad = [
        ({"ssn": {"action": "encrypt", "subject": "nope"}}, "subject field 'nope' is not a leaf field"),
        ({"ssn": {"action": "encrypt", "subject": "customer_id", "deterministic": True}}, "cannot be deterministic"),
        ({"email": {"action": "tokenize", "salt": "subject"}}, "needs 'subject"),
        ({"email": {"action": "tokenize", "subject": "customer_id", "salt": "subject", "format": "digits"}}, "format: opaque"),
        ({"email": {"action": "tokenize", "subject": "address"}}, "not a leaf field"),
    ]
    for spec, msg in bad:
        with pytest.raises(PolicyError, match=msg):
            compile_policy({"version": 1, "dataset": "customers", "fields": {"gender": "keep", **spec}}, customers_schema)


@pytest.mark.postgres
def test_checkpoints_in_a_postgres_table(tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloakbeam.errors import IntegrityError
    from cloakbeam.keys.sealing import init_reveal_keyring
    from cloakbeam.vault.audit import AnchoredAudit, PostgresCheckpointSink

    monkeypatch.setenv("CB_CKPT_DSN", pg_dsn)
    from cloakbeam.keys.sealing import open_reveal_keys

    reveal = open_reveal_keys(init_reveal_keyring(tmp_path / "r.json", protection="dev"))
    sink = PostgresCheckpointSink("CB_CKPT_DSN")
    audit = AnchoredAudit(AuditLog(tmp_path / "audit.jsonl", reveal.audit_key()), sink, reveal.checkpoint_key(), reveal.checkpoint_public_key(), "L1")
    for i in range(3):
        audit.append("detokenize", role="r", purpose="p", domain="email", outcome="allowed", actor=f"u{i}")
    assert audit.verify() == {"entries": 3, "checkpoints": 3, "checkpointed": 3}
    sink._connect().execute("DELETE FROM cloakbeam_audit_checkpoints WHERE seq = 2")  # a checkpoint in the middle
    with pytest.raises(IntegrityError, match="no longer holds"):
        audit.verify()
    sink._connect().execute("DELETE FROM cloakbeam_audit_checkpoints")
    with pytest.raises(IntegrityError, match="missing or empty"):
        audit.verify()
    sink.close()
