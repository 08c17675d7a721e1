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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

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
        aliases = self.schema.source_names
        if aliases:
            record = {aliases.get(k, k): v for k, v in record.items()}
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
    """Read a text format chunk by chunk (at most batch_size lines a chunk).

    Fast path: pyarrow's vectorized JSON/CSV reader parses the whole chunk against the schema, then
    `validate_batch` checks required fields and lengths column-wise. If the chunk does not parse (a malformed
    line, a wrong type, invalid UTF-8), that chunk alone is re-read line by line so each bad line is located
    and quarantined without losing its neighbours. Clean input never pays for per-line Python.
    """
    fmt = "jsonl" if parse is not None else "csv"
    header_line: bytes | None = None
    columns: list[str] | None = None
    lineno = 0
    chunk: list[tuple[int, bytes]] = []
    lines = iter(fh)
    if header:
        for raw in lines:
            lineno += 1
            try:
                columns = next(csv.reader([raw.decode("utf-8")]))
                header_line = raw if raw.endswith(b"\n") else raw + b"\n"
                aliases = schema.source_names
                if aliases and any(c in aliases for c in columns):
                    # Headers that are not Avro names (`marital-status`) map to their field by cloakbeam.source_name.
                    columns = [aliases.get(c, c) for c in columns]
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="\n").writerow(columns)
                    header_line = buf.getvalue().encode("utf-8")
            except (UnicodeDecodeError, csv.Error, StopIteration):
                # Without a header no line can be mapped to fields: quarantine the whole file as one entry
                # that counts every remaining non-empty line.
                rest = sum(1 for line in lines if line.strip())
                yield Rejected(source, f"line {lineno}", "malformed_csv_header", None, raw, records=rest)
                return
            break
        if columns is None:
            return
    fast_ok = _fast_path_supported(schema, fmt, columns)
    for raw in lines:
        lineno += 1
        if raw.strip():
            chunk.append((lineno, raw if raw.endswith(b"\n") else raw + b"\n"))
        if len(chunk) >= batch_size:
            yield from _read_chunk(chunk, source, schema, fmt, parse, columns, header_line, fast_ok)
            chunk = []
    if chunk:
        yield from _read_chunk(chunk, source, schema, fmt, parse, columns, header_line, fast_ok)


def _fast_path_supported(schema: InputSchema, fmt: str, columns: list[str] | None) -> bool:
    if fmt == "jsonl":
        return True
    # The CSV reader is flat: nested records (dotted column names) and lists take the line-by-line path.
    flat = all(not (f.is_record or pa.types.is_list(f.arrow_type) or pa.types.is_binary(f.arrow_type)) for f in schema.fields.values())
    return flat and columns is not None and len(set(columns)) == len(columns)


def _parse_schema(schema: InputSchema) -> pa.Schema:
    """The schema handed to pyarrow's readers: all nullable (validation is ours), dates read as strings."""

    def loosen(t: pa.DataType) -> pa.DataType:
        if pa.types.is_date(t):
            return pa.string()
        if pa.types.is_struct(t):
            return pa.struct([pa.field(f.name, loosen(f.type), True) for f in t])
        return t

    return pa.schema([pa.field(f.name, loosen(f.type), True) for f in schema.arrow])


def _fast_parse(data: bytes, schema: InputSchema, fmt: str, columns: list[str] | None) -> pa.RecordBatch:
    import pyarrow.csv as pcsv
    import pyarrow.json as pj

    loose = _parse_schema(schema)
    if fmt == "jsonl":
        renamed = {v: k for k, v in schema.source_names.items()}  # field -> key in the file
        by_key = pa.schema([f.with_name(renamed.get(f.name, f.name)) for f in loose])
        table = pj.read_json(
            io.BytesIO(data),
            read_options=pj.ReadOptions(block_size=max(1 << 20, len(data) + 1)),
            parse_options=pj.ParseOptions(explicit_schema=by_key, unexpected_field_behavior="ignore"),
        )
        if renamed:
            table = table.rename_columns([schema.source_names.get(n, n) for n in table.column_names])
    else:
        types = {f.name: f.type for f in loose if f.name in (columns or [])}
        table = pcsv.read_csv(
            io.BytesIO(data),
            read_options=pcsv.ReadOptions(block_size=max(1 << 20, len(data) + 1)),
            parse_options=pcsv.ParseOptions(newlines_in_values=False),
            convert_options=pcsv.ConvertOptions(
                column_types=types, strings_can_be_null=True, null_values=[""], true_values=["true", "1"], false_values=["false", "0"],
                include_columns=[c for c in (columns or []) if c in types],
            ),
        )
    cols = []
    for f in schema.arrow:
        col = table.column(f.name).combine_chunks() if f.name in table.schema.names else pa.nulls(table.num_rows, loose.field(f.name).type)
        cols.append(col.cast(_with_nullable(f.type)) if col.type != f.type else col)
    return pa.RecordBatch.from_arrays(cols, schema=pa.schema([f.with_nullable(True) for f in schema.arrow]))


def _with_nullable(t: pa.DataType) -> pa.DataType:
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _with_nullable(f.type), True) for f in t])
    return t


def _read_chunk(
    chunk: list[tuple[int, bytes]], source: str, schema: InputSchema, fmt: str, parse: Callable[[str], Any] | None,
    columns: list[str] | None, header_line: bytes | None, fast_ok: bool,
) -> Iterator[pa.RecordBatch | Rejected]:
    if fast_ok:
        data = (header_line or b"") + b"".join(raw for _, raw in chunk)
        try:
            # pyarrow's JSON reader does not reject every invalid UTF-8 sequence inside strings; one
            # C-speed decode of the chunk does, and sends the chunk to the line-by-line path.
            data.decode("utf-8")
            batch = _fast_parse(data, schema, fmt, columns)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeDecodeError, KeyError):
            batch = None
        if batch is not None and batch.num_rows == len(chunk):
            good, rejected = validate_batch(batch, schema, source, 0, lines=[n for n, _ in chunk], raws=[r for _, r in chunk])
            yield from rejected
            if good.num_rows:
                yield good
            return
    coercer = RecordCoercer(schema, text_input=parse is None)
    for n, raw in chunk:
        try:
            text = raw.strip().decode("utf-8")
        except UnicodeDecodeError:
            yield Rejected(source, f"line {n}", "invalid_utf8", None, raw)
            continue
        try:
            record = parse(text) if parse is not None else _parse_csv_line(text, columns or [])
            coercer.rows.append(coercer.coerce(record))
        except _Invalid as bad:
            yield Rejected(source, f"line {n}", bad.reason, bad.field, raw)
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
        pos = block_end  # type: ignore[assignment]  # not None here: the damaged-block branch continued
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
    aliases = schema.source_names
    for batch in pf.iter_batches(batch_size=batch_size):
        if aliases:
            batch = batch.rename_columns([aliases.get(n, n) for n in batch.schema.names])
        good, rejected = validate_batch(batch, schema, source, offset)
        yield from rejected
        if good.num_rows:
            yield good
        offset += batch.num_rows


def validate_batch(
    batch: pa.RecordBatch, schema: InputSchema, source: str, row_offset: int,
    lines: list[int] | None = None, raws: list[bytes] | None = None,
) -> tuple[pa.RecordBatch, list[Rejected]]:
    """Column-wise validation of an already-typed batch: cast, required fields, string lengths (nested too).

    Rejected rows are located as "row N" (row_offset + index) or, when `lines` is given, as "line N"; their
    raw bytes come from `raws` when given, else from the row itself. The first failing check names the field.
    """
    n = batch.num_rows
    code = np.full(n, -1, dtype=np.int32)  # index into `reasons` of the first problem found in each row
    reasons: list[tuple[str, str]] = []

    def mark(mask: np.ndarray, reason: str, field: str) -> None:
        hit = mask & (code < 0)
        if hit.any():
            code[hit] = len(reasons)
            reasons.append((reason, field))

    columns = []
    for f in schema.arrow:
        if f.name not in batch.schema.names:
            col = pa.nulls(n, _with_nullable(f.type))
        else:
            col = batch.column(f.name)
            if col.type != f.type and col.type != _with_nullable(f.type):
                try:
                    col = col.cast(_with_nullable(f.type))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    mark(np.ones(n, dtype=bool), "wrong_type", f.name)
                    col = pa.nulls(n, _with_nullable(f.type))
        columns.append(col)
        # Required fields at every depth: a child is required only where its parent record is present.
        for path, info in schema.fields.items():
            if path != f.name and not path.startswith(f.name + "."):
                continue
            parts = path.split(".")[1:]
            leaf = _leaf(col, parts)
            if not info.nullable:
                missing = pc.is_null(leaf)
                if parts:
                    parent = _leaf(col, parts[:-1])
                    missing = pc.and_(missing, pc.is_valid(parent))
                mark(missing.to_numpy(zero_copy_only=False), "missing_required", path)
            if info.max_length is not None and pa.types.is_string(info.arrow_type):
                too_long = pc.fill_null(pc.greater(pc.utf8_length(leaf), info.max_length), False)
                mark(too_long.to_numpy(zero_copy_only=False), "oversize", path)
    loose = pa.RecordBatch.from_arrays(columns, schema=pa.schema([f.with_nullable(True) for f in schema.arrow]))
    bad = code >= 0
    rejected = []
    if bad.any():
        bad_rows = np.flatnonzero(bad)
        raw_rows = [raws[i] for i in bad_rows] if raws is not None else [json.dumps(r, default=str).encode() for r in loose.take(pa.array(bad_rows)).to_pylist()]
        for i, raw in zip(bad_rows.tolist(), raw_rows):
            reason, field = reasons[code[i]]
            where = f"line {lines[i]}" if lines is not None else f"row {row_offset + i}"
            rejected.append(Rejected(source, where, reason, field, raw))
        loose = loose.filter(pa.array(~bad))
    return loose.cast(schema.arrow), rejected


def _leaf(col: pa.Array, parts: list[str]) -> pa.Array:
    for p in parts:
        col = pc.struct_field(col, p)
    return col
