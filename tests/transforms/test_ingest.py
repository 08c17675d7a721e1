"""Ingest: every format parses, every corruption kind is quarantined with a location, none crashes, counts add up."""

from __future__ import annotations

import csv
import io
import json

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.schemas.generate import DIRTY_KINDS, generate
from cloakbeam.tests.paths import NESTED
from cloakbeam.transforms.ingest import Rejected, detect_format, read_source


def _read(data: bytes, fmt: str, schema, batch_size: int = 1000):
    good, bad = [], []
    for item in read_source(io.BytesIO(data), "src." + fmt, fmt, schema, batch_size):
        (bad if isinstance(item, Rejected) else good).append(item)
    return good, bad


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "avro", "parquet"])
def test_every_format_reconciles_and_quarantines_each_corruption_kind(fmt, reference_inputs, customers_schema):
    info = reference_inputs[fmt]
    data = open(info["path"], "rb").read()
    good, bad = _read(data, fmt, customers_schema, batch_size=512)
    rows = sum(b.num_rows for b in good)
    quarantined = sum(r.records for r in bad)
    assert rows + quarantined == 3000
    assert quarantined > 0
    assert all(b.num_rows <= 512 for b in good)
    assert all(b.schema.equals(customers_schema.arrow) for b in good)
    reasons = {r.reason for r in bad}
    expected = {"jsonl": {"malformed_json", "wrong_type", "missing_required", "oversize", "invalid_utf8"},
                "csv": {"malformed_csv", "wrong_type", "missing_required", "oversize", "invalid_utf8"},
                "avro": {"oversize", "missing_required", "corrupt_avro_block"},
                "parquet": {"oversize", "missing_required"}}[fmt]
    assert expected <= reasons
    for r in bad:
        assert r.source.endswith(fmt)
        assert r.location.split()[0] in {"line", "row", "record", "byte"}
        if r.reason in {"wrong_type", "missing_required", "oversize"}:
            assert r.field in customers_schema.fields


def test_clean_jsonl_keeps_every_record_value(customers_schema, tmp_path):
    from cloakbeam.schemas.generate import _pools, generate_table

    table = generate_table(50, 3, 0, _pools(3))
    path = generate(tmp_path / "c.jsonl", 50, seed=3, fmt="jsonl")["path"]
    good, bad = _read(open(path, "rb").read(), "jsonl", customers_schema)
    assert not bad
    assert pa.Table.from_batches(good).equals(table)


def test_reasons_never_carry_values(customers_schema):
    secret = "123-45-6789"
    line = json.dumps({"customer_id": "c1", "ssn": secret, "income": "x" + secret}).encode() + b"\n"
    _, bad = _read(line, "jsonl", customers_schema)
    assert len(bad) == 1
    text = bad[0].describe() + bad[0].reason + str(bad[0].field) + bad[0].location
    assert secret not in text


@pytest.mark.parametrize(
    "line,reason,field",
    [
        (b'{"id": "a", "visited": "2024-01-02"', "malformed_json", None),
        (b'{"id": 5, "visited": "2024-01-02"}', "wrong_type", "id"),
        (b'{"visited": "2024-01-02"}', "missing_required", "id"),
        (b'{"id": "a", "visited": "not a date"}', "wrong_type", "visited"),
        (b'{"id": "a", "age": true, "visited": "2024-01-02"}', "wrong_type", "age"),
        (b'{"id": "a", "age": 9999999999, "visited": "2024-01-02"}', "wrong_type", "age"),
        (b'{"id": "a", "visited": "2024-01-02", "contact": {"city": "x"}}', "missing_required", "contact.email"),
        (b'{"id": "a", "visited": "2024-01-02", "contact": {"email": "' + b"e" * 60 + b'"}}', "oversize", "contact.email"),
        (b'{"id": "a", "visited": "2024-01-02", "contact": "nope"}', "wrong_type", "contact"),
        (b'{"id": "\xff", "visited": "2024-01-02"}', "invalid_utf8", None),
        (b'[1, 2]', "wrong_type", None),
    ],
)
def test_jsonl_bad_lines(line, reason, field):
    schema = schema_from_dict(NESTED)
    good_line = b'{"id": "ok", "visited": "2024-01-02", "contact": {"email": "a@b.c"}}'
    good, bad = _read(good_line + b"\n" + line + b"\n" + good_line + b"\n", "jsonl", schema)
    assert sum(b.num_rows for b in good) == 2
    assert [(r.reason, r.field, r.location) for r in bad] == [(reason, field, "line 2")]


def test_nested_records_keep_structure_in_every_format(tmp_path):
    schema = schema_from_dict(NESTED)
    rows = [
        {"id": "a", "age": 30, "contact": {"email": "a@x.io", "city": "Oslo"}, "visited": "2024-01-02"},
        {"id": "b", "age": None, "contact": None, "visited": "2024-02-03"},
    ]
    jsonl = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "age", "contact.email", "contact.city", "visited"])
    w.writerow(["a", "30", "a@x.io", "Oslo", "2024-01-02"])
    w.writerow(["b", "", "z@x.io", "", "2024-02-03"])
    for data, fmt in ((jsonl, "jsonl"), (buf.getvalue().encode(), "csv")):
        good, bad = _read(data, fmt, schema)
        assert not bad, fmt
        t = pa.Table.from_batches(good)
        assert t.schema.field("contact").type == schema.arrow.field("contact").type
        assert t.column("contact").to_pylist()[0] == {"email": "a@x.io", "city": "Oslo"}


def test_csv_wrong_column_count_and_bad_quotes(customers_schema):
    header = ",".join(f.name for f in customers_schema.arrow).encode() + b"\n"
    good, bad = _read(header + b"a,b,c\n" + b'"unterminated\n', "csv", customers_schema)
    assert not good
    assert [r.reason for r in bad] == ["malformed_csv", "malformed_csv"]


def test_avro_truncated_file_and_garbage(tmp_path, customers_schema):
    path = generate(tmp_path / "c.avro", 2000, seed=1, fmt="avro")["path"]
    data = open(path, "rb").read()
    good, bad = _read(data[: len(data) - 500], "avro", customers_schema)
    assert sum(b.num_rows for b in good) + sum(r.records for r in bad) == 2000
    assert bad[-1].reason == "corrupt_avro_block" and bad[-1].location.startswith("byte offset")
    good, bad = _read(b"not avro at all", "avro", customers_schema)
    assert not good and bad[0].reason == "corrupt_avro_header"


def test_avro_record_level_validation(customers_schema):
    rows = [{"customer_id": "c", "full_name": "X" * 500, "email": "e", "phone": None, "ssn": "1", "card_number": "1",
             "date_of_birth": 1, "zip": "1", "gender": "f", "income": None, "diagnosis": "d", "notes": None,
             "ip_address": "1.1.1.1", "signup_ts": 1, "churned": True, "internal_ref": None}]
    buf = io.BytesIO()
    fastavro.writer(buf, customers_schema.parsed(), rows)
    _, bad = _read(buf.getvalue(), "avro", customers_schema)
    assert [(r.reason, r.field) for r in bad] == [("oversize", "full_name")]


def test_parquet_type_mismatch_and_garbage(tmp_path, customers_schema):
    t = pa.table({"customer_id": ["a", "b"], "income": ["rich", "poor"]})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    good, bad = _read(buf.getvalue(), "parquet", customers_schema)
    assert not good and len(bad) == 2 and bad[0].location == "row 0"
    good, bad = _read(b"PAR1garbage", "parquet", customers_schema)
    assert not good and bad[0].reason == "corrupt_parquet"


def test_format_detection():
    assert detect_format("a/b.JSONL") == "jsonl"
    assert detect_format("x.csv.gz") == "csv"
    assert detect_format("x.bin", "avro") == "avro"
    with pytest.raises(ValueError, match="--format"):
        detect_format("x.bin")
    assert set(DIRTY_KINDS) == {"jsonl", "csv", "avro", "parquet"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_vectorized_and_line_by_line_paths_agree(fmt, reference_inputs, customers_schema, monkeypatch):
    """Dirty chunks fall back to per-line parsing; both paths must give the same rows and the same rejections."""
    import cloakbeam.transforms.ingest as ingest

    data = open(reference_inputs[fmt]["path"], "rb").read()
    fast_good, fast_bad = _read(data, fmt, customers_schema, batch_size=64)
    monkeypatch.setattr(ingest, "_fast_path_supported", lambda *a: False)
    slow_good, slow_bad = _read(data, fmt, customers_schema, batch_size=64)
    assert pa.Table.from_batches(fast_good).equals(pa.Table.from_batches(slow_good))
    key = lambda r: (r.location, r.reason, r.field, r.raw)  # noqa: E731
    assert sorted(map(key, fast_bad)) == sorted(map(key, slow_bad))


def test_parquet_nested_required_field_checked_only_where_parent_present():
    schema = schema_from_dict(NESTED)
    t = pa.table({
        "id": ["a", "b", "c"],
        "contact": pa.array([{"email": None, "city": "x"}, None, {"email": "e@x", "city": None}],
                            pa.struct([("email", pa.string()), ("city", pa.string())])),
        "visited": pa.array([1, 2, 3], pa.int32()).cast(pa.date32()),
    })
    buf = io.BytesIO()
    pq.write_table(t, buf)
    good, bad = _read(buf.getvalue(), "parquet", schema)
    assert [(r.reason, r.field, r.location) for r in bad] == [("missing_required", "contact.email", "row 0")]
    assert pa.Table.from_batches(good)["id"].to_pylist() == ["b", "c"]
