"""Helpers for the runner tests: run the reference pipeline and read an output back, decrypted when possible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cloakbeam.tests.paths import POLICY, REPO, SCHEMA  # noqa: F401 - the reference policy for small inputs


def make_inputs(d: Path, rows: int = 1500, files: int = 2, dirty: float = 0.02) -> list[str]:
    """Reference customer records in `files` JSONL files (different seeds), a few corrupted for the quarantine."""
    from cloakbeam.schemas.generate import generate

    d.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        generate(d / f"customers-{i}.jsonl", rows, seed=100 + i, fmt="jsonl", dirty=dirty)
    return [str(d / "*.jsonl")]


def run_reference(inputs: list[str], out: Path, state: Path, runner: str, runner_options: dict | None = None, beam_args: list[str] | None = None, batch_size: int = 400) -> dict[str, Any]:
    from cloakbeam.pipeline.graph import RunSettings, run_pipeline

    return run_pipeline(
        RunSettings(
            dev=True,
            inputs=inputs,
            schema=str(SCHEMA),
            policy=str(POLICY),
            output=str(out),
            runner=runner,
            batch_size=batch_size,
            state_dir=str(state),
            overwrite=True,
            progress=False,
            runner_options=dict(runner_options or {}),
            beam_args=list(beam_args or []),
        )
    )


def _decryptor(out: Path, state: Path):
    """A function table -> table that decrypts every encrypted column, or None when the key layer has no API."""
    try:
        from cloakbeam.keys.decrypt import decrypt_table, encrypted_columns
        from cloakbeam.keys.service import KeyRef, collect_wrapped_keys, merge_wrapped_keys, open_key_service, read_parquet_wrapped_keys
    except ImportError:
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    ks = open_key_service(KeyRef(provider="local", path=str(state / "keyring.json")))
    shared = collect_wrapped_keys(str(out), manifest)

    def decrypt(path: Path, table: pa.Table) -> pa.Table:
        if not encrypted_columns(table.schema):
            return table
        return decrypt_table(table, ks, merge_wrapped_keys(shared, read_parquet_wrapped_keys(str(path))))

    return decrypt


def read_output(out: Path, state: Path) -> dict[str, pa.Table]:
    """Relative data-file path -> table, with encrypted columns decrypted (or reduced to their nullness when no
    decryption API exists), schema metadata removed (it holds per-run wrapped keys)."""
    decrypt = _decryptor(out, state)
    tables = {}
    for f in sorted((out / "data").rglob("*.parquet")):
        t = _read_parquet(f, state)
        if decrypt is not None:
            t = decrypt(f, t)
        else:
            cols = [pc_is_valid(c) if pa.types.is_binary(c.type) else c for c in t.columns]
            t = pa.table(cols, names=t.column_names)
        tables[f.relative_to(out).as_posix()] = t.replace_schema_metadata(None)
    return tables


def _read_parquet(path: Path, state: Path) -> pa.Table:
    """Read one output file; with the keyring's decryption properties if it uses Parquet modular encryption."""
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException):
        from cloakbeam.keys.parquet_encryption import reader_kwargs
        from cloakbeam.keys.service import KeyRef, open_key_service

        ks = open_key_service(KeyRef(provider="local", path=str(state / "keyring.json")))
        try:
            return pq.read_table(path, **reader_kwargs(ks))
        finally:
            ks.close()


def pc_is_valid(col: pa.ChunkedArray) -> pa.ChunkedArray:
    import pyarrow.compute as pc

    return pc.is_valid(col)


def comparable_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """The parts of a manifest that must not depend on the runner."""
    return {
        "counts": m["counts"],
        "reconciled": m["reconciled"],
        "quarantine_reasons": m["quarantine_reasons"],
        "field_stats": m["field_stats"],
        "inputs": [{k: v for k, v in i.items() if k != "path"} | {"name": Path(i["path"]).name} for i in m["inputs"]],
        "outputs": sorted((o["path"], o["rows"]) for o in m["outputs"]),
        "quarantine": sorted((q["path"], q["rows"]) for q in m["quarantine"]),
        "fields": m["fields"],
        "dropped_fields": m["dropped_fields"],
        "splits": (m.get("sections", {}).get("splits") or {}).get("counts"),
        # DP results are noisy by design; what must agree is which statistics and partitions were computed.
        "dp_statistics": sorted((s["name"], tuple(sorted(s["results"] or {}))) for s in (m.get("sections", {}).get("dp_statistics") or {}).get("statistics", [])),
    }



import apache_beam as _beam


class PidDoFn(_beam.DoFn):
    """Tags each element with the id of the process that handled it (importable, so workers can unpickle it)."""

    def process(self, element):
        import os

        yield (element, os.getpid())


class BundleTagDoFn(_beam.DoFn):
    """Tags each element with an id of the bundle (on Dask: the partition) that processed it."""

    def start_bundle(self):
        import uuid

        self.bundle = uuid.uuid4().hex

    def process(self, element):
        yield (element, self.bundle)


class TouchDoFn(_beam.DoFn):
    """Records every execution of process() as a file in `directory` (counts how often work is redone)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def process(self, element):
        import os
        import uuid

        open(os.path.join(self.directory, f"{element}-{uuid.uuid4().hex}"), "w").close()
        yield element


class AddSideFn(_beam.DoFn):
    def process(self, element, total):
        yield (element, total)
