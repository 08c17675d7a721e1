"""A whole run over the hostile inputs of issue 13: the run completes, every record is accounted for, the limits
in force are in the manifest, damaged files say where their counts come from, and no value leaks."""

from __future__ import annotations

import io
import json
import os

import pyarrow.parquet as pq
import yaml

from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.schemas.generate import generate
from cloakbeam.tests.paths import POLICY, SCHEMA

SECRET = "219-09-9999"


def _lines(tmp_path, n: int) -> list[dict]:
    src = generate(tmp_path / "base.jsonl", n, seed=11, fmt="jsonl")["path"]
    return [json.loads(l) for l in open(src)]


def test_hostile_inputs_are_quarantined_and_the_run_reconciles(tmp_path, capsys):
    rows = _lines(tmp_path, 40)
    good = [json.dumps(r).encode() for r in rows]
    hostile = [
        b'{"customer_id": "deep", "notes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"customer_id": "c1", "customer_id": "c2", "customer_id": "c3", "ssn": "' + SECRET.encode() + b'"}',
        json.dumps({**rows[0], "income": float("nan")}).encode(),
        json.dumps({**rows[1], "income": float("inf")}).encode(),
        json.dumps({**rows[2], "full_name": "Zed_Secret_person\x00" + SECRET}).encode(),
        json.dumps({**rows[3], "notes": SECRET + "x" * 300_000}).encode(),
    ]
    src = tmp_path / "in" / "hostile.jsonl"
    src.parent.mkdir()
    src.write_bytes(b"\n".join(good[:20] + hostile + good[20:]) + b"\n")

    table = pq.read_table(generate(tmp_path / "p.parquet", 2000, seed=3, fmt="parquet")["path"])
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=500)
    data = buf.getvalue()
    (tmp_path / "in" / "truncated.parquet").write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    start = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(1).column(1).data_page_offset
    damaged[start + 8 : start + 400] = b"\xff" * 392
    (tmp_path / "in" / "damaged.parquet").write_bytes(bytes(damaged))

    policy = yaml.safe_load(POLICY.read_text())
    policy["limits"] = {"max_record_bytes": 250_000, "quarantine_record_bytes": 4096}
    pol = tmp_path / "policy.yaml"
    pol.write_text(yaml.safe_dump(policy))

    out = tmp_path / "out"
    manifest = run_pipeline(RunSettings(dev=True, inputs=[str(tmp_path / "in" / "*")], schema=str(SCHEMA), policy=str(pol), output=str(out), batch_size=16, progress=False))
    assert manifest["reconciled"] is True
    assert manifest["limits"]["max_record_bytes"] == 250_000 and manifest["limits"]["max_depth"] == 64
    assert manifest["limits"]["quarantine_record_bytes"] == 4096 and manifest["limits"]["max_yaml_bytes"] == 1 << 20
    reasons = manifest["quarantine_reasons"]
    for reason in ("malformed_json", "duplicate_key", "wrong_type", "control_character", "oversize", "corrupt_parquet"):
        assert reasons.get(reason), reason

    inputs = {os.path.basename(i["path"]): i for i in manifest["inputs"]}
    assert inputs["hostile.jsonl"]["records"] == 46
    assert inputs["truncated.parquet"]["damaged"] == [{"location": "byte offset 0", "reason": "corrupt_parquet", "records": "unknown", "records_from": "unknown"}]
    assert inputs["damaged.parquet"]["records"] == 2000
    assert inputs["damaged.parquet"]["damaged"] == [
        {"location": "row group 1 (rows 500-999)", "reason": "corrupt_parquet", "records": 500, "records_from": "parquet footer"}]
    assert [(os.path.basename(u["path"]), u["records"]) for u in manifest["unreadable"]] == [("truncated.parquet", "unknown")]
    assert "hide their record count" in manifest["reconciliation_note"]
    assert "could not be counted" in capsys.readouterr().err

    entries = [json.loads(l) for q in manifest["quarantine"] for l in open(out / q["path"])]
    big = [e for e in entries if e["reason"] == "oversize" and e.get("detail") == "max_record_bytes 250000"]
    assert len(big) == 1 and big[0]["record_bytes"] > 300_000 and big[0]["record_truncated"] is True
    assert big[0]["record_sealed_bytes"] == 4096 and len(big[0]["record_sealed"]) < 8000
    deep = [e for e in entries if e.get("detail") == "max_depth 64"]
    assert len(deep) == 1 and deep[0]["location"] == "line 21"
    for root, _, files in os.walk(out):
        for f in files:
            blob = open(os.path.join(root, f), "rb").read()
            assert SECRET.encode() not in blob and b"Zed_Secret_person" not in blob, f
