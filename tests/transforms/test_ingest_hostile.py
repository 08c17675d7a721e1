"""Hostile inputs (issue 13): every one is quarantined with a reason, a location and the limit it broke, the
neighbouring records survive, counts add up, and the vectorized and line-by-line paths agree."""

from __future__ import annotations

import csv
import io
import json

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloakbeam.core.limits import IngestLimits
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.transforms.ingest import Rejected, read_source

SCHEMA = {
    "type": "record",
    "name": "Obs",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "score", "type": ["null", "double"], "default": None},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "tags", "type": ["null", {"type": "array", "items": "string"}], "default": None},
        {"name": "inner", "type": ["null", {"type": "record", "name": "Inner", "fields": [
            {"name": "code", "type": ["null", "string"], "default": None},
        ]}], "default": None},
    ],
}


def _schema(**annotations):
    doc = json.loads(json.dumps(SCHEMA))
    for f in doc["fields"]:
        f.update(annotations.get(f["name"], {}))
    return schema_from_dict(doc)


GOOD = b'{"id": "ok", "score": 1.5, "note": "fine\\tline", "tags": ["a"], "inner": {"code": "x"}}'


def _read(data: bytes, fmt: str, schema, batch_size: int = 1000, limits: IngestLimits | None = None):
    good, bad = [], []
    kwargs = {"limits": limits} if limits is not None else {}
    for item in read_source(io.BytesIO(data), "src." + fmt, fmt, schema, batch_size, **kwargs):
        (bad if isinstance(item, Rejected) else good).append(item)
    return good, bad


@pytest.fixture(params=["fast", "line"])
def path_kind(request, monkeypatch):
    """Run each JSONL/CSV case through the vectorized path and through the line-by-line path."""
    if request.param == "line":
        import cloakbeam.transforms.ingest as ingest

        monkeypatch.setattr(ingest, "_fast_path_supported", lambda *a: False)
    return request.param


def _jsonl_case(line: bytes, schema=None, limits=None):
    schema = schema or _schema()
    good, bad = _read(GOOD + b"\n" + line + b"\n" + GOOD + b"\n", "jsonl", schema, limits=limits)
    assert sum(b.num_rows for b in good) == 2, "the neighbours of a bad line survive"
    return bad


def test_100k_deep_line_is_quarantined_not_a_crash(path_kind):
    deep = b'{"id": "d", "note": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bad = _jsonl_case(deep)
    assert [(r.reason, r.field, r.location, r.detail) for r in bad] == [("malformed_json", None, "line 2", "max_depth 64")]


def test_deep_line_inside_a_schema_record_and_unterminated(path_kind):
    deep = b'{"id": "d", "inner": ' + b'{"code": ' * 50_000 + b'"x"' + b"}" * 50_000 + b"}"
    assert [r.detail for r in _jsonl_case(deep)] == ["max_depth 64"]
    assert [r.reason for r in _jsonl_case(b"[" * 100_000)] == ["malformed_json"]


def test_depth_limit_counts_structure_not_brackets_inside_strings(path_kind):
    line = json.dumps({"id": "s", "note": "[" * 500 + "{" * 500}).encode()
    good, bad = _read(line + b"\n", "jsonl", _schema(), limits=IngestLimits(max_depth=3))
    assert not bad and good[0].num_rows == 1
    too_deep = json.dumps({"id": "s", "tags": None, "inner": {"code": None}, "x": [[[1]]]}).encode()
    _, bad = _read(too_deep + b"\n", "jsonl", _schema(), limits=IngestLimits(max_depth=3))
    assert [(r.reason, r.detail) for r in bad] == [("malformed_json", "max_depth 3")]


def test_oversize_line_is_quarantined_capped_and_its_size_recorded(path_kind):
    limits = IngestLimits(max_record_bytes=10_000, quarantine_record_bytes=100)
    big = b'{"id": "big", "note": "' + b"x" * 50_000 + b'"}'
    bad = _jsonl_case(big, limits=limits)
    assert [(r.reason, r.detail, r.location) for r in bad] == [("oversize", "max_record_bytes 10000", "line 2")]
    assert len(bad[0].raw) <= 100 and bad[0].size == len(big) + 1


def test_duplicate_keys_at_any_depth(path_kind):
    cases = [
        (b'{"id": "a", "id": "b"}', "id"),
        (b'{"id": "a", "inner": {"code": "x", "code": "y"}}', "inner.code"),
        (b'{"id": "a", "extra": {"k": 1, "k": 2}}', None),  # a key the schema does not name: not named
        (b'{"id": "a", "extra": [{"k": 1, "k": 2}]}', None),
    ]
    for line, field in cases:
        assert [(r.reason, r.field) for r in _jsonl_case(line)] == [("duplicate_key", field)], line


def test_three_customer_ids_are_not_written(customers_schema, path_kind):
    line = b'{"customer_id": "c1", "customer_id": "c2", "customer_id": "c3"}\n'
    good, bad = _read(line, "jsonl", customers_schema)
    assert not good and [(r.reason, r.field) for r in bad] == [("duplicate_key", "customer_id")]


def test_csv_duplicate_header_column_quarantines_the_file(path_kind):
    data = b"id,note,note\na,x,y\nb,z,w\n"
    good, bad = _read(data, "csv", _schema())
    assert not good
    assert [(r.reason, r.field, r.records, r.location) for r in bad] == [("duplicate_key", "note", 2, "line 1")]


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_json_floats_are_wrong_type(token, path_kind):
    line = b'{"id": "n", "score": ' + token + b"}"
    assert [(r.reason, r.field) for r in _jsonl_case(line)] == [("wrong_type", "score")]


def test_non_finite_allowed_by_schema_annotation(path_kind):
    schema = _schema(score={"cloakbeam.allowNonFinite": True})
    good, bad = _read(b'{"id": "n", "score": NaN}\n{"id": "m", "score": -Infinity}\n', "jsonl", schema)
    assert not bad and sum(b.num_rows for b in good) == 2


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_non_finite_csv_floats_are_wrong_type(cell, path_kind):
    data = f"id,score\nok,1.5\nn,{cell}\nok2,2\n".encode()
    good, bad = _read(data, "csv", _schema())
    assert sum(b.num_rows for b in good) == 2
    assert [(r.reason, r.field, r.location) for r in bad] == [("wrong_type", "score", "line 3")]


def test_control_characters_in_strings(path_kind):
    for line, field in [
        (b'{"id": "a\\u0000b"}', "id"),
        (b'{"id": "a", "note": "bell\\u0007"}', "note"),
        (b'{"id": "a", "inner": {"code": "\\u001b[31m"}}', "inner.code"),
        (b'{"id": "a", "tags": ["ok", "x\\u0000"]}', "tags"),
    ]:
        assert [(r.reason, r.field) for r in _jsonl_case(line)] == [("control_character", field)], line
    # Tab, CR and LF inside a string are ordinary text.
    good, bad = _read(b'{"id": "a", "note": "one\\ttwo\\r\\nthree"}\n', "jsonl", _schema())
    assert not bad and good[0].column("note").to_pylist() == ["one\ttwo\r\nthree"]


def test_nul_bytes_in_csv_fields(path_kind):
    data = b"id,note\nok,fine\nx,a\x00b\nok2,fine\n"
    good, bad = _read(data, "csv", _schema())
    assert sum(b.num_rows for b in good) == 2
    assert [(r.reason, r.field, r.location) for r in bad] == [("control_character", "note", "line 3")]


def test_control_characters_allowed_by_schema_annotation(path_kind):
    schema = _schema(note={"cloakbeam.allowControlCharacters": True})
    good, bad = _read(b'{"id": "a", "note": "x\\u0000y"}\n', "jsonl", schema)
    assert not bad and good[0].column("note").to_pylist() == ["x\x00y"]


def test_csv_list_cell_too_deep_is_quarantined(path_kind):
    data = b'id,tags\na,"' + b"[" * 100_000 + b'"\nb,\n'
    good, bad = _read(data, "csv", _schema())
    assert sum(b.num_rows for b in good) == 1
    assert [(r.reason, r.location) for r in bad] == [("malformed_json", "line 2")]


def test_list_items_of_the_wrong_type_are_quarantined_not_a_crash(path_kind):
    assert [(r.reason, r.field) for r in _jsonl_case(b'{"id": "a", "tags": [1, {"x": 2}]}')] == [("wrong_type", "tags")]


def _avro(rows, schema) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, schema.parsed(), rows)
    return buf.getvalue()


def test_avro_non_finite_and_control_characters():
    schema = _schema()
    rows = [{"id": "a", "score": float("nan"), "note": None, "tags": None, "inner": None},
            {"id": "b\x00", "score": 1.0, "note": None, "tags": None, "inner": None},
            {"id": "c", "score": float("inf"), "note": None, "tags": None, "inner": None},
            {"id": "d", "score": 2.0, "note": "ok", "tags": ["t"], "inner": {"code": "k"}}]
    good, bad = _read(_avro(rows, schema), "avro", schema)
    assert sum(b.num_rows for b in good) == 1
    assert [(r.reason, r.field) for r in bad] == [("wrong_type", "score"), ("control_character", "id"), ("wrong_type", "score")]


def _parquet(table: pa.Table, **kw) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def test_parquet_non_finite_and_control_characters():
    t = pa.table({"id": ["a", "b\x01", "c", "d"], "score": [float("nan"), 1.0, float("-inf"), 2.0],
                  "tags": pa.array([None, None, ["x\x00"], ["fine"]], pa.list_(pa.string()))})
    good, bad = _read(_parquet(t), "parquet", _schema())
    assert sum(b.num_rows for b in good) == 1
    assert [(r.reason, r.field, r.location) for r in bad] == [("wrong_type", "score", "row 0"), ("control_character", "id", "row 1"), ("wrong_type", "score", "row 2")]
    good, bad = _read(_parquet(t), "parquet", _schema(score={"cloakbeam.allowNonFinite": True}, tags={"cloakbeam.allowControlCharacters": True}))
    assert [(r.reason, r.field) for r in bad] == [("control_character", "id")]


def _rows_table(n: int) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(n)], "note": [f"note {i} " * 5 for i in range(n)]})


def test_truncated_parquet_counts_are_unknown_and_say_so():
    data = _parquet(_rows_table(2000), row_group_size=500)
    good, bad = _read(data[: len(data) // 2], "parquet", _schema())
    assert not good
    assert [(r.reason, r.records, r.records_from) for r in bad] == [("corrupt_parquet", 0, "unknown")]


def test_damaged_parquet_row_group_counts_from_the_footer():
    data = bytearray(_parquet(_rows_table(2000), row_group_size=500, compression="zstd"))
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
    col = meta.row_group(2).column(1)
    start = col.data_page_offset
    data[start + 8 : start + 200] = b"\xff" * 192  # garbage inside row group 2's page
    good, bad = _read(bytes(data), "parquet", _schema(), batch_size=300)
    assert sum(b.num_rows for b in good) == 1500
    assert [(r.reason, r.records, r.records_from, r.location) for r in bad] == [("corrupt_parquet", 500, "parquet footer", "row group 2 (rows 1000-1499)")]


def test_avro_damaged_header_is_unknown_and_block_counts_say_where_they_come_from(tmp_path):
    schema = _schema()
    rows = [{"id": f"r{i}", "score": 1.0, "note": "n" * 40, "tags": None, "inner": None} for i in range(3000)]
    buf = io.BytesIO()
    fastavro.writer(buf, schema.parsed(), rows, sync_interval=4000)
    data = buf.getvalue()
    _, bad = _read(b"Obj\x01" + b"\x00" * 40, "avro", schema)
    assert [(r.reason, r.records, r.records_from) for r in bad] == [("corrupt_avro_header", 0, "unknown")]
    good, bad = _read(data[:-300], "avro", schema)
    assert bad and bad[-1].reason == "corrupt_avro_block" and bad[-1].records_from == "avro block header"
    assert sum(b.num_rows for b in good) + sum(r.records for r in bad) == 3000


def test_csv_with_header_only_and_binary_garbage_never_raise(path_kind):
    for data in (b"id,score\n", b"\x00\xff\xfe" * 100, b"\n\n\n", b'"' * 1000, b"id\n" + b"\x00" * 10_000):
        good, bad = _read(data, "csv", _schema())
        assert all(isinstance(r.reason, str) for r in bad)


def test_csv_writer_round_trip_of_hostile_strings_reconciles(path_kind):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "note"])
    for i in range(50):
        w.writerow([f"r{i}", "\u202e" + "x" * i if i % 7 else "a\x00"])
    good, bad = _read(buf.getvalue().encode(), "csv", _schema())
    assert sum(b.num_rows for b in good) + sum(r.records for r in bad) == 50
    assert {r.reason for r in bad} == {"control_character"}


def test_a_csv_field_over_128_kib_is_judged_by_the_limits_on_both_paths(path_kind):
    schema = _schema(note={"cloakbeam.maxLength": 500_000})
    data = b"id,note\nok," + b"y" * 200_000 + b"\nx,\x00\n"
    good, bad = _read(data, "csv", schema)
    assert sum(b.num_rows for b in good) == 1 and [r.reason for r in bad] == ["control_character"]


def test_a_chunk_starting_with_a_null_line_is_not_handed_to_pyarrow(path_kind):
    """Found by tests/fuzz/fuzz_jsonl.py: pyarrow's JSON reader segfaults on a block whose first value is null,
    which took the whole worker process down. Such lines are wrong_type records; the neighbours survive."""
    good, bad = _read(b"null\n" + GOOD + b"\n1\n" + GOOD + b"\n", "jsonl", _schema())
    assert sum(b.num_rows for b in good) == 2
    assert [(r.reason, r.location) for r in bad] == [("wrong_type", "line 1"), ("wrong_type", "line 3")]


def test_a_reader_failing_mid_file_ends_in_a_read_error_with_an_unknown_count(monkeypatch):
    """Any parser error class (not only ValueError) is caught: the rows read so far stay, the rest is one
    read_error rejection whose count is unknown, and read_source itself never raises."""
    import cloakbeam.transforms.ingest as ingest

    real = ingest._read_chunk
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RecursionError("maximum recursion depth exceeded")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(ingest, "_read_chunk", flaky)
    good, bad = _read(b"".join(GOOD + b"\n" for _ in range(10)), "jsonl", _schema(), batch_size=4)
    assert sum(b.num_rows for b in good) == 4
    assert [(r.reason, r.records, r.records_from, r.detail) for r in bad] == [("read_error", 0, "unknown", "RecursionError")]


def test_csv_header_names_with_empty_parts_or_field_record_clashes(path_kind):
    """Found by tests/fuzz/fuzz_csv.py: a header ',.' made the line parser raise TypeError (read_error, records
    unknown). Empty-part names are skipped; 'inner' next to 'inner.code' names a field twice."""
    good, bad = _read(b",.\n,\n,\n", "csv", _schema())
    assert not good and [(r.reason, r.field) for r in bad] == [("missing_required", "id")] * 2
    good, bad = _read(b"id,inner,inner.code\na,x,y\n", "csv", _schema())
    assert not good and [(r.reason, r.field, r.records) for r in bad] == [("duplicate_key", "inner", 1)]
