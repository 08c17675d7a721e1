"""Parquet modular encryption section: compile checks, authorized reader reads, unauthorized cannot."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloakbeam.core.config import RuntimeConfig
from cloakbeam.errors import PolicyError
from cloakbeam.keys import service as svc
from cloakbeam.keys.parquet_encryption import reader_kwargs
from cloakbeam.tests.keys_fixtures import all_key_bytes, dev_keyring
from cloakbeam.transforms.policy import compile_policy
from cloakbeam.transforms.registry import ActionContext


def _policy(schema, section):
    raw = {"version": 1, "dataset": "customers", "fields": {"gender": "keep", "income": "keep", "diagnosis": "keep", "churned": "keep"}}
    if section is not None:
        raw["parquet_encryption"] = section
    return compile_policy(raw, schema)


@pytest.mark.parametrize(
    "section,msg",
    [
        ({"columns": {"default": ["ssn"]}}, "column 'ssn' is dropped by the policy"),
        ({"columns": {"default": ["nope"]}}, "'nope' is not in the schema"),
        ({"columns": {"default": ["income"], "other": ["income"]}}, "listed under both"),
        ({"columns": {}}, "must map a KEK name"),
        ({"columns": {"default": ["income"]}, "plaintext_footer": "yes"}, "true or false"),
        ({"columns": {"default": ["income"]}, "wrapping": "double"}, "unknown key 'wrapping'"),
        ("yes", "must be a mapping"),
    ],
)
def test_bad_sections_fail_at_compile(customers_schema, section, msg):
    with pytest.raises(PolicyError, match=msg):
        _policy(customers_schema, section)


def test_absent_section_compiles_to_nothing(customers_schema):
    assert "parquet_encryption" not in _policy(customers_schema, None).sections


def _write(tmp_path, customers_schema, ref, plaintext_footer=True):
    pol = _policy(customers_schema, {"columns": {"pme": ["diagnosis"], "default": ["income"]}, "plaintext_footer": plaintext_footer})
    section = pol.sections["parquet_encryption"]
    assert pickle.loads(pickle.dumps(section)).columns == section.columns  # picklable: names only
    ks = svc.open_key_service(ref)
    ks.rotate("pme")
    ctx = ActionContext(RuntimeConfig(run_id="r", dataset_id="customers", state_dir=str(tmp_path), keys=ref))
    table = pa.table({"gender": ["F", "M"], "income": [1.5, None], "diagnosis": ["flu", "asthma"], "churned": [True, False]})
    path = tmp_path / "f.parquet"
    kwargs = section.writer_kwargs(ctx)
    with pq.ParquetWriter(path, table.schema, **kwargs) as w:
        w.write_table(table)
    assert "encryption_properties" in kwargs
    return path, table, ctx, section


def test_authorized_reader_reads_unauthorized_cannot(tmp_path, customers_schema):
    ref = dev_keyring(tmp_path)
    path, table, ctx, section = _write(tmp_path, customers_schema, ref)
    data = path.read_bytes()
    assert b"asthma" not in data
    svc._PROCESS.clear()
    got = pq.read_table(path, **reader_kwargs(svc.open_key_service(ref)))
    assert got.equals(table)
    # No keys: the plaintext footer shows the schema and row count (what `cloakbeam verify` needs), no values.
    assert pq.read_metadata(path).num_rows == 2
    assert pq.read_schema(path).names == table.schema.names
    with pytest.raises(Exception):
        pq.read_table(path, columns=["diagnosis"])
    # Another keyring (KMS access to different KEKs) cannot unwrap the column keys.
    other = dev_keyring(tmp_path / "other")
    svc.open_key_service(other).rotate("pme")
    with pytest.raises(Exception):
        pq.read_table(path, **reader_kwargs(svc.open_key_service(other)))
    # KEK bytes never appear in the file (the data keys are wrapped by our provider).
    for secret in all_key_bytes(ctx.keys):
        assert secret not in data


def test_encrypted_footer(tmp_path, customers_schema):
    ref = dev_keyring(tmp_path)
    path, table, _, _ = _write(tmp_path, customers_schema, ref, plaintext_footer=False)
    with pytest.raises(Exception):
        pq.read_metadata(path)
    assert pq.read_table(path, **reader_kwargs(svc.open_key_service(ref))).equals(table)


def test_report(customers_schema):
    pol = _policy(customers_schema, {"columns": {"default": ["income"]}})
    rep = pol.sections["parquet_encryption"].report(None)
    assert rep["data_key_bits"] == 256 and rep["double_wrapping"] is False and rep["columns"] == {"default": ["income"]}


def test_pipeline_with_parquet_encryption_and_cell_encryption(tmp_path, monkeypatch):
    import yaml

    from cloakbeam.cli.main import main
    from cloakbeam.keys.signing import verify_output
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline
    from cloakbeam.schemas.generate import generate
    from cloakbeam.tests.conftest import SCHEMA

    state = tmp_path / "state"
    monkeypatch.setenv("CLOAKBEAM_STATE_DIR", str(state))
    raw = {"version": 1, "dataset": "customers", "fields": {"ssn": "encrypt", "gender": "keep", "income": "keep", "diagnosis": "keep", "churned": "keep"}}
    raw["parquet_encryption"] = {"columns": {"default": ["diagnosis", "income"]}}
    raw["uniqueness"] = {"max_unique_fraction": 1}  # 120 records single people out; this test is about encryption
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(raw))
    src = generate(tmp_path / "in.jsonl", 120, seed=5, fmt="jsonl")
    out = tmp_path / "out"
    run_pipeline(RunSettings(dev=True, inputs=[src["path"]], schema=str(SCHEMA), policy=str(policy), output=str(out), progress=False))
    files = sorted((out / "data").rglob("*.parquet"))
    with pytest.raises(OSError):
        pq.read_table(files[0])
    ref = svc.KeyRef(path=str(state / "keyring.json"))
    t = pq.read_table(files[0], **reader_kwargs(svc.open_key_service(ref)))
    assert t.schema.field("diagnosis").type == pa.string()
    assert verify_output(out) == []
    (state / "roles.yaml").write_text("version: 1\nroles:\n  dpo: [{action: decrypt, domains: [ssn], purposes: [dsar]}]\n")
    pub = __import__("json").loads((state / "keyring.json").read_text())["signing_public_key"]
    assert main(["decrypt", str(out), "--out", str(tmp_path / "plain"), "--dev", "--role", "dpo", "--purpose", "dsar", "--public-key", pub]) == 0
    plain = pq.read_table(sorted((tmp_path / "plain").rglob("*.parquet"))[0])
    assert plain.schema.field("ssn").type == pa.string() and plain.num_rows > 0
