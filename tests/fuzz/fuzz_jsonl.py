"""atheris target: JSONL ingest (vectorized and line-by-line paths, limits, duplicate keys, non-finite floats,
control characters). Run through tests/fuzz/run.py."""

import sys

import atheris

with atheris.instrument_imports(include=["cloakbeam"]):
    from cloakbeam.core.limits import IngestLimits
    from cloakbeam.tests.fuzz._harness import LIMITS_KW, check_text, fuzz_schema, run

SCHEMA = fuzz_schema()
LIMITS = IngestLimits(**LIMITS_KW)


def TestOneInput(data: bytes) -> None:
    check_text(data, "jsonl", SCHEMA, LIMITS)


if __name__ == "__main__":
    run(TestOneInput)
    sys.exit(0)
