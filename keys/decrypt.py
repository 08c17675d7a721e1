"""Decrypting the cells of an output table, and rewrapping an output's data keys.

Python API:
- `decrypt_table(table, key_service, records, columns=...)`: the mechanism only. It checks no role and writes
  no audit entry; the authorized, audited reveal path is the reveal service (`cloakbeam.vault.service`).
- `rewrap_output(dir, key_service)`: re-wrap every DEK recorded in the output's Parquet metadata and manifest
  under the newest KEK version (sealed DEKs: reseal their batch key to the newest reveal key version, which needs
  the reveal keyring attached to the key service); cells are not re-encrypted (the Parquet footers are rewritten, the manifest's
  file hashes updated and the manifest re-signed).

Errors name file, column and row index, never a value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cloakbeam.errors import ConfigError, IntegrityError, KeyAccessError
from cloakbeam.keys.cells import decrypt_column
from cloakbeam.keys.service import PARQUET_KEYS_METADATA, collect_wrapped_keys, read_parquet_wrapped_keys

MANIFEST_NAME = "manifest.json"


def encrypted_columns(schema: pa.Schema) -> dict[str, dict[str, Any]]:
    """Leaf path -> encrypt action description, for every column an `encrypt` action produced."""
    out: dict[str, dict[str, Any]] = {}

    def walk(prefix: str, f: pa.Field) -> None:
        path = prefix + f.name
        if pa.types.is_struct(f.type):
            for c in f.type:
                walk(path + ".", c)
            return
        raw = (f.metadata or {}).get(b"cloakbeam.action")
        if raw:
            try:
                desc = json.loads(raw)
            except ValueError:
                return
            if desc.get("action") == "encrypt":
                out[path] = desc
    for f in schema:
        walk("", f)
    return out


def _type_from_name(name: str) -> pa.DataType:
    simple = {
        "string": pa.string(), "large_string": pa.large_string(), "binary": pa.binary(), "large_binary": pa.large_binary(),
        "bool": pa.bool_(), "int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
        "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(), "uint64": pa.uint64(),
        "float": pa.float32(), "double": pa.float64(), "halffloat": pa.float16(), "date32[day]": pa.date32(), "date64[ms]": pa.date64(),
    }
    if name in simple:
        return simple[name]
    if name.startswith("timestamp["):
        inner = name[len("timestamp[") : -1]
        unit, _, tz = inner.partition(", tz=")
        return pa.timestamp(unit, tz or None)
    if name.startswith("time32[") or name.startswith("time64["):
        unit = name[7:-1]
        return pa.time32(unit) if name.startswith("time32") else pa.time64(unit)
    if name.startswith("duration["):
        return pa.duration(name[9:-1])
    if name.startswith("decimal128("):
        p, s = name[len("decimal128(") : -1].split(",")
        return pa.decimal128(int(p), int(s))
    raise IntegrityError(f"cannot restore values of recorded type '{name}'")


def files_under(path: Path) -> tuple[Path, list[Path]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        return path, files
    if path.is_file():
        return path.parent, [path]
    raise ConfigError(f"{path} does not exist")


def manifest_near(base: Path) -> dict[str, Any] | None:
    for d in (base, base.parent, base.parent.parent):
        m = d / MANIFEST_NAME
        if m.is_file():
            try:
                return json.loads(m.read_text())
            except ValueError:
                raise IntegrityError(f"{m} is not valid JSON") from None
    return None


def decrypt_table(
    table: pa.Table,
    key_service: Any,
    records: Sequence[dict[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    source: str = "",
    subject_keys: Any = None,
    unreadable: dict[str, int] | None = None,
) -> pa.Table:
    """Decrypt the encrypted columns of `table` (all, or those in `columns`). No authorization here: the reveal
    service (cloakbeam.vault.service) checks grants and audits before it calls this.

    Subject-linked columns (`subject` in their action metadata) use one key per subject: `subject_keys(ids)`
    returns {key id: DataKey} for the ids that still exist (the vault's column keys); cells of forgotten subjects
    come back null and are counted in `unreadable[column]`."""
    from cloakbeam.keys.cells import decrypt_column_keyed

    enc = encrypted_columns(table.schema)
    wanted = set(enc) if columns is None else set(columns)
    dataset = ((table.schema.metadata or {}).get(b"cloakbeam.dataset") or b"default").decode()
    lookup = key_service.key_lookup(records)

    def keyed(ids: Sequence[bytes]) -> dict[bytes, Any]:
        found: dict[bytes, Any] = {}
        rest = []
        for kid in ids:
            key = lookup(kid) if kid.hex() in by_id else None
            if key is not None:
                found[kid] = key
            else:
                rest.append(kid)
        if rest and subject_keys is not None:
            found.update(subject_keys(rest))
        return found

    by_id = {str(r.get("key_id")) for r in records}
    where = f"{source}: " if source else ""

    def rebuild(prefix: str, f: pa.Field, arr: pa.Array) -> tuple[pa.Field, pa.Array]:
        path = prefix + f.name
        if pa.types.is_struct(f.type):
            kids = [rebuild(path + ".", c, a) for c, a in zip(f.type, arr.flatten())]
            new_type = pa.struct([k[0] for k in kids])
            mask = arr.is_null() if arr.null_count else None
            out = pa.StructArray.from_arrays([k[1] for k in kids], fields=list(new_type), mask=mask)
            return pa.field(f.name, new_type, f.nullable, f.metadata), out
        if path not in enc or path not in wanted:
            return f, arr
        t = _type_from_name(str(enc[path].get("type", "binary")))
        try:
            if enc[path].get("subject"):
                plain, missing = decrypt_column_keyed(arr, keyed, dataset=dataset, column=path, value_type=t)
                if unreadable is not None:
                    unreadable[path] = unreadable.get(path, 0) + missing
            else:
                plain = decrypt_column(arr, lookup, dataset=dataset, column=path, value_type=t)
        except (IntegrityError, KeyAccessError) as exc:
            raise type(exc)(f"{where}{exc}") from None
        meta = dict(f.metadata or {})
        meta[b"cloakbeam.decrypted"] = b"true"
        return pa.field(f.name, t, True, meta), plain

    fields, arrays = [], []
    for f, col in zip(table.schema, table.columns):
        nf, na = rebuild("", f, col.combine_chunks())
        fields.append(nf)
        arrays.append(na)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def read_table(f: Path, key_service: Any) -> pa.Table:
    """Read a Parquet file, with Parquet-modular-encryption decryption properties when it needs them."""
    try:
        return pq.read_table(f)
    except OSError:
        from cloakbeam.keys.parquet_encryption import reader_kwargs

        return pq.read_table(f, **reader_kwargs(key_service))


def write_private_table(table: pa.Table, dest: Path) -> None:
    """Write a decrypted table with owner-only permissions."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")


def _rewrite_footer(f: Path, records_json: str) -> tuple[int, str]:
    """Rewrite Parquet file `f` with new wrapped-key metadata; cell bytes are copied, not re-encrypted."""
    import hashlib

    pf = pq.ParquetFile(f)
    meta = dict(pf.schema_arrow.metadata or {})
    meta[PARQUET_KEYS_METADATA.encode()] = records_json.encode()
    schema = pf.schema_arrow.with_metadata(meta)
    tmp = f.with_name(f.name + f".rewrap{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as fh:
        with pq.ParquetWriter(fh, schema, compression="zstd") as w:
            for i in range(pf.num_row_groups):
                rg = pf.read_row_group(i)
                w.write_table(rg.replace_schema_metadata(meta), row_group_size=max(1, rg.num_rows))
    os.replace(tmp, f)
    data = f.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _rewrap_quarantine(d: Path, key_service: Any) -> dict[str, tuple[int, str]]:
    """Re-wrap the data keys embedded in sealed quarantine records; returns rel path -> (bytes, sha256)."""
    import base64
    import hashlib

    from cloakbeam.keys.quarantine import rewrap_sealed

    out: dict[str, tuple[int, str]] = {}
    base = d / "quarantine"
    if not base.is_dir():
        return out
    for f in sorted(base.rglob("*.jsonl")):
        lines, changed = [], False
        for line in f.read_bytes().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            blob = entry.get("record_sealed")
            if blob:
                new = base64.b64encode(rewrap_sealed(base64.b64decode(blob), key_service)).decode("ascii")
                changed |= new != blob
                entry["record_sealed"] = new
            lines.append(json.dumps(entry, sort_keys=True).encode())
        if not changed:
            continue
        data = b"".join(x + b"\n" for x in lines)
        tmp = f.with_name(f.name + f".rewrap{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, f)
        out[f.relative_to(d).as_posix()] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def rewrap_output(out_dir: str | Path, key_service: Any) -> dict[str, int]:
    """Re-wrap every recorded DEK of an output under the newest KEK versions; return counts."""
    from cloakbeam.keys.signing import sign_manifest

    d = Path(out_dir)
    man_path = d / MANIFEST_NAME
    manifest = json.loads(man_path.read_text()) if man_path.is_file() else None
    _, files = files_under(d)
    records = collect_wrapped_keys(str(d), manifest)
    if not records and not (d / "quarantine").is_dir():
        raise ConfigError(f"{d} records no wrapped data keys; nothing to rewrap")
    newest = {}
    rewrapped: dict[str, dict[str, Any]] = {}
    from cloakbeam.keys.sealing import is_sealed

    for r in records:
        if is_sealed(r):  # resealed to the newest reveal key version (needs the reveal keyring)
            rewrapped[r["key_id"]] = key_service.rewrap_record(r)
            continue
        kek = r["kek"]
        if kek not in newest:
            newest[kek] = key_service.newest_kek_version(kek)
        if str(r["kek_version"]) == str(newest[kek]):
            rewrapped[r["key_id"]] = r
        else:
            rewrapped[r["key_id"]] = key_service.rewrap_record(r)
    changed = sum(1 for r in records if rewrapped[r["key_id"]] is not r)
    files_rewritten = 0
    skipped = 0
    stats: dict[str, tuple[int, str]] = {}
    for f in files:
        own = read_parquet_wrapped_keys(str(f))
        if not own:
            continue
        new = [rewrapped.get(r["key_id"], r) for r in own]
        if new == own:
            continue
        try:
            stats[f.relative_to(d).as_posix()] = _rewrite_footer(f, json.dumps(new, sort_keys=True))
        except OSError:
            # Parquet-modular-encrypted file: its footer cannot be rewritten without re-encrypting the
            # columns; the manifest (updated below) carries the rewrapped records for it.
            skipped += 1
            continue
        files_rewritten += 1
    qstats = _rewrap_quarantine(d, key_service)
    files_rewritten += len(qstats)
    if manifest is not None:
        for e in manifest.get("quarantine") or []:
            if e.get("path") in qstats:
                e["bytes"], e["sha256"] = qstats[e["path"]]

        def update(lst: Any) -> Any:
            return [rewrapped.get(r.get("key_id"), r) for r in lst] if isinstance(lst, list) else lst

        if "wrapped_keys" in manifest:
            manifest["wrapped_keys"] = update(manifest["wrapped_keys"])
        if isinstance(manifest.get("keys"), dict) and "wrapped_keys" in manifest["keys"]:
            manifest["keys"]["wrapped_keys"] = update(manifest["keys"]["wrapped_keys"])
        if isinstance(manifest.get("extra"), dict) and "wrapped_keys" in manifest["extra"]:
            manifest["extra"]["wrapped_keys"] = update(manifest["extra"]["wrapped_keys"])
        for e in manifest.get("outputs") or []:
            if e.get("path") in stats:
                e["bytes"], e["sha256"] = stats[e["path"]]
        tmp = man_path.with_name(man_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, man_path)
        sign_manifest(man_path, key_service)
    return {"keys": len(records), "rewrapped": changed, "files": files_rewritten, "skipped": skipped}
