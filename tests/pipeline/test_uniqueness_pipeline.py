"""The uniqueness scan in the whole pipeline.

- `ScanUniqueness` with assert_that: every element passes through, one report is added;
- the CLI on a demo-sized release (20,000 generated customers, as `cloakbeam demo` makes them): the reference
  policy as it was before the scan fails with one sentence naming the columns and fractions, and the release is
  withdrawn; `cloakbeam demo` with the fixed policy passes and its manifest carries the scan's figures;
- accept_risk through the CLI: accepting the failing columns (with a reason) lets the run pass and records it;
- quantile bands are computed on the input sample when the run is prepared, the same for the same input, and
  recorded in the manifest;
- the churn model's utility: AUC of a logistic regression trained on the release, before and after the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from cloakbeam.core.stats import RunStats
from cloakbeam.tests.paths import REFERENCE_POLICY, SCHEMA

BEFORE = Path(__file__).with_name("customers.policy.before-uniqueness.yaml")
DEMO_ROWS = 20_000


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory):
    """The demo's input: 20,000 customers, seed 42, 1% dirty (what `cloakbeam demo` generates)."""
    from cloakbeam.schemas.generate import generate

    d = tmp_path_factory.mktemp("demo-input")
    return generate(d / "customers.jsonl", DEMO_ROWS, seed=42, fmt="jsonl", dirty=0.01)["path"]


def test_scan_transform_passes_elements_through_and_adds_one_report():
    from cloakbeam.transforms.kanon_beam import ScanUniqueness
    from cloakbeam.transforms.uniqueness import ScanSpec, combinations

    spec = ScanSpec(("a", "b"), tuple(combinations(["a", "b"], 2)), (), (), 3, 0.01, 2, 2048, b"k" * 16)
    batches = [pa.RecordBatch.from_pydict({"a": pa.array(np.arange(i * 100, i * 100 + 100) % 7), "b": pa.array(["x"] * 100)})
               for i in range(5)]

    def check(elements):
        data = [e for e in elements if isinstance(e, pa.RecordBatch)]
        stats = [e for e in elements if isinstance(e, RunStats)]
        assert sum(b.num_rows for b in data) == 500
        reports = [s.extra["uniqueness"] for s in stats if "uniqueness" in s.extra]
        assert len(reports) == 1 and reports[0]["records"] == 500 and reports[0]["passed"]
        assert any(s.counts.get("input") == 9 for s in stats)  # upstream RunStats pass through

    with TestPipeline() as p:
        out = p | "Create" >> __import__("apache_beam").Create(batches + [RunStats(counts={"input": 9})]) | ScanUniqueness(spec)
        assert_that(out, check)


@pytest.mark.slow
def test_old_reference_policy_fails_the_demo_release_with_one_sentence_and_withdraws_it(demo_input, tmp_path, capsys):
    from cloakbeam.cli.main import main

    out = tmp_path / "out"
    rc = main(["run", "--dev", "--input", demo_input, "--schema", str(SCHEMA), "--policy", str(BEFORE), "--output", str(out),
               "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert rc == 1
    line = [x for x in err.splitlines() if x.startswith("cloakbeam: error:")]
    assert len(line) == 1 and "Traceback" not in err
    msg = line[0]
    assert msg.startswith("cloakbeam: error: uniqueness scan: column ")
    assert "column 'signup_ts' singles out 99." in msg or "column 'signup_ts' singles out 100.00%" in msg
    assert "column 'income' singles out 96." in msg
    assert "limit 1.00% unique" in msg and "uniqueness.accept_risk" in msg and "method: round" in msg
    assert "The release was withheld: nothing was published" in msg
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.parquet"))
    lines = Path(demo_input).read_bytes().splitlines()[:300]
    raw = []
    for x in lines:
        try:
            raw.append(json.loads(x))
        except ValueError:
            pass  # the demo input is 1% dirty
    for r in raw:
        for v in (r.get("income"), r.get("signup_ts"), r.get("card_number")):
            if v is not None:
                assert str(v) not in msg


@pytest.mark.slow
def test_fixed_reference_policy_passes_the_demo_and_reports_the_scan(tmp_path, capsys):
    from cloakbeam.cli.main import main

    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "uniqueness: passed:" in out
    m = json.loads((tmp_path / "demo" / "output" / "manifest.json").read_text())
    sec = m["sections"]["uniqueness"]
    assert sec["passed"] is True and sec["scanned"] is True and sec["records"] == m["counts"]["written"]
    assert sec["riskiest"][0]["unique_fraction"] <= 0.01 and sec["policy"]["max_unique_fraction"] == 0.01
    assert set(sec["not_scanned"]) == {"customer_id", "full_name", "email", "ssn", "card_number"}
    assert "income" in sec["scanned_columns"] and "signup_ts" in sec["scanned_columns"]
    assert sec["combinations_measured"] + sec["combinations_exempt"] == sum(
        __import__("math").comb(len(sec["scanned_columns"]), r) for r in (1, 2, 3))
    assert sec["quasi_identifier_combinations"] == 7  # every combination of date_of_birth, zip and gender
    assert not any(f["status"] != "ok" for f in sec["riskiest"])
    text = json.dumps(sec)
    raw = pq.read_table(tmp_path / "demo" / "output" / "data")
    for v in raw.column("diagnosis").unique().to_pylist():
        assert f'"{v}"' not in text  # names and fractions only


@pytest.mark.slow
def test_accept_risk_lets_the_run_pass_and_is_recorded(demo_input, tmp_path):
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline

    doc = yaml.safe_load(BEFORE.read_text().split("\n", 2)[2])
    doc["fields"].update(phone="drop", ip_address="drop", card_number={"action": "tokenize", "format": "digits", "luhn": True, "subject": "customer_id"})
    doc["uniqueness"] = {"accept_risk": [{"columns": ["income"], "reason": "the churn team needs exact income"}, "signup_ts"],
                         "accept_reason": "session features need the signup second"}
    pol = tmp_path / "accepting.yaml"
    pol.write_text(yaml.safe_dump(doc, sort_keys=False))
    m = run_pipeline(RunSettings(dev=True, inputs=[demo_input], schema=str(SCHEMA), policy=str(pol), output=str(tmp_path / "out"),
                                 state_dir=str(tmp_path / "state"), progress=False))
    sec = m["sections"]["uniqueness"]
    assert sec["passed"] is True
    assert sec["accepted"][0] == {"columns": ["income"], "reason": "the churn team needs exact income", "unique_fraction": pytest.approx(0.967, abs=0.01)}
    assert sec["accepted"][1]["reason"] == "session features need the signup second"
    assert all("income" not in f["columns"] and "signup_ts" not in f["columns"] for f in sec["riskiest"])


def test_quantile_bands_are_computed_on_the_input_sample_and_recorded(tmp_path):
    from cloakbeam.pipeline.graph import RunSettings, prepare
    from cloakbeam.pipeline.manifest import field_report
    from cloakbeam.schemas.generate import generate

    src = generate(tmp_path / "in.parquet", 4000, seed=3, fmt="parquet")["path"]
    doc = yaml.safe_load(REFERENCE_POLICY.read_text())
    doc["fields"]["income"] = {"action": "generalize", "method": "quantile", "bands": 4}
    pol = tmp_path / "q.yaml"
    pol.write_text(yaml.safe_dump(doc, sort_keys=False))

    def edges(out):
        run = prepare(RunSettings(dev=True, inputs=[src], schema=str(SCHEMA), policy=str(pol), output=str(tmp_path / out), state_dir=str(tmp_path / "s"), progress=False))
        return run, field_report(run.policy)["income"]["action"]

    run, a = edges("o1")
    _, b = edges("o2")
    assert a == b and a["sample_rows"] == 4000 and len(a["edges"]) == 3
    income = pq.read_table(src).column("income").drop_null().to_numpy()
    for e, q in zip(a["edges"], (0.25, 0.5, 0.75)):
        assert abs(np.mean(income < e) - q) < 0.05  # about a quarter of the records between two edges
        assert e == float(f"{e:.2g}")  # round numbers, not someone's income
    # The workers compile the resolved policy: the reference they receive carries the edges.
    from cloakbeam.transforms.steps import PolicyRef

    assert PolicyRef.of(run.policy).compile().actions["income"].options["edges"] == a["edges"]


@pytest.mark.slow
def test_churn_model_keeps_its_utility_after_the_fix(demo_input):
    """AUC of a logistic regression on the released features (age from the birth-date level, income, gender,
    diagnosis, signup year), trained on 70% of the release and scored on the rest: before and after the fix."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    aucs = {}
    for name, path in (("before", BEFORE), ("after", REFERENCE_POLICY)):
        table = _release(demo_input, path)
        X, y = _features(table), np.asarray(table.column("churned").to_pylist(), dtype=int)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
        model = LogisticRegression(max_iter=2000).fit(Xtr, ytr)
        aucs[name] = roc_auc_score(yte, model.predict_proba(Xte)[:, 1])
    assert aucs["before"] > 0.6  # the label is learnable at all
    assert aucs["after"] >= aucs["before"] - 0.02, aucs


def _release(src: str, policy_path: Path) -> pa.Table:
    """The model's columns as the policy releases them (protect + k-anonymity, in process; no keys needed)."""
    from cloakbeam.schemas.avro import load_schema
    from cloakbeam.transforms.ingest import Rejected, read_source
    from cloakbeam.transforms.kanon import enforce_table, frequency_set, make_plan, merge_frequency_sets
    from cloakbeam.transforms.policy import compile_policy
    from cloakbeam.transforms.protect import flatten_columns, protect_batch
    from cloakbeam.transforms.registry import ActionContext

    schema = load_schema(SCHEMA)
    doc = yaml.safe_load(policy_path.read_text())
    keep = ("date_of_birth", "zip", "gender", "income", "diagnosis", "signup_ts", "churned")
    doc["fields"] = {f: a for f, a in doc["fields"].items() if f in keep}
    doc.pop("uniqueness", None)
    policy = compile_policy(doc, schema, source=str(policy_path))
    with open(src, "rb") as fh:
        batches = [b for b in read_source(fh, src, "jsonl", schema, 5000) if not isinstance(b, Rejected)]
    protected = [protect_batch(b, policy, ActionContext(None)) for b in batches]
    spec = policy.sections["k_anonymity"].spec
    plan = make_plan(merge_frequency_sets([frequency_set(flatten_columns(b), spec) for b in protected]), spec)
    return pa.Table.from_batches([enforce_table(b, spec, plan)[0] for b in protected])


def _features(t: pa.Table) -> np.ndarray:
    def num(v):  # a level label or a number -> a number: "1980s" -> 1985, "1985-03" -> 1985.2, "[30000, 45000)" -> 37500
        if v is None or v == "*":
            return np.nan
        if isinstance(v, (int, float)):
            return float(v)
        s = str(v)
        if s.endswith("s") and s[:-1].isdigit():
            return float(s[:-1]) + 5
        if s[:4].isdigit():
            return float(s[:4]) + (int(s[5:7]) - 0.5) / 12 if len(s) >= 7 and s[5:7].isdigit() else float(s[:4]) + 0.5
        lo, _, hi = s.strip("[()").partition(", ")
        lo_v = 0.0 if lo == "-inf" else float(lo)
        hi_v = lo_v * 1.5 if hi.startswith("inf") else float(hi.rstrip(")"))
        return (lo_v + hi_v) / 2

    cols = []
    for name in ("date_of_birth", "income"):
        x = np.array([num(v) for v in t.column(name).to_pylist()], dtype=float)
        cols.append(np.where(np.isnan(x), np.nanmean(x), x))
    ts = t.column("signup_ts").to_pylist()
    cols.append(np.array([v.year + v.timetuple().tm_yday / 366 if v is not None else 2021.0 for v in ts]))
    for name in ("gender", "diagnosis"):
        vals = t.column(name).to_pylist()
        for level in sorted({v for v in vals if v is not None}):
            cols.append(np.array([v == level for v in vals], dtype=float))
    X = np.column_stack(cols)
    return (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 0, X.std(axis=0), 1)
