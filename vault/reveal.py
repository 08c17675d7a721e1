"""The reveal mechanisms the reveal service runs after it has authorized and audited a request.

- `decrypt_parquet(source, key_service, vault, columns)`: yields (row group table with the chosen encrypted
  columns decrypted, unreadable cells per column) for one Parquet file (a path or the bytes a client sent).
  Column DEKs are sealed (keys/sealing.py), so `key_service` must have the reveal keyring attached; subject-linked
  columns take their per-subject keys from the vault, and cells of forgotten subjects come back null.
- `open_quarantine_lines(lines, key_service, dataset)`: the sealed quarantine records of one quarantine file.
- `encrypted_targets(schema, columns)`: which encrypted columns a request names (ConfigError for others).

Nothing here checks a grant or writes an audit entry: that is `cloakbeam.vault.service.RevealCore`, the only
caller. Nothing here logs a value.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cloakbeam.errors import ConfigError, IntegrityError
from cloakbeam.keys.decrypt import decrypt_table, encrypted_columns
from cloakbeam.keys.service import read_parquet_wrapped_keys


def encrypted_targets(schema: pa.Schema, columns: Sequence[str] | None) -> list[str]:
    """The encrypted column paths a request targets (all when `columns` is None), sorted."""
    enc = encrypted_columns(schema)
    if columns is None:
        return sorted(enc)
    unknown = sorted(set(columns) - set(enc))
    if unknown:
        raise ConfigError(f"column '{unknown[0]}' is not an encrypted column; encrypted: {', '.join(sorted(enc)) or 'none'}")
    return sorted(set(columns))


def parquet_file(source: bytes | str, key_service: Any = None) -> pq.ParquetFile:
    """A Parquet file from bytes or a path; with Parquet-modular-encryption decryption properties when its columns
    need them (and `key_service` is given)."""

    def src() -> Any:
        return io.BytesIO(source) if isinstance(source, bytes) else source

    try:
        pf = pq.ParquetFile(src())
        if key_service is None or pf.num_row_groups == 0:
            return pf
        pf.read_row_group(0)
        return pf
    except OSError:
        if key_service is None:
            raise ConfigError("the request body is not a readable Parquet file") from None
    except Exception:
        raise ConfigError("the request body is not a readable Parquet file") from None
    from cloakbeam.keys.parquet_encryption import reader_kwargs

    try:
        return pq.ParquetFile(src(), **reader_kwargs(key_service))
    except Exception:
        raise ConfigError("the Parquet file is encrypted with keys this service cannot open") from None


def file_key_records(pf: pq.ParquetFile) -> list[dict[str, Any]]:
    from cloakbeam.keys.service import PARQUET_KEYS_METADATA

    raw = (pf.schema_arrow.metadata or {}).get(PARQUET_KEYS_METADATA.encode())
    if not raw:
        return []
    try:
        records = json.loads(raw)
    except ValueError:
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def decrypt_parquet(
    pf: pq.ParquetFile, key_service: Any, vault: Any, columns: Sequence[str], extra_records: Iterable[dict[str, Any]] = ()
) -> Iterator[tuple[pa.Table, dict[str, int]]]:
    """Decrypt `columns` of every row group of `pf`; yield (table, {column: cells without a key})."""
    from cloakbeam.keys.service import merge_wrapped_keys

    records = merge_wrapped_keys(list(extra_records), file_key_records(pf))
    subject_keys = vault.column_keys if vault is not None else None
    offset = 0
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i)
        unreadable: dict[str, int] = {}
        try:
            out = decrypt_table(table, key_service, records, columns=columns, subject_keys=subject_keys, unreadable=unreadable)
        except IntegrityError as exc:
            raise IntegrityError(f"row group {i} (rows from {offset}): {exc}") from None
        offset += table.num_rows
        yield out, unreadable


def open_quarantine_lines(lines: Iterable[bytes], key_service: Any, dataset: str) -> Iterator[dict[str, Any]]:
    """Each entry of a quarantine file with its sealed record opened into `record_base64`."""
    from cloakbeam.keys.quarantine import entry_location, open_quarantine_record

    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise IntegrityError("a quarantine line is not valid JSON") from None
        blob = entry.pop("record_sealed", None)
        if blob is None:
            continue
        raw = open_quarantine_record(base64.b64decode(blob), entry_location(entry), key_service, dataset)
        entry["record_base64"] = base64.b64encode(raw).decode("ascii")
        yield entry


def local_output_files(path: str) -> tuple[str, list[str]]:
    """(base directory, Parquet files) of an output directory or one file (for the --dev in-process mode)."""
    from pathlib import Path

    from cloakbeam.keys.decrypt import files_under

    base, files = files_under(Path(path))
    return str(base), [str(f) for f in files]


def manifest_records(base: str) -> list[dict[str, Any]]:
    """Wrapped DEK records an output's manifest carries (for files whose footer lacks them)."""
    from pathlib import Path

    from cloakbeam.keys.decrypt import manifest_near
    from cloakbeam.keys.service import collect_wrapped_keys

    manifest = manifest_near(Path(base))
    return collect_wrapped_keys(base, manifest) if manifest is not None else []


__all__ = ["decrypt_parquet", "encrypted_targets", "file_key_records", "open_quarantine_lines", "parquet_file", "read_parquet_wrapped_keys"]
