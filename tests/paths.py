"""What many tests share: the repository root, the reference schema and policy, and a small nested schema."""

from __future__ import annotations

import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "schemas" / "customers.avsc"
REFERENCE_POLICY = REPO / "schemas" / "customers.policy.yaml"


def small_release_policy(reference: Path = REFERENCE_POLICY) -> Path:
    """The reference policy, word for word, except that its uniqueness scan reports without failing
    (`max_unique_fraction: 1`).

    Most tests run the reference policy on 150 to 3,000 records, to test ingest, tokens, keys, runners. A
    release that small singles people out whatever its generalization (3,000 records split by decade of birth,
    zip digit, diagnosis and the notes' template leave classes of one), so the scan would fail runs that test
    something else. The real policy is run on a demo-sized release by tests/pipeline/test_uniqueness_pipeline.py,
    and the demo itself by tests/cli/test_main.py."""
    text = reference.read_text()
    marker = "  max_unique_fraction: 0.01\n"
    assert marker in text, "the reference policy states its uniqueness threshold"
    out = Path(tempfile.mkdtemp(prefix="cloakbeam-tests-")) / "customers.policy.yaml"
    out.write_text(text.replace(marker, "  max_unique_fraction: 1   # tests on small inputs: measure and report only\n"))
    return out


#: The reference policy as tests on small inputs use it (see `small_release_policy`).
POLICY = small_release_policy()

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
