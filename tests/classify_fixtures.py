"""Shared helpers for the classification, masking, pseudonymization and scrubbing tests (issue 3)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from cloakbeam.keys.service import KeyRef, ensure_local_keyring
from cloakbeam.schemas.avro import FieldInfo
from cloakbeam.transforms.registry import ActionContext, get_action


@dataclass(frozen=True)
class FakeRuntime:
    """Only what ActionContext reads: a key reference, run and dataset ids."""

    keys: KeyRef
    run_id: str = "test-run"
    dataset_id: str = "test"


def make_ctx(keyring: Path) -> ActionContext:
    """A fresh worker context on `keyring` (created when absent), as a DoFn.setup() would build it."""
    ensure_local_keyring(keyring)
    return ActionContext(FakeRuntime(keys=KeyRef(provider="local", path=str(keyring))))


def make_action(name: str, path: str, arrow_type: pa.DataType = pa.string(), declared: str | None = None, **params: Any):
    """Build a registered action for a one-field schema, as the policy compiler would."""
    info = FieldInfo(path=path, arrow_type=arrow_type, nullable=True, declared_class=declared)
    return get_action(name)(info, params)
