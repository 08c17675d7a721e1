"""The reveal path for encrypted output columns: authorize every column, decrypt, audit each decision.

`decrypt_output(path, key_service, role=..., purpose=..., roles=RolePolicy, columns=None, audit=None)` yields
(relative path, decrypted pa.Table) for every Parquet file under `path` (a file or an output directory). Every
encrypted column is checked against the role policy (action `decrypt`, domain = column path) before any cell is
read; each decision is appended to the audit log when one is given. Refused -> AccessDenied. The cell mechanism
itself is `cloakbeam.keys.decrypt`; this module adds the authorization and the audit trail and never logs a value.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cloakbeam.errors import AccessDenied, ConfigError, IntegrityError, KeyAccessError
from cloakbeam.keys.decrypt import decrypt_table, encrypted_columns, files_under, manifest_near, read_table
from cloakbeam.keys.service import collect_wrapped_keys, merge_wrapped_keys, read_parquet_wrapped_keys


def decrypt_output(
    path: str | Path,
    key_service: Any,
    *,
    role: str,
    purpose: str,
    roles: Any,
    columns: Sequence[str] | None = None,
    audit: Any = None,
) -> Iterator[tuple[str, pa.Table]]:
    """Yield (relative path, decrypted table) per Parquet file, after the role policy allows every column."""
    base, files = files_under(Path(path))
    if not files:
        raise ConfigError(f"no Parquet files under {path}")
    manifest = manifest_near(base)
    schema = pq.read_schema(files[0])
    enc = encrypted_columns(schema)
    if columns is not None:
        unknown = sorted(set(columns) - set(enc))
        if unknown:
            raise ConfigError(f"column '{unknown[0]}' is not an encrypted column of {files[0].name}; encrypted: {', '.join(sorted(enc)) or 'none'}")
    targets = sorted(enc if columns is None else columns)
    for col in targets:  # authorize every column before reading any cell
        try:
            roles.check(role, "decrypt", col, purpose)
        except AccessDenied:
            if audit is not None:
                audit.append("decrypt", role=role, purpose=purpose, domain=col, outcome="denied", count=0, detail="role policy")
            raise
    man_records = collect_wrapped_keys(str(base), manifest) if manifest is not None else []
    for f in files:
        rel = f.relative_to(base).as_posix() if base in f.parents else f.name
        records = merge_wrapped_keys(man_records, read_parquet_wrapped_keys(str(f)))
        table = read_table(f, key_service)
        try:
            out = decrypt_table(table, key_service, records, columns=targets, source=rel)
        except (IntegrityError, KeyAccessError):
            if audit is not None:
                for col in targets:
                    audit.append("decrypt", role=role, purpose=purpose, domain=col, outcome="error", count=0, detail=f"file:{rel}")
            raise
        if audit is not None:
            for col in targets:
                audit.append("decrypt", role=role, purpose=purpose, domain=col, outcome="allowed", count=table.num_rows, detail=f"file:{rel}")
        yield rel, out
