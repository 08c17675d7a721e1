"""Splits through the whole pipeline: Hive-style directories that DuckDB, Polars and pyarrow datasets read as a
`split` column (Spark reads the same `key=value` layout; it is not installed here), per-split counts that reconcile
with `written`, no subject in two splits (its convergent token appears under one split only), the same assignment
for another batch size, and a record without a subject quarantined rather than guessed."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cloakbeam.pipeline.graph import RunSettings, run_pipeline
from cloakbeam.tests.paths import POLICY, SCHEMA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from cloakbeam.schemas.generate import _pools, generate_table

    d = tmp_path_factory.mktemp("splits")
    t = generate_table(1500, 4, 0, _pools(4))
    ids = t.column("customer_id").to_pylist()
    ids[1000:1300] = ids[:300]  # 300 subjects with two records each, far apart in the input
    t = t.set_column(t.schema.get_field_index("customer_id"), "customer_id", pa.array(ids))
    pq.write_table(t, d / "in.parquet")
    out = {}
    for bs in (1500, 211):
        out[bs] = run_pipeline(RunSettings(dev=True, inputs=[str(d / "in.parquet")], schema=str(SCHEMA), policy=str(POLICY), output=str(d / f"o{bs}"),
                                           batch_size=bs, progress=False, state_dir=str(d / "state")))
    return d, out


def test_layout_is_hive_partitions_read_as_a_column_by_three_engines(runs):
    import duckdb
    import polars as pl

    d, manifests = runs
    data = d / "o211" / "data"
    assert sorted(p.name for p in data.iterdir()) == ["split=test", "split=train", "split=validation"]
    counts = manifests[211]["sections"]["splits"]["counts"]
    duck = dict(duckdb.sql(f"select split, count(*) from read_parquet('{data}/**/*.parquet', hive_partitioning=true) group by 1").fetchall())
    polars = dict(pl.scan_parquet(f"{data}/**/*.parquet", hive_partitioning=True).group_by("split").len().collect().iter_rows())
    arrow = ds.dataset(str(data), partitioning="hive").to_table(columns=["split"]).column("split").to_pylist()
    assert duck == polars == counts
    assert {s: arrow.count(s) for s in counts} == counts


def test_per_split_counts_reconcile_with_written(runs):
    _, manifests = runs
    for m in manifests.values():
        sp = m["sections"]["splits"]
        assert sp["reconciled"] and sum(sp["counts"].values()) == m["counts"]["written"]
        assert all(o["split"] in sp["counts"] and o["path"].startswith(f"data/split={o['split']}/") for o in m["outputs"])
        assert 0.7 < sp["shares"]["train"] < 0.9


def test_no_subject_in_two_splits_and_same_assignment_for_another_batch_size(runs):
    d, _ = runs
    assignments = []
    for bs in (1500, 211):
        t = ds.dataset(str(d / f"o{bs}" / "data"), partitioning="hive").to_table(columns=["customer_id", "split"])
        pairs = set(zip(t.column("customer_id").to_pylist(), t.column("split").to_pylist()))
        tokens = [tok for tok, _ in pairs]
        assert len(tokens) == len(set(tokens)), "a subject's records landed in two splits"
        assignments.append(dict(pairs))
    assert assignments[0] == assignments[1]
    assert len(assignments[0]) > 1000


def test_record_without_subject_is_quarantined(tmp_path):
    from cloakbeam.schemas.generate import generate

    src = generate(tmp_path / "in.jsonl", 200, seed=9, fmt="jsonl")["path"]
    lines = open(src).read().splitlines()
    rec = json.loads(lines[5])
    rec["customer_id"] = None
    lines[5] = json.dumps(rec)
    with open(src, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    import yaml

    doc = yaml.safe_load(POLICY.read_text())
    doc.pop("k_anonymity")
    for f in ("date_of_birth", "zip", "gender"):
        doc["fields"][f] = "drop"
    schema = json.loads(SCHEMA.read_text())
    for f in schema["fields"]:
        if f["name"] == "customer_id":
            f["type"] = ["null", "string"]
            f["default"] = None
    (tmp_path / "s.avsc").write_text(json.dumps(schema))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    m = run_pipeline(RunSettings(dev=True, inputs=[src], schema=str(tmp_path / "s.avsc"), policy=str(tmp_path / "p.yaml"), output=str(tmp_path / "o"),
                                 progress=False, state_dir=str(tmp_path / "st")))
    assert m["reconciled"] and m["quarantine_reasons"].get("missing_subject") == 1
    assert m["sections"]["splits"]["reconciled"] and sum(m["sections"]["splits"]["counts"].values()) == 199
