"""Whole pipelines on the local runner: protection with assert_that, reconciliation, manifest contents."""

from __future__ import annotations

import json
import os

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from cloakbeam.core.config import RuntimeConfig
from cloakbeam.core.stats import FileStat, RunStats
from cloakbeam.errors import ReconciliationError
from cloakbeam.keys.service import KeyRef
from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.pipeline.manifest import build_manifest, check_reconciled
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.tests.paths import NESTED, POLICY, SCHEMA
from cloakbeam.transforms.policy import compile_policy
from cloakbeam.transforms.steps import ProtectRecords


def _runtime(tmp_path) -> RuntimeConfig:
    from cloakbeam.keys.service import ensure_local_keyring

    ring = tmp_path / "ring.json"
    ensure_local_keyring(ring)
    return RuntimeConfig(run_id="r", dataset_id="t", state_dir=str(tmp_path), keys=KeyRef("local", str(ring)))


def test_protect_records_keeps_only_policy_fields_and_nested_structure(tmp_path):
    schema = schema_from_dict(NESTED)
    policy = compile_policy({"fields": {"id": "keep", "contact.city": "keep"}}, schema)
    batch = pa.RecordBatch.from_pylist(
        [{"id": "a", "age": 3, "contact": {"email": "a@x", "city": "Oslo"}, "visited": None},
         {"id": "b", "age": None, "contact": None, "visited": None}],
        schema=pa.schema([f.with_nullable(True) for f in schema.arrow]),
    )
    with TestPipeline(runner="FnApiRunner") as p:
        out = (
            p
            | beam.Create([batch])
            | ProtectRecords(policy, _runtime(tmp_path))
            | beam.Filter(lambda e: isinstance(e, pa.RecordBatch))
            | beam.FlatMap(lambda b: b.to_pylist())
        )
        assert_that(out, equal_to([{"id": "a", "contact": {"city": "Oslo"}}, {"id": "b", "contact": None}]))


def test_reference_run_reconciles_and_denies_unmentioned(tmp_path, reference_inputs):
    import duckdb

    inputs = [reference_inputs[f]["path"] for f in ("jsonl", "csv", "avro", "parquet")]
    manifest = run_pipeline(RunSettings(dev=True, inputs=inputs, schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "out"), batch_size=1000, progress=False))
    c = manifest["counts"]
    assert c["input"] == 12_000
    assert c["input"] == c["written"] + c["quarantined"] + c["suppressed"]
    assert c["quarantined"] > 0 and manifest["reconciled"] is True
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["counts"] == c
    assert "internal_ref" in on_disk["dropped_by_default_deny"]
    assert on_disk["fields"]["internal_ref"]["action"]["action"] == "drop"
    assert {i["path"] for i in on_disk["inputs"]} == set(inputs)
    assert all(len(i["sha256"]) == 64 for i in on_disk["inputs"])
    assert on_disk["versions"]["apache_beam"].startswith("2.77")
    # The reference policy declares splits: OUT/data/split=<name>/*.parquet (Hive-style partitions).
    rows = duckdb.sql(f"select count(*) from '{tmp_path}/out/data/*/*.parquet'").fetchall()[0][0]
    assert rows == c["written"] == sum(o["rows"] for o in on_disk["outputs"])
    cols = [r[0] for r in duckdb.sql(f"describe select * from '{tmp_path}/out/data/*/*.parquet'").fetchall()]
    assert "internal_ref" not in cols
    q = [json.loads(l) for f in on_disk["quarantine"] for l in open(tmp_path / "out" / f["path"])]
    assert sum(e["records"] for e in q) == c["quarantined"]
    assert all({"reason", "source", "location"} <= set(e) for e in q)


def test_quarantine_never_holds_raw_values(tmp_path):
    secret_ssn = "219-09-9999"
    line = json.dumps({"customer_id": "c1", "full_name": "Zed Secretperson", "ssn": secret_ssn}) + "\n"
    src = tmp_path / "in.jsonl"
    src.write_text(line)
    run_pipeline(RunSettings(dev=True, inputs=[str(src)], schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "out"), progress=False))
    for root, _, files in os.walk(tmp_path / "out"):
        for f in files:
            data = open(os.path.join(root, f), "rb").read()
            assert secret_ssn.encode() not in data and b"Secretperson" not in data


def test_unreconciled_counts_fail_loudly(customers_schema):
    import datetime as dt

    from cloakbeam.transforms.policy import load_policy

    policy = load_policy(POLICY, customers_schema)
    stats = RunStats()
    stats.counts.update({"input": 10, "written": 9})
    stats.inputs["a"] = {"records": 10}
    stats.files.append(FileStat("data/x.parquet", 9, 1, "0" * 64))
    now = dt.datetime.now(dt.timezone.utc)
    m = build_manifest(run_id="r", started=now, finished=now, runner="direct", policy=policy, stats=stats)
    assert m["reconciled"] is False
    with pytest.raises(ReconciliationError, match=r"input records \(10\) != written \(9\)"):
        check_reconciled(m)


def test_existing_output_is_refused_without_overwrite(tmp_path, reference_inputs):
    from cloakbeam.errors import ConfigError

    s = RunSettings(dev=True, inputs=[reference_inputs["parquet"]["path"]], schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "o"), progress=False)
    run_pipeline(s)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_pipeline(s)
    s.overwrite = True
    assert run_pipeline(s)["reconciled"]


def test_missing_input_fails_at_construction(tmp_path, capsys):
    from cloakbeam.cli.main import main

    code = main(["run", "--dev", "--input", str(tmp_path / "none*.jsonl"), "--schema", str(SCHEMA), "--policy", str(POLICY), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "matches no file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rows_an_action_rejects_are_quarantined_and_reconciled(tmp_path):
    """A card number too short for its digits token is not a parse error: Protect rejects that row only."""
    from cloakbeam.schemas.generate import generate

    src = tmp_path / "in.jsonl"
    generate(src, 200, seed=3, fmt="jsonl")
    lines = src.read_text().splitlines()
    rec = json.loads(lines[5])
    rec["card_number"] = "7"  # one digit: a Luhn digits token needs at least two
    lines[5] = json.dumps(rec)
    src.write_text("\n".join(lines) + "\n")
    manifest = run_pipeline(RunSettings(dev=True, inputs=[str(src)], schema=str(SCHEMA), policy=str(POLICY), output=str(tmp_path / "out"), progress=False))
    c = manifest["counts"]
    assert manifest["reconciled"] and c["input"] == 200
    assert manifest["quarantine_reasons"].get("invalid_value") == 1
    entries = [json.loads(l) for f in manifest["quarantine"] for l in open(tmp_path / "out" / f["path"])]
    hit = [e for e in entries if e["reason"] == "invalid_value"]
    assert len(hit) == 1 and hit[0]["field"] == "card_number" and hit[0]["source"].startswith("batch ")
    for root, _, files in os.walk(tmp_path / "out"):
        for f in files:
            assert rec["full_name"].encode() not in open(os.path.join(root, f), "rb").read()
