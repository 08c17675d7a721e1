"""Parse raw input files into RecordBatches that match the Avro input schema, or quarantine entries.

Plain Python, no Beam: `read_source` turns one file's bytes into a stream of `pa.RecordBatch` (each at most
`batch_size` rows) and `Rejected` entries. A rejected record carries a reason code, the field it concerns and its
location (line, row or byte offset), never the value in any message. The raw bytes of a rejected record travel
only inside the `Rejected` object to the quarantine writer, which seals them.

Formats: JSONL (one object a line), CSV (header row; nested fields as dotted column names), Avro (fastavro;
a corrupt block is skipped up to the next sync marker), Parquet (pyarrow; validated column-wise).
Validation: required fields present and non-null, types coercible, strings within `cloakbeam.maxLength`,
valid UTF-8. Unknown extra fields are ignored: the schema is the contract.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.schemas.avro import FieldInfo, InputSchema

FORMATS = ("jsonl", "csv", "avro", "parquet")
_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".avro": "avro", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Rejected:
    """A record that could not be parsed or validated. `raw` is the record's bytes: seal it, never log it."""

    source: str
    location: str  # "line 12", "row 40", "byte offset 5120"
    reason: str  # malformed_json, malformed_csv, invalid_utf8, wrong_type, missing_required, oversize, corrupt_avro_block
    field: str | None
    raw: bytes
    records: int = 1  # a corrupt Avro block may stand for several records

    def describe(self) -> str:
        where = f"{self.source}, {self.location}"
        return f"{self.reason} ({'field ' + self.field + ', ' if self.field else ''}{where})"


class _Invalid(Exception):
    def __init__(self, reason: str, field: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def detect_format(path: str, explicit: str | None = None) -> str:
    if explicit:
        if explicit not in FORMATS:
            raise ValueError(f"unknown input format '{explicit}'; use one of {', '.join(FORMATS)}")
        return explicit
    import os

    base = path.lower()
    if base.endswith(".gz"):
        base = base[:-3]
    ext = os.path.splitext(base)[1]
    if ext not in _EXT:
        raise ValueError(f"cannot tell the format of {path} from its extension; pass --format")
    return _EXT[ext]


# ---------------------------------------------------------------------------------------------- converters
Converter = Callable[[Any], Any]


def _converter(info: FieldInfo, schema: InputSchema, text_input: bool) -> Converter:
    """Build a function that coerces one value of this field or raises _Invalid. Built once per field."""
    t = info.arrow_type
    path = info.path
    max_len = info.max_length

    def required(v: Any) -> Any:
        if v is None or (text_input and v == "" and not pa.types.is_string(t)):
            if info.nullable:
                return None
            raise _Invalid("missing_required", path)
        return v

    if info.is_record:
        children = [(f.name, _converter(f, schema, text_input)) for p, f in schema.fields.items() if p.startswith(path + ".") and p.count(".") == path.count(".") + 1]

        def conv_record(v: Any) -> Any:
            v = required(v)
            if v is None:
                return None
            if not isinstance(v, dict):
                raise _Invalid("wrong_type", path)
            return {name: c(v.get(name)) for name, c in children}

        return conv_record
    if pa.types.is_string(t):
        def conv_str(v: Any) -> Any:
            if v is None:
                return required(None)
            if not isinstance(v, str):
                raise _Invalid("wrong_type", path)
            if max_len is not None and len(v) > max_len:
                raise _Invalid("oversize", path)
            if not v and not info.nullable and info.avro_type == "string" and not text_input:
                raise _Invalid("missing_required", path)
            return v

        return conv_str
    if pa.types.is_boolean(t):
        def conv_bool(v: Any) -> Any:
            v = required(v)
            if v is None or isinstance(v, bool):
                return v
            if text_input and isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
                return v.lower() in ("true", "1")
            raise _Invalid("wrong_type", path)

        return conv_bool
    if pa.types.is_integer(t):
        lo, hi = (-(2**31), 2**31 - 1) if t == pa.int32() else (-(2**63), 2**63 - 1)

        def conv_int(v: Any) -> Any:
            v = required(v)
            if v is None:
                return None
            if isinstance(v, str) and text_input:
                try:
                    v = int(v)
                except ValueError:
                    raise _Invalid("wrong_type", path) from None
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise _Invalid("wrong_type", path)
            return v

        return conv_int
    if pa.types.is_floating(t):
        def conv_float(v: Any) -> Any:
            v = required(v)
            if v is None:
                return None
            if isinstance(v, str) and text_input:
                try:
                    return float(v)
                except ValueError:
                    raise _Invalid("wrong_type", path) from None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _Invalid("wrong_type", path)
            return float(v)

        return conv_float
    if pa.types.is_date32(t):
        def conv_date(v: Any) -> Any:
            v = required(v)
            if v is None or (isinstance(v, dt.date) and not isinstance(v, dt.datetime)):
                return v
            if isinstance(v, str):
                try:
                    return dt.date.fromisoformat(v)
                except ValueError:
                    pass
            raise _Invalid("wrong_type", path)

        return conv_date
    if pa.types.is_timestamp(t):
        def conv_ts(v: Any) -> Any:
            v = required(v)
            if v is None:
                return None
            if isinstance(v, dt.datetime):
                return v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)
            if isinstance(v, str):
                try:
                    parsed = dt.datetime.fromisoformat(v)
                except ValueError:
                    raise _Invalid("wrong_type", path) from None
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
            raise _Invalid("wrong_type", path)

        return conv_ts
    if pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t):
        def conv_bytes(v: Any) -> Any:
            v = required(v)
            if v is None or isinstance(v, bytes):
                return v
            if isinstance(v, str):
                import base64
                import binascii

                try:
                    return base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError):
                    pass
            raise _Invalid("wrong_type", path)

        return conv_bytes
    if pa.types.is_list(t):
        def conv_list(v: Any) -> Any:
            v = required(v)
            if v is None:
                return None
            if isinstance(v, str) and text_input:
                try:
                    v = json.loads(v)
                except ValueError:
                    raise _Invalid("wrong_type", path) from None
            if not isinstance(v, list):
                raise _Invalid("wrong_type", path)
            return v

        return conv_list
    raise _Invalid("unsupported_type", path)  # unreachable: the schema loader rejects other types


class RecordCoercer:
    """Coerces Python records (dicts) to the schema, accumulating valid rows into RecordBatches."""

    def __init__(self, schema: InputSchema, text_input: bool) -> None:
        self.schema = schema
        self.fields = [(f.name, _converter(schema.fields[f.name], schema, text_input)) for f in schema.arrow]
        self.rows: list[dict[str, Any]] = []

    def coerce(self, record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise _Invalid("wrong_type", None)
        return {name: conv(record.get(name)) for name, conv in self.fields}

    def flush(self) -> pa.RecordBatch:
        try:
            batch = pa.RecordBatch.from_pylist(self.rows, schema=self.schema.arrow)
        finally:
            self.rows = []
        return batch


# ---------------------------------------------------------------------------------------------- readers
Item = "pa.RecordBatch | Rejected"


def read_source(fh: BinaryIO, source: str, fmt: str, schema: InputSchema, batch_size: int) -> Iterator[pa.RecordBatch | Rejected]:
    """Yield RecordBatches (each <= batch_size rows) and Rejected entries for one input stream."""
    if fmt == "jsonl":
        yield from _read_text(fh, source, schema, batch_size, _parse_json_line, header=False)
    elif fmt == "csv":
        yield from _read_text(fh, source, schema, batch_size, None, header=True)
    elif fmt == "avro":
        yield from _read_avro(fh, source, schema, batch_size)
    elif fmt == "parquet":
        yield from _read_parquet(fh, source, schema, batch_size)
    else:
        raise ValueError(f"unknown format {fmt}")


def _parse_json_line(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise _Invalid("malformed_json", None) from None


def _read_text(fh: BinaryIO, source: str, schema: InputSchema, batch_size: int, parse: Callable[[str], Any] | None, header: bool) -> Iterator[pa.RecordBatch | Rejected]:
    # Per-line Python is unavoidable for text formats: a single bad line must be located and quarantined
    # without losing its neighbours, and json.loads / csv are C-implemented. Measured in benchmarks/bench_pipeline.py.
    coercer = RecordCoercer(schema, text_input=parse is None)
    columns: list[str] | None = None
    lineno = 0
    for raw in fh:
        lineno += 1
        if header and columns is None:
            try:
                columns = next(csv.reader([raw.decode("utf-8")]))
            except (UnicodeDecodeError, csv.Error, StopIteration):
                # Without a header no line can be mapped to fields: quarantine the whole file as one entry
                # that counts every remaining non-empty line.
                rest = sum(1 for line in fh if line.strip())
                yield Rejected(source, f"line {lineno}", "malformed_csv_header", None, raw, records=rest)
                return
            continue
        stripped = raw.strip()
        if not stripped:
            continue
        try:
            text = stripped.decode("utf-8")
        except UnicodeDecodeError:
            yield Rejected(source, f"line {lineno}", "invalid_utf8", None, raw)
            continue
        try:
            if parse is not None:
                record = parse(text)
            else:
                record = _parse_csv_line(text, columns or [])
            coercer.rows.append(coercer.coerce(record))
        except _Invalid as bad:
            yield Rejected(source, f"line {lineno}", bad.reason, bad.field, raw)
            continue
        if len(coercer.rows) >= batch_size:
            yield coercer.flush()
    if coercer.rows:
        yield coercer.flush()


def _parse_csv_line(text: str, columns: list[str]) -> dict[str, Any]:
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error:
        raise _Invalid("malformed_csv", None) from None
    if len(rows) != 1 or len(rows[0]) != len(columns):
        raise _Invalid("malformed_csv", None)
    record: dict[str, Any] = {}
    for name, value in zip(columns, rows[0]):
        # Dotted column names rebuild nested records; empty cells are nulls.
        target = record
        parts = name.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = None if value == "" else value
    return record


def _read_avro(fh: BinaryIO, source: str, schema: InputSchema, batch_size: int) -> Iterator[pa.RecordBatch | Rejected]:
    """Walk the container block by block. A block whose size or sync marker does not check out is quarantined
    as one entry counting the records its header declares, and reading resumes after the next sync marker."""
    import fastavro

    data = fh.read()
    head = io.BytesIO(data)
    try:
        fastavro.block_reader(head)
        header_end = head.tell()
        sync = _avro_sync(data, header_end)
    except Exception:  # fastavro raises assorted errors on a damaged header
        yield Rejected(source, "byte offset 0", "corrupt_avro_header", None, data[:4096], records=1)
        return
    header = data[:header_end]
    reader_schema = schema.parsed()
    coercer = RecordCoercer(schema, text_input=False)
    pos, index = header_end, 0
    while pos < len(data):
        block_end, count = _avro_block_bounds(data, pos, sync)
        records: list[Any] | None = None
        if block_end is not None:
            try:
                records = list(fastavro.reader(io.BytesIO(header + data[pos:block_end]), reader_schema=reader_schema))
            except Exception:
                records = None
        if records is None or (count is not None and len(records) != count):
            nxt = data.find(sync, pos)
            end = len(data) if nxt < 0 else nxt + len(sync)
            yield Rejected(source, f"byte offset {pos}", "corrupt_avro_block", None, data[pos:end], records=count or 1)
            pos = end
            continue
        for rec in records:
            index += 1
            try:
                coercer.rows.append(coercer.coerce(rec))
            except _Invalid as bad:
                yield Rejected(source, f"record {index} (block at byte offset {pos})", bad.reason, bad.field, json.dumps(rec, default=str).encode())
                continue
            if len(coercer.rows) >= batch_size:
                yield coercer.flush()
        pos = block_end
    if coercer.rows:
        yield coercer.flush()


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """Avro zig-zag varint at `pos`; returns (value, next position). Raises IndexError past the end."""
    shift = result = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
    return (result >> 1) ^ -(result & 1), pos


def _avro_sync(data: bytes, header_end: int) -> bytes:
    return data[header_end - 16 : header_end]


def _avro_block_bounds(data: bytes, pos: int, sync: bytes) -> tuple[int | None, int | None]:
    """(end of the block including its sync marker, declared record count); end is None when the block is damaged."""
    try:
        count, p = _read_long(data, pos)
        size, p = _read_long(data, p)
    except (IndexError, ValueError):
        return None, None
    sane_count = count if 0 < count < 50_000_000 else None
    end = p + size + 16
    if size < 0 or end > len(data) or data[p + size : end] != sync:
        return None, sane_count
    return end, sane_count


def _read_parquet(fh: BinaryIO, source: str, schema: InputSchema, batch_size: int) -> Iterator[pa.RecordBatch | Rejected]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fh)
    except Exception:
        yield Rejected(source, "byte offset 0", "corrupt_parquet", None, b"", records=1)
        return
    offset = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        good, rejected = validate_batch(batch, schema, source, offset)
        yield from rejected
        if good.num_rows:
            yield good
        offset += batch.num_rows


def validate_batch(batch: pa.RecordBatch, schema: InputSchema, source: str, row_offset: int) -> tuple[pa.RecordBatch, list[Rejected]]:
    """Column-wise validation of an already-typed batch (Parquet): cast, required, max length."""
    n = batch.num_rows
    bad_reason = np.full(n, None, dtype=object)
    columns = []
    for f in schema.arrow:
        info = schema.fields[f.name]
        if f.name not in batch.schema.names:
            col = pa.nulls(n, f.type)
        else:
            col = batch.column(f.name)
            if col.type != f.type:
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    _mark(bad_reason, np.ones(n, dtype=bool), ("wrong_type", f.name))
                    col = pa.nulls(n, f.type)
        if not info.nullable:
            _mark(bad_reason, pc.is_null(col).to_numpy(zero_copy_only=False), ("missing_required", f.name))
        for path, leaf_info in schema.fields.items():
            if (path == f.name or path.startswith(f.name + ".")) and leaf_info.max_length is not None and pa.types.is_string(leaf_info.arrow_type):
                leaf = _leaf(col, path.split(".")[1:])
                too_long = pc.fill_null(pc.greater(pc.utf8_length(leaf), leaf_info.max_length), False)
                _mark(bad_reason, too_long.to_numpy(zero_copy_only=False), ("oversize", path))
        columns.append(col)
    table = pa.RecordBatch.from_arrays(columns, schema=schema.arrow) if _nullable_ok(columns, schema) else pa.RecordBatch.from_arrays(columns, schema=_loose(schema.arrow))
    bad = np.array([r is not None for r in bad_reason], dtype=bool)
    rejected = []
    if bad.any():
        bad_rows = np.flatnonzero(bad)
        raw_rows = batch.take(pa.array(bad_rows)).to_pylist()
        for i, raw in zip(bad_rows.tolist(), raw_rows):
            reason, field = bad_reason[i]
            rejected.append(Rejected(source, f"row {row_offset + i}", reason, field, json.dumps(raw, default=str).encode()))
    good = table.filter(pa.array(~bad))
    if good.schema != schema.arrow:
        good = good.cast(schema.arrow)
    return good, rejected


def _mark(reasons: np.ndarray, mask: np.ndarray, reason: tuple[str, str]) -> None:
    empty = np.array([r is None for r in reasons], dtype=bool)
    for i in np.flatnonzero(mask & empty):
        reasons[i] = reason


def _leaf(col: pa.Array, parts: list[str]) -> pa.Array:
    for p in parts:
        col = pc.struct_field(col, p)
    return col


def _nullable_ok(columns: list[pa.Array], schema: InputSchema) -> bool:
    return all(f.nullable or c.null_count == 0 for f, c in zip(schema.arrow, columns))


def _loose(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])
