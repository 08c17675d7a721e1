"""Quarantine records sealed with the envelope scheme: round trip, binding, tamper, pipeline, rewrap."""

from __future__ import annotations

import json

import pytest
import yaml

from cloakbeam.errors import IntegrityError, KeyAccessError
from cloakbeam.keys.quarantine import open_quarantine_record, seal_quarantine_record
from cloakbeam.keys.service import KeyRef, open_key_service
from cloakbeam.tests.conftest import SCHEMA
from cloakbeam.tests.keys_fixtures import open_dev, reveal_quarantine, with_reveal


def test_seal_open_round_trip_and_binding(tmp_path):
    ks = open_dev(tmp_path)
    raw = b'{"ssn": "219-09-9999", "name": "Zed"}'
    blob = seal_quarantine_record(raw, "in.jsonl#line 3", ks, "customers")
    assert b"219-09-9999" not in blob and b"Zed" not in blob
    assert open_quarantine_record(blob, "in.jsonl#line 3", ks, "customers") == raw
    with pytest.raises(IntegrityError):
        open_quarantine_record(blob, "in.jsonl#line 4", ks, "customers")  # moved to another entry
    with pytest.raises(IntegrityError):
        open_quarantine_record(blob, "in.jsonl#line 3", ks, "other")  # another dataset
    for i in range(len(blob) - 60, len(blob)):  # every byte of the cell part
        bad = bytearray(blob)
        bad[i] ^= 1
        with pytest.raises((IntegrityError, KeyAccessError)) as ei:
            open_quarantine_record(bytes(bad), "in.jsonl#line 3", ks, "customers")
        assert "219" not in str(ei.value)
    with pytest.raises(IntegrityError, match="malformed"):
        open_quarantine_record(b"\xff\xff", "x", ks, "customers")
    # Many records share one cached data key: no KMS call per record.
    calls = ks.kms_calls
    for i in range(200):
        seal_quarantine_record(raw, f"in.jsonl#line {i}", ks, "customers")
    assert ks.kms_calls == calls


def test_pipeline_quarantine_is_sealed_readable_by_role_and_survives_rewrap(tmp_path, monkeypatch):
    from cloakbeam.keys import service as svc
    from cloakbeam.keys.decrypt import rewrap_output
    from cloakbeam.keys.signing import verify_output
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline

    state = tmp_path / "state"
    monkeypatch.setenv("CLOAKBEAM_STATE_DIR", str(state))
    good = {"customer_id": "c1", "full_name": "Ann", "email": "a@example.com", "phone": None, "ssn": "111-22-3333",
            "card_number": "4111111111111111", "date_of_birth": "1980-01-02", "zip": "12345", "gender": "F", "income": 1.0,
            "diagnosis": "x", "notes": None, "ip_address": "10.0.0.1", "signup_ts": "2021-01-01T00:00:00Z", "churned": False}
    bad_line = b'{"customer_id": "c2", "ssn": "219-09-9999", "full_name": "Zed Secretperson"'
    src = tmp_path / "in.jsonl"
    src.write_bytes(json.dumps(good).encode() + b"\n" + bad_line + b"\n")
    out = tmp_path / "out"
    # A small policy of its own (the reference one has k-anonymity, which one good record cannot meet).
    raw_policy = {"version": 1, "dataset": "customers", "fields": {"ssn": "encrypt", "gender": "keep", "churned": "keep"},
                  "uniqueness": {"max_unique_fraction": 1}}  # one released record is unique by definition
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(raw_policy))
    run_pipeline(RunSettings(dev=True, inputs=[str(src)], schema=str(SCHEMA), policy=str(policy), output=str(out), progress=False))
    qfiles = sorted((out / "quarantine").rglob("*.jsonl"))
    assert qfiles
    entry = json.loads(qfiles[0].read_text().splitlines()[0])
    assert "record_sealed" in entry and "record_hmac_sha256" not in entry
    assert b"Secretperson" not in qfiles[0].read_bytes()
    ref = KeyRef(path=str(state / "keyring.json"))
    # the pipeline's keyring alone cannot open what it sealed
    svc._PROCESS.clear()
    with pytest.raises(KeyAccessError, match="only the reveal service holds"):
        reveal_quarantine(out, open_key_service(ref), "customers")
    ks = with_reveal(open_key_service(ref))  # the reveal service's view (grants and audit: tests/vault/test_service.py)
    got = reveal_quarantine(out, ks, "customers")
    assert [raw.rstrip(b"\n") for raw in got] == [bad_line]
    # rotate -> rewrap (reseal needs the reveal keyring) -> retire the pipeline KEK: quarantine still opens, output verifies.
    ks.rotate()
    rewrap_output(out, ks)
    ks.retire("default", "1")
    assert verify_output(out) == []
    svc._PROCESS.clear()
    ks2 = with_reveal(open_key_service(ref))
    assert [raw.rstrip(b"\n") for raw in reveal_quarantine(out, ks2, "customers")] == [bad_line]
