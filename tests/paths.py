"""What many tests share: the repository root, the reference schema and policy, and a small nested schema."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "schemas" / "customers.avsc"
POLICY = REPO / "schemas" / "customers.policy.yaml"

#: A small nested schema (record inside a record, a date, a declared class) used by ingest and policy tests.
NESTED = {
    "type": "record",
    "name": "Patient",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "age", "type": ["null", "int"], "default": None},
        {
            "name": "contact",
            "type": ["null", {"type": "record", "name": "Contact", "fields": [
                {"name": "email", "type": "string", "cloakbeam.class": "EMAIL", "cloakbeam.maxLength": 50},
                {"name": "city", "type": ["null", "string"], "default": None},
            ]}],
            "default": None,
        },
        {"name": "visited", "type": {"type": "int", "logicalType": "date"}},
    ],
}
