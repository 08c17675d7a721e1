"""`cloakbeam classify` on the reference dataset: the right class for every field, schema-less (JSONL, CSV,
Parquet with inferred schema) and with the schema (every format); the proposed policy compiles; bad usage
exits 2; no sampled value is printed."""

from __future__ import annotations

import json

import pytest
import yaml

from cloakbeam.cli.main import main
from cloakbeam.tests.paths import SCHEMA
from cloakbeam.transforms.policy import load_policy


def _declared(customers_schema):
    return {p: f.declared_class for p, f in customers_schema.fields.items()}


def _run(capsys, *argv):
    rc = main(["classify", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_schema_less_sample_proposes_the_right_class_for_every_field(fmt, reference_inputs, customers_schema, tmp_path, capsys):
    out_yaml = tmp_path / "proposed.yaml"
    rc, out, _ = _run(capsys, "--input", reference_inputs[fmt]["path"], "--sample", "2000", "--out", str(out_yaml), "--json")
    assert rc == 0
    result = json.loads(out)
    got = {r["field"]: r["class"] for r in result["fields"]}
    assert got == _declared(customers_schema)
    assert result["sampled"] + result["skipped"] == 2000  # unreadable sample lines are skipped and counted
    # The proposal is a valid policy for the real schema, and it protects every direct identifier.
    policy = load_policy(out_yaml, customers_schema)
    assert policy.actions["full_name"].name == "pseudonymize"
    assert policy.actions["notes"].name == "scrub"
    assert policy.actions["notes"].options["link"] == ["full_name", "email", "phone", "ssn"]
    for path in ("ssn", "card_number", "customer_id"):
        assert policy.actions[path].output_type() is None


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "avro", "parquet"])
def test_with_schema_every_format_is_read_by_the_pipeline_reader(fmt, reference_inputs, customers_schema, tmp_path, capsys):
    rc, out, _ = _run(capsys, "--input", reference_inputs[fmt]["path"], "--schema", str(SCHEMA), "--sample", "300", "--out", str(tmp_path / "p.yaml"))
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["FIELD", "CLASS", "CONF", "SOURCE", "EVIDENCE"]
    for path, cls in _declared(customers_schema).items():
        row = next(line for line in lines if line.startswith(path + " "))
        assert row.split()[1] == cls
    assert "300 records sampled" in out


def test_output_never_contains_sampled_values(reference_inputs, tmp_path, capsys):
    from cloakbeam.schemas.generate import _pools, generate_table

    table = generate_table(50, 7, 0, _pools(7))
    rc, out, err = _run(capsys, "--input", reference_inputs["jsonl"]["path"], "--sample", "50", "--out", str(tmp_path / "p.yaml"))
    assert rc == 0
    written = (tmp_path / "p.yaml").read_text()
    for col in ("full_name", "email", "ssn", "card_number", "phone", "ip_address"):
        for v in table.column(col).to_pylist():
            if v:
                assert v not in out and v not in err and v not in written


def test_contradiction_is_flagged_as_a_warning(tmp_path, capsys):
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"remarks_code": f"219-09-{i:04d}" if i % 2 else "ok"}) + "\n" for i in range(1, 41)))
    rc, out, _ = _run(capsys, "--input", str(src), "--out", str(tmp_path / "p.yaml"), "--json")
    row = json.loads(out)["fields"][0]
    assert row["warning"] and "US_SSN" in row["warning"]
    assert "WARNING" in (tmp_path / "p.yaml").read_text()


def test_proposed_yaml_is_plain_yaml_with_comments(reference_inputs, tmp_path, capsys):
    _run(capsys, "--input", reference_inputs["csv"]["path"], "--sample", "200", "--out", str(tmp_path / "p.yaml"), "--dataset", "cust")
    doc = yaml.safe_load((tmp_path / "p.yaml").read_text())
    assert doc["dataset"] == "cust" and doc["version"] == 1
    assert doc["fields"]["phone"] == {"action": "mask", "method": "phone", "keep_last": 2}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--input", "/nonexistent/*.jsonl"], "matches no file"),
        (["--input", "{avro}"], "avro input needs --schema"),
        (["--input", "{jsonl}", "--sample", "0"], "--sample must be a positive"),
        (["--input", "{jsonl}", "--schema", "/nonexistent.avsc"], "cannot read schema file"),
    ],
)
def test_bad_usage_exits_2(argv, message, reference_inputs, tmp_path, capsys):
    argv = [a.format(**{k: v["path"] for k, v in reference_inputs.items()}) for a in argv]
    rc, _, err = _run(capsys, *argv, "--out", str(tmp_path / "p.yaml"))
    assert rc == 2
    assert message in err


def test_headers_that_are_not_avro_names_get_a_safe_name_and_a_source_name_note(tmp_path, capsys):
    src = tmp_path / "adult.csv"
    src.write_text("age,marital-status\n" + "".join(f"{20 + i % 50},Divorced\n" for i in range(50)))
    out_yaml = tmp_path / "p.yaml"
    rc, _, _ = _run(capsys, "--input", str(src), "--out", str(out_yaml))
    text = out_yaml.read_text()
    assert rc == 0
    assert "'marital-status' is not an Avro name; name the schema field 'marital_status'" in text
    assert '"cloakbeam.source_name": "marital-status"' in text


@pytest.mark.parametrize("with_schema", [False, True])
def test_proposal_declares_or_generalizes_the_columns_the_uniqueness_scan_flags(with_schema, reference_inputs, customers_schema, tmp_path, capsys):
    out_yaml = tmp_path / "p.yaml"
    argv = ["--input", reference_inputs["jsonl"]["path"], "--sample", "3000", "--out", str(out_yaml), "--json"]
    if with_schema:
        argv += ["--schema", str(SCHEMA)]
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0
    cand = json.loads(out)["quasi_identifier_candidates"]["columns"]
    # Raw income is unique for almost everyone, signup_ts for everyone: each gets the finest generalization that
    # brings it under 1% on the sample; the quasi-identifier classes are declared to k-anonymity.
    assert cand["income"]["unique_fraction"] > 0.9 and cand["income"]["action"]["method"] == "round" and cand["income"]["after"] <= 0.01
    assert cand["signup_ts"]["unique_fraction"] > 0.99 and cand["signup_ts"]["action"]["method"] == ("truncate" if with_schema else "date")
    assert {p for p, c in cand.items() if c["proposal"] == "quasi-identifier"} == {"date_of_birth", "zip", "gender"}
    policy = load_policy(out_yaml, customers_schema)
    assert policy.actions["income"].options["method"] == "round" and policy.actions["date_of_birth"].is_auto
    assert [q.path for q in policy.sections["k_anonymity"].spec.qis] == ["date_of_birth", "zip", "gender"]
    assert policy.sections["uniqueness"].spec.max_unique_fraction == 0.01
    assert policy.actions["phone"].name == "mask"  # masked columns are judged on their released form, at run time
