"""`cloakbeam.source_name`: input names that are not Avro names (CSV headers such as `marital-status`) map to a
field, in CSV (fast and line-by-line paths), JSONL and Parquet; bad declarations fail at schema load."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloakbeam.errors import SchemaError
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.transforms.ingest import Rejected, read_source

AVRO = {"type": "record", "name": "Adult", "fields": [
    {"name": "age", "type": "int"},
    {"name": "marital_status", "type": "string", "cloakbeam.source_name": "marital-status"},
    {"name": "capital_gain", "type": ["null", "double"], "default": None, "cloakbeam.source_name": "capital-gain"},
]}


def _read(data: bytes, fmt: str, batch_size: int = 100):
    schema = schema_from_dict(AVRO)
    items = list(read_source(io.BytesIO(data), "in", fmt, schema, batch_size))
    rows = [r for b in items if not isinstance(b, Rejected) for r in b.to_pylist()]
    return rows, [b for b in items if isinstance(b, Rejected)]


EXPECTED = [{"age": 39, "marital_status": "Never-married", "capital_gain": 2174.0}, {"age": 50, "marital_status": "Divorced", "capital_gain": None}]


def test_csv_headers_map_to_fields_on_the_fast_path():
    rows, rejected = _read(b"age,marital-status,capital-gain\n39,Never-married,2174\n50,Divorced,\n", "csv")
    assert rows == EXPECTED and not rejected


def test_csv_headers_map_on_the_line_by_line_path_too():
    data = b"age,marital-status,capital-gain\n39,Never-married,2174\n50,Divorced,\nnot-a-number,x,1\n"
    rows, rejected = _read(data, "csv")
    assert rows == EXPECTED and [r.reason for r in rejected] == ["wrong_type"]


def test_jsonl_and_parquet_keys_map_too():
    lines = b"".join(json.dumps({"age": r["age"], "marital-status": r["marital_status"], "capital-gain": r["capital_gain"]}).encode() + b"\n" for r in EXPECTED)
    assert _read(lines, "jsonl")[0] == EXPECTED
    assert _read(lines + b"{broken\n", "jsonl")[0] == EXPECTED
    buf = io.BytesIO()
    pq.write_table(pa.table({"age": pa.array([39, 50], pa.int32()), "marital-status": ["Never-married", "Divorced"], "capital-gain": [2174.0, None]}), buf)
    assert _read(buf.getvalue(), "parquet")[0] == EXPECTED


@pytest.mark.parametrize("field, words", [
    ({"name": "x", "type": "int", "cloakbeam.source_name": "age"}, "is the name of another field"),
    ({"name": "x", "type": "int", "cloakbeam.source_name": "marital-status"}, "declare the same cloakbeam.source_name"),
    ({"name": "x", "type": "int", "cloakbeam.source_name": ""}, "non-empty string"),
])
def test_bad_source_names_fail_at_schema_load(field, words):
    bad = {**AVRO, "fields": AVRO["fields"] + [field]}
    with pytest.raises(SchemaError, match=words):
        schema_from_dict(bad)
