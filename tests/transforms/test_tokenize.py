"""The `tokenize` action: policy validation, column semantics, and the reference pipeline end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloakbeam.core.config import RuntimeConfig
from cloakbeam.errors import PolicyError
from cloakbeam.keys.service import KeyRef, ensure_local_keyring
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.transforms.policy import compile_policy
from cloakbeam.transforms.protect import protect_batch
from cloakbeam.transforms.registry import ActionContext
from cloakbeam.vault.tokens import luhn_valid

SCHEMA = {
    "type": "record",
    "name": "T",
    "fields": [
        {"name": "cid", "type": "string"},
        {"name": "email", "type": ["null", "string"], "default": None},
        {"name": "card", "type": ["null", "string"], "default": None},
        {"name": "n", "type": ["null", "long"], "default": None},
        {"name": "score", "type": ["null", "double"], "default": None},
    ],
}


@pytest.fixture
def schema() -> Any:
    return schema_from_dict(SCHEMA)


@pytest.fixture
def runtime(tmp_path: Path) -> RuntimeConfig:
    ring = tmp_path / "ring.json"
    ensure_local_keyring(ring)
    return RuntimeConfig(run_id="r", dataset_id="t", state_dir=str(tmp_path), keys=KeyRef("local", str(ring)),
                         vault={"backend": "sqlite", "path": str(tmp_path / "vault.sqlite")})


def _policy(schema: Any, **fields: Any) -> Any:
    return compile_policy({"fields": fields}, schema)


def _batch(schema: Any, rows: list[dict[str, Any]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=pa.schema([f.with_nullable(True) for f in schema.arrow]))


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ({"action": "tokenize", "format": "short"}, "must be one of"),
        ({"action": "tokenize", "keep_last": 4}, "applies to 'format: digits' only"),
        ({"action": "tokenize", "luhn": True}, "applies to 'format: digits' only"),
        ({"action": "tokenize", "format": "digits", "prefix": "x_"}, "applies to 'format: opaque' only"),
        ({"action": "tokenize", "format": "digits", "normalize": "lower"}, "digits only"),
        ({"action": "tokenize", "format": "digits", "keep_last": 9}, "between 0 and 8"),
        ({"action": "tokenize", "format": "digits", "keep_last": True}, "number"),
        ({"action": "tokenize", "prefix": "has space"}, "at most 16"),
        ({"action": "tokenize", "domain": "a/b"}, "letters, digits"),
        ({"action": "tokenize", "ttl_days": 0}, "positive"),
        ({"action": "tokenize", "normalize": "upper"}, "must be one of"),
        ({"action": "tokenize", "colour": "red"}, "unknown parameter 'colour'"),
    ],
)
def test_bad_parameters_fail_at_compile(schema: Any, spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PolicyError, match=fragment) as exc:
        _policy(schema, email=spec)
    assert "email" in str(exc.value)


def test_float_column_refused(schema: Any) -> None:
    with pytest.raises(PolicyError, match="cannot be applied"):
        _policy(schema, score="tokenize")


def test_tokens_are_convergent_and_nulls_stay_null(schema: Any, runtime: RuntimeConfig) -> None:
    pol = _policy(schema, cid={"action": "tokenize", "prefix": "c_"}, email={"action": "tokenize", "normalize": "lower"},
                  card={"action": "tokenize", "format": "digits", "keep_last": 4, "luhn": True}, n="tokenize")
    rows = [
        {"cid": "c1", "email": "A@x.org", "card": "4111 1111 1111 1111", "n": 7},
        {"cid": "c2", "email": None, "card": None, "n": None},
        {"cid": "c1", "email": " a@x.org", "card": "4111-1111-1111-1111", "n": 7},
    ]
    ctx = ActionContext(runtime)
    out = protect_batch(_batch(schema, rows), pol, ctx).to_pylist()
    assert out[0] == out[2]
    assert out[1]["email"] is None and out[1]["card"] is None and out[1]["n"] is None
    assert out[0]["cid"].startswith("c_") and out[0]["cid"] != out[1]["cid"]
    card = out[0]["card"]
    assert len(card) == 16 and card.endswith("1111") and luhn_valid(card) and card != "4111111111111111"
    assert out[0]["n"].startswith("tok_")
    assert ctx.stats["tokenize.email.values"] == 2 and ctx.stats["tokenize.email.distinct"] == 1
    assert ctx.vault.count() == 2 + 1 + 1 + 1
    # A second worker (fresh context, empty cache) and a replay of the same batch: same tokens, no new rows.
    ctx2 = ActionContext(runtime)
    assert protect_batch(_batch(schema, rows), pol, ctx2).to_pylist() == out
    assert ctx2.vault.count() == 5
    assert _service_vault(runtime).reveal("email", [out[0]["email"]]) == [("ok", "a@x.org")]
    assert pol.output_schema().field("card").type == pa.string()
    meta = json.loads(pol.output_schema().field("card").metadata[b"cloakbeam.action"])
    assert meta["domain"] == "card" and meta["keep_last"] == 4


def _service_vault(runtime: RuntimeConfig) -> Any:
    from cloakbeam.tests.vault_fixtures import service_keys
    from cloakbeam.vault import open_vault

    return open_vault(runtime.vault, service_keys(runtime.keys))


def test_shared_domain_joins(schema: Any, runtime: RuntimeConfig) -> None:
    pol = _policy(schema, cid={"action": "tokenize", "domain": "customer"}, email={"action": "tokenize", "domain": "customer"})
    out = protect_batch(_batch(schema, [{"cid": "same", "email": "same"}]), pol, ActionContext(runtime)).to_pylist()[0]
    assert out["cid"] == out["email"]


def test_too_short_for_digits_rejects_only_that_row(schema: Any, runtime: RuntimeConfig) -> None:
    from cloakbeam.transforms.protect import protect_batch_with_rejects

    pol = _policy(schema, cid={"action": "tokenize", "subject": "cid"}, card={"action": "tokenize", "format": "digits", "keep_last": 4, "luhn": True})
    rows = [{"cid": "a", "card": "4111111111111111"}, {"cid": "b", "card": "12-34"}, {"cid": "c", "card": "12-34"}]
    ctx = ActionContext(runtime)
    out, rejected = protect_batch_with_rejects(_batch(schema, rows), pol, ctx)
    assert rejected == [(1, "invalid_value", "card"), (2, "invalid_value", "card")]
    assert out.num_rows == 1 and out.to_pylist()[0]["card"].endswith("1111")
    assert ctx.stats["tokenize.card.invalid"] == 2
    # The rejected rows' subjects got no entry for the bad value; the good row's subject did.
    assert ctx.vault.count() == 4


def test_subject_links_entries_for_erasure(schema: Any, runtime: RuntimeConfig) -> None:
    pol = _policy(schema, cid={"action": "tokenize", "subject": "cid"}, email={"action": "tokenize", "subject": "cid"})
    rows = [{"cid": "c1", "email": "p@x.org"}, {"cid": "c2", "email": "q@x.org"}]
    ctx = ActionContext(runtime)
    out = protect_batch(_batch(schema, rows), pol, ctx).to_pylist()
    assert ctx.vault.forget_subject("c1") == 2
    vault = _service_vault(runtime)  # reading back is the reveal service's (reveal keyring attached)
    assert vault.reveal("email", [r["email"] for r in out]) == [("forgotten", None), ("ok", "q@x.org")]
    assert vault.reveal("cid", [r["cid"] for r in out]) == [("forgotten", None), ("ok", "c2")]


def test_missing_subject_field_fails(schema: Any, runtime: RuntimeConfig) -> None:
    from cloakbeam.errors import PolicyError

    with pytest.raises(PolicyError, match="subject field 'nope' is not a leaf field"):  # at compile time, before any data
        _policy(schema, email={"action": "tokenize", "subject": "nope"})


@pytest.mark.slow
def test_reference_pipeline_tokenizes_and_detokenizes(tmp_path: Path, reference_inputs: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from cloakbeam.cli.main import main
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.tests.conftest import POLICY
    from cloakbeam.tests.conftest import SCHEMA as REF_SCHEMA

    state = tmp_path / "state"
    src = reference_inputs["parquet"]["path"]
    manifest = run_pipeline(RunSettings(dev=True, inputs=[src], schema=str(REF_SCHEMA), policy=str(POLICY), output=str(tmp_path / "out"),
                                        batch_size=700, progress=False, state_dir=str(state)))
    assert manifest["reconciled"] is True
    out = pq.read_table(tmp_path / "out" / "data")
    raw = pq.read_table(src)
    toks = out.column("card_number").to_pylist()
    assert all(t is None or (luhn_valid(t) and len(t) == 16) for t in toks)
    emails = out.column("email").to_pylist()
    assert all(e.startswith("tok_") for e in emails if e)
    assert not set(raw.column("email").to_pylist()) & set(emails)
    # A second run over the same input adds no vault rows and gives identical tokens.
    from cloakbeam.core.config import key_ref_from
    from cloakbeam.keys.service import open_key_service
    from cloakbeam.vault import open_vault

    vault = open_vault({"backend": "sqlite", "path": str(state / "vault.sqlite")}, open_key_service(key_ref_from({}, state)))
    rows_before = vault.count()
    run_pipeline(RunSettings(dev=True, inputs=[src], schema=str(REF_SCHEMA), policy=str(POLICY), output=str(tmp_path / "out2"),
                             batch_size=1000, progress=False, state_dir=str(state)))
    assert vault.count() == rows_before
    again = pq.read_table(tmp_path / "out2" / "data")
    assert sorted(filter(None, again.column("email").to_pylist())) == sorted(filter(None, emails))
    # Authorized column detokenization gives back the (normalized) originals.
    (state / "roles.yaml").write_text("roles:\n  ds:\n    - {action: detokenize, domains: [email], purposes: [qa]}\n")
    rc = main(["vault", "detokenize", "--dev", "--state-dir", str(state), "--role", "ds", "--purpose", "qa",
               "--input", str(tmp_path / "out" / "data"), "--column", "email", "--out", str(tmp_path / "rev")])
    assert rc == 0
    revealed = set(filter(None, pq.read_table(tmp_path / "rev").column("email").to_pylist()))
    assert revealed and revealed <= {e.strip().lower() for e in raw.column("email").to_pylist() if e}


@pytest.mark.parametrize(
    "vault_cfg,env,fragment",
    [
        ("{backend: mysql}", None, "unknown vault backend 'mysql'"),
        ("{backend: postgres, dsn_env: CB_TEST_BAD_DSN}", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2", "environment variable CB_TEST_BAD_DSN"),
    ],
)
def test_unreachable_vault_fails_at_construction(tmp_path: Path, reference_inputs: Any, monkeypatch: pytest.MonkeyPatch,
                                                 vault_cfg: str, env: str | None, fragment: str) -> None:
    from cloakbeam.errors import ConfigError
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.tests.conftest import POLICY
    from cloakbeam.tests.conftest import SCHEMA as REF_SCHEMA

    if env:
        monkeypatch.setenv("CB_TEST_BAD_DSN", env)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nvault: {vault_cfg}\n")
    with pytest.raises(ConfigError, match=fragment) as exc:
        run_pipeline(RunSettings(dev=True, inputs=[reference_inputs["parquet"]["path"]], schema=str(REF_SCHEMA), policy=str(POLICY),
                                 output=str(tmp_path / "out"), progress=False, config=str(cfg)))
    assert "nobody" not in str(exc.value)
    assert not (tmp_path / "out" / "data").exists() or not any((tmp_path / "out" / "data").iterdir())


@pytest.mark.slow
def test_multi_process_pipeline_writes_one_row_per_value(tmp_path: Path, reference_inputs: Any) -> None:
    """Two SDK worker processes (direct runner, multi_processing) tokenizing the same customers twice into one
    SQLite vault leave exactly the rows, with exactly the tokens, of a single-process run with the same keyring."""
    import shutil
    import sqlite3

    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.tests.conftest import POLICY
    from cloakbeam.tests.conftest import SCHEMA as REF_SCHEMA

    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    ensure_local_keyring(multi / "keyring.json")
    shutil.copy(multi / "keyring.json", single / "keyring.json")
    inputs = [reference_inputs["jsonl"]["path"], reference_inputs["parquet"]["path"]]  # same customers twice
    for state, opts, batch in ((multi, {"workers": 2}, 500), (single, {}, 4000)):
        m = run_pipeline(RunSettings(dev=True, inputs=inputs, schema=str(REF_SCHEMA), policy=str(POLICY), output=str(state / "out"),
                                     batch_size=batch, progress=False, state_dir=str(state), runner_options=opts))
        assert m["reconciled"] is True

    def rows(state: Path) -> dict[str, set[str]]:
        con = sqlite3.connect(state / "vault.sqlite")
        out: dict[str, set[str]] = {}
        for domain, token in con.execute("SELECT domain, token FROM cloakbeam_vault_entries"):
            out.setdefault(domain, set()).add(token)
        n = con.execute("SELECT count(*) FROM cloakbeam_vault_entries").fetchone()[0]
        assert n == sum(len(v) for v in out.values())
        return out

    got, want = rows(multi), rows(single)
    assert set(got) == {"customer_id", "email", "card_number"}
    assert got == want
    out = pq.read_table(multi / "out" / "data")
    for col in ("customer_id", "email", "card_number"):
        assert set(filter(None, out.column(col).to_pylist())) <= got[col]
