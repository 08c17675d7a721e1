"""Shared by the atheris targets in this folder (not itself a target: run.py runs `fuzz_*.py` only).

A target's input may end in any of cloakbeam's own refusals (CloakbeamError subclasses) or in quarantine
entries; every other exception, a failed invariant or a hang is a crash."""

from __future__ import annotations

import io
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "..", "..", "schemas", "customers.avsc")

# Small limits so that short mutated inputs still reach every limit path (depth, size, sealed-bytes cap).
LIMITS_KW = {"max_record_bytes": 2048, "max_depth": 16, "quarantine_record_bytes": 256}


def fuzz_schema() -> Any:
    """The reference customers schema plus a list, a nested record and a double, so every converter is reached."""
    import json

    from cloakbeam.schemas.avro import schema_from_dict

    doc = json.load(open(SCHEMA_PATH))
    doc["fields"] += [
        {"name": "tags", "type": ["null", {"type": "array", "items": "string"}], "default": None},
        {"name": "scores", "type": ["null", {"type": "array", "items": "double"}], "default": None},
        {"name": "home", "type": ["null", {"type": "record", "name": "Home", "fields": [
            {"name": "city", "type": "string"}, {"name": "lat", "type": ["null", "double"], "default": None}]}], "default": None},
    ]
    return schema_from_dict(doc, source="fuzz.avsc")


def expected_records(data: bytes, limits: Any, skip_header: bool) -> int:
    """How many records a text input holds: every physical line that is not blank or is over the size limit."""
    lines = data.split(b"\n")
    sizes = [len(line) + 1 for line in lines]
    sizes[-1] -= 1  # the last piece has no newline (and is empty when the data ends with one)
    pairs = [(line, size) for line, size in zip(lines, sizes) if size]
    if skip_header:
        pairs = pairs[1:]
    return sum(1 for line, size in pairs if size > limits.max_record_bytes or line.strip())


def check_text(data: bytes, fmt: str, schema: Any, limits: Any) -> None:
    """Read `data`; every record must come out as a row or as counted rejections, with known reason codes."""
    import pyarrow as pa

    from cloakbeam.transforms.ingest import REASONS, RECORDS_FROM, Rejected, read_source

    rows = rejected = 0
    for item in read_source(io.BytesIO(data), f"fuzz.{fmt}", fmt, schema, 37, limits):
        if isinstance(item, Rejected):
            assert item.reason in REASONS, item.reason
            assert item.records_from in RECORDS_FROM, item.records_from
            assert len(item.raw) <= max(limits.quarantine_record_bytes, limits.max_record_bytes + 1)
            assert item.field is None or item.field in schema.fields, item.field
            rejected += item.records
        else:
            assert isinstance(item, pa.RecordBatch) and item.schema.equals(schema.arrow), item.schema
            assert item.num_rows <= 37
            rows += item.num_rows
    expected = expected_records(data, limits, skip_header=fmt == "csv")
    assert rows + rejected == expected, (rows, rejected, expected)


def run(test_one_input: Any) -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
