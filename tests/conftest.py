"""Shared fixtures: every test gets its own state directory so no dev keyring or vault leaks between tests."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from cloakbeam.tests.paths import POLICY, REPO, SCHEMA  # noqa: F401  (re-exported for fixtures)

logging.getLogger("root").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("CLOAKBEAM_STATE_DIR", str(state / ".cloakbeam"))
    yield


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def customers_schema():
    from cloakbeam.schemas.avro import load_schema

    return load_schema(SCHEMA)


@pytest.fixture(scope="session")
def reference_inputs(tmp_path_factory):
    """The reference dataset in every format, 3,000 rows, 2% dirty (session-scoped: generated once)."""
    from cloakbeam.schemas.generate import generate

    d = tmp_path_factory.mktemp("reference")
    return {fmt: generate(d / f"customers.{fmt}", 3000, seed=7, fmt=fmt, dirty=0.02) for fmt in ("jsonl", "csv", "avro", "parquet")}


def pytest_collection_modifyitems(config, items):
    os.environ.setdefault("CLOAKBEAM_TEST", "1")
