"""Parse raw input files into RecordBatches that match the Avro input schema, or quarantine entries.

Plain Python, no Beam: `read_source` turns one file's bytes into a stream of `pa.RecordBatch` (each at most
`batch_size` rows) and `Rejected` entries. A rejected record carries a reason code, the field it concerns and its
location (line, row or byte offset), never the value in any message. The raw bytes of a rejected record travel
only inside the `Rejected` object to the quarantine writer, which seals them.

Formats: JSONL (one object a line), CSV (header row; nested fields as dotted column names), Avro (fastavro;
a corrupt block is skipped up to the next sync marker), Parquet (pyarrow; validated column-wise).
Validation: required fields present and non-null, types coercible, strings within `cloakbeam.maxLength`,
valid UTF-8, no key repeated in one object (`duplicate_key`), floats finite (`wrong_type`) unless the field says
`cloakbeam.allowNonFinite`, strings free of C0 control characters other than tab, CR and LF
(`control_character`) unless the field says `cloakbeam.allowControlCharacters`. Unknown extra fields are
ignored: the schema is the contract.

Limits (`cloakbeam.core.limits.IngestLimits`, the policy's `limits` section): a line longer than
`max_record_bytes` is `oversize` and is never held whole in memory; a JSON record nested deeper than `max_depth`
is `malformed_json` and is never handed to a parser (pyarrow's JSON reader crashes the process on 100k levels,
Python's raises RecursionError). No input makes `read_source` raise: every parser error class becomes a
rejection, and a reader that fails mid-file yields a `read_error` rejection for the rest of the file.

Counts: a rejection stands for `records` records and says where that number comes from (`records_from`): the
record itself ("record"), the Parquet footer ("parquet footer"), an Avro block header ("avro block header"),
the remaining lines of a CSV file ("remaining lines"), or nothing ("unknown", records = 0) when the damage hides
the count (a truncated Parquet footer, a damaged Avro header or block count).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.core.limits import IngestLimits
from cloakbeam.core.policy import register_section
from cloakbeam.schemas.avro import FieldInfo, InputSchema

FORMATS = ("jsonl", "csv", "avro", "parquet")
_EXT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".avro": "avro", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Rejected:
    """A record that could not be parsed or validated. `raw` is the record's bytes: seal it, never log it."""

    source: str
    location: str  # "line 12", "row 40", "byte offset 5120", "row group 2 (rows 1000-1499)"
    reason: str  # one of REASONS
    field: str | None
    raw: bytes  # at most the bytes the quarantine seals; `size` is the record's full size
    records: int = 1  # a corrupt Avro block or Parquet row group may stand for several records
    records_from: str = "record"  # where `records` comes from: one of RECORDS_FROM
    detail: str | None = None  # the limit broken ("max_depth 64") or the reader's error class; never a value
    size: int | None = None  # bytes of the original record when `raw` was cut

    def describe(self) -> str:
        where = f"{self.source}, {self.location}"
        return f"{self.reason} ({'field ' + self.field + ', ' if self.field else ''}{where})"


#: Every reason code ingest gives (actions add `invalid_value`; docs/limits-and-quarantine.md lists them all).
REASONS = (
    "malformed_json", "malformed_csv", "malformed_csv_header", "invalid_utf8", "wrong_type", "missing_required",
    "oversize", "duplicate_key", "control_character", "corrupt_avro_header", "corrupt_avro_block", "corrupt_parquet",
    "read_error",
)
RECORDS_FROM = ("record", "parquet footer", "avro block header", "remaining lines", "unknown")


class _Invalid(Exception):
    def __init__(self, reason: str, field: str | None, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.detail = detail


register_section("limits", lambda raw, schema, policy: IngestLimits.from_section(raw))

# Python's csv module refuses fields over 128 KiB (a DoS guard that pyarrow's reader does not share, so the two
# paths would disagree); lines are already capped by `max_record_bytes`, which is the limit that applies.
csv.field_size_limit(2**31 - 1)

# C0 control characters other than tab (\x09), LF (\x0a) and CR (\x0d).
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f]"
_CONTROL_RE = re.compile(_CONTROL)
_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(raw: bytes) -> int:
    """Nesting depth of the objects/arrays in one JSON text, brackets inside strings not counted.

    Vectorized: strings are blanked by one regex pass and the depth is the maximum of a cumulative sum over the
    remaining brackets (numpy). An unterminated string counts its brackets, which only makes a line that is
    malformed anyway look deeper."""
    stripped = _STRING_RE.sub(b'""', raw)
    arr = np.frombuffer(stripped, dtype=np.uint8)
    step = ((arr == 0x7B) | (arr == 0x5B)).astype(np.int32) - ((arr == 0x7D) | (arr == 0x5D)).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__("duplicate key")
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def loads_strict(text: str | bytes, max_depth: int) -> Any:
    """json.loads that refuses duplicate keys at any depth and texts deeper than `max_depth`.

    Raises _Invalid (malformed_json / duplicate_key); never RecursionError. The duplicate key is reported as a
    field only by `_field_for_key`, which names schema fields and nothing else."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth(raw) > max_depth:
        raise _Invalid("malformed_json", None, f"max_depth {max_depth}")
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as dup:
        raise _Invalid("duplicate_key", dup.key) from None
    except (ValueError, RecursionError, TypeError):
        raise _Invalid("malformed_json", None) from None


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


def _converter(info: FieldInfo, schema: InputSchema, text_input: bool, limits: IngestLimits | None = None) -> Converter:
    """Build a function that coerces one value of this field or raises _Invalid. Built once per field."""
    limits = limits or IngestLimits()
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
        children = [(f.name, _converter(f, schema, text_input, limits)) for p, f in schema.fields.items() if p.startswith(path + ".") and p.count(".") == path.count(".") + 1]

        def conv_record(v: Any) -> Any:
            v = required(v)
            if v is None:
                return None
            if not isinstance(v, dict):
                raise _Invalid("wrong_type", path)
            return {name: c(v.get(name)) for name, c in children}

        return conv_record
    if pa.types.is_string(t):
        allow_cc = info.allow_control_characters

        def conv_str(v: Any) -> Any:
            if v is None:
                return required(None)
            if not isinstance(v, str):
                raise _Invalid("wrong_type", path)
            if max_len is not None and len(v) > max_len:
                raise _Invalid("oversize", path)
            if not v and not info.nullable and info.avro_type == "string" and not text_input:
                raise _Invalid("missing_required", path)
            if not allow_cc and _CONTROL_RE.search(v):
                raise _Invalid("control_character", path)
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
        allow_nf = info.allow_non_finite

        def conv_float(v: Any) -> Any:
            v = required(v)
            if v is None:
                return None
            if isinstance(v, str) and text_input:
                try:
                    v = float(v)
                except ValueError:
                    raise _Invalid("wrong_type", path) from None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _Invalid("wrong_type", path)
            try:
                v = float(v)
            except OverflowError:  # an integer too large for a double
                raise _Invalid("wrong_type", path) from None
            if not allow_nf and not math.isfinite(v):
                raise _Invalid("wrong_type", path)
            return v

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
        width = t.byte_width if pa.types.is_fixed_size_binary(t) else None

        def conv_bytes(v: Any) -> Any:
            v = required(v)
            if isinstance(v, str):
                import base64
                import binascii

                try:
                    v = base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError):
                    raise _Invalid("wrong_type", path) from None
            if v is None or (isinstance(v, bytes) and (width is None or len(v) == width)):
                return v
            raise _Invalid("wrong_type", path)

        return conv_bytes
    if pa.types.is_list(t):
        item_field = t.value_field
        item = _converter(
            FieldInfo(path=path, arrow_type=item_field.type, nullable=item_field.nullable, max_length=info.max_length if pa.types.is_string(item_field.type) else None,
                      avro_type=None, allow_non_finite=info.allow_non_finite, allow_control_characters=info.allow_control_characters),
            schema, text_input, limits,
        )

        def conv_list(v: Any) -> Any:
            v = required(v)
            if v is None:
                return None
            if isinstance(v, str) and text_input:
                v = loads_strict(v, limits.max_depth)
            if not isinstance(v, list):
                raise _Invalid("wrong_type", path)
            return [item(x) for x in v]

        return conv_list
    raise _Invalid("unsupported_type", path)  # unreachable: the schema loader rejects other types


class RecordCoercer:
    """Coerces Python records (dicts) to the schema, accumulating valid rows into RecordBatches."""

    def __init__(self, schema: InputSchema, text_input: bool, limits: IngestLimits | None = None) -> None:
        self.schema = schema
        self.fields = [(f.name, _converter(schema.fields[f.name], schema, text_input, limits)) for f in schema.arrow]
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


def _field_for_key(schema: InputSchema, key: str | None) -> str | None:
    """The schema path a repeated JSON key names, or None when it names no schema field (then it could be data)."""
    if key is None:
        return None
    if key in schema.fields:
        return key
    matches = [p for p in schema.fields if p.rsplit(".", 1)[-1] == key]
    return matches[0] if len(matches) == 1 else None


# ---------------------------------------------------------------------------------------------- readers
Item = "pa.RecordBatch | Rejected"
_READ_BLOCK = 1 << 20


def read_source(
    fh: BinaryIO, source: str, fmt: str, schema: InputSchema, batch_size: int, limits: IngestLimits | None = None,
) -> Iterator[pa.RecordBatch | Rejected]:
    """Yield RecordBatches (each <= batch_size rows) and Rejected entries for one input stream; never raises on
    bad input (a reader failing mid-stream ends with one `read_error` rejection whose count is unknown)."""
    limits = limits or IngestLimits()
    if fmt == "jsonl":
        inner = _read_text(fh, source, schema, batch_size, limits, header=False)
    elif fmt == "csv":
        inner = _read_text(fh, source, schema, batch_size, limits, header=True)
    elif fmt == "avro":
        inner = _read_avro(fh, source, schema, batch_size, limits)
    elif fmt == "parquet":
        inner = _read_parquet(fh, source, schema, batch_size, limits)
    else:
        raise ValueError(f"unknown format {fmt}")
    yielded = 0
    while True:
        try:
            item = next(inner)
        except StopIteration:
            return
        except Exception as exc:  # any parser error class (RecursionError, MemoryError, ArrowException, ...)
            yield Rejected(source, f"after {yielded} batch(es) and rejection(s)", "read_error", None, b"", records=0,
                           records_from="unknown", detail=type(exc).__name__)
            return
        yielded += 1
        yield item


def _iter_lines(fh: BinaryIO, limits: IngestLimits) -> Iterator[tuple[bytes, int]]:
    """(line, full size) for every physical line, reading fixed blocks; a line over `max_record_bytes` is never
    held whole: only its first `quarantine_record_bytes` are kept and the rest is skipped up to its newline."""
    cap, keep = limits.max_record_bytes, limits.quarantine_record_bytes
    carry = b""
    skipping: tuple[bytes, int] | None = None  # (kept prefix, bytes seen) of an oversize line
    while True:
        block = fh.read(_READ_BLOCK)
        if not block:
            break
        if skipping is not None:
            nl = block.find(b"\n")
            if nl < 0:
                skipping = (skipping[0], skipping[1] + len(block))
                continue
            yield skipping[0], skipping[1] + nl + 1
            skipping = None
            block = block[nl + 1 :]
        data = carry + block if carry else block
        parts = data.split(b"\n")
        carry = parts.pop()
        for line in parts:
            yield (line + b"\n" if len(line) < cap else line[:keep]), len(line) + 1
        if len(carry) > cap:
            skipping, carry = (carry[:keep], len(carry)), b""
    if skipping is not None:
        yield skipping
    elif carry:
        yield carry, len(carry)


def _is_record(raw: bytes, size: int, limits: IngestLimits) -> bool:
    """A physical line is a record when it is not blank, or when it is over the size limit (it is then never
    looked at in full, so it counts, as `oversize`)."""
    return size > limits.max_record_bytes or bool(raw.strip())


def _read_text(fh: BinaryIO, source: str, schema: InputSchema, batch_size: int, limits: IngestLimits, header: bool) -> Iterator[pa.RecordBatch | Rejected]:
    """Read a text format chunk by chunk (at most batch_size lines a chunk).

    Fast path: pyarrow's vectorized JSON/CSV reader parses the whole chunk against the schema, then
    `validate_batch` checks required fields, lengths, finiteness and control characters column-wise. If the
    chunk does not parse (a malformed line, a wrong type, a repeated key, invalid UTF-8), that chunk alone is
    re-read line by line so each bad line is located and quarantined without losing its neighbours. Limits are
    checked first and the same way for both paths. Clean input never pays for per-line Python parsing.
    """
    fmt = "csv" if header else "jsonl"
    header_line: bytes | None = None
    columns: list[str] | None = None
    lineno = 0
    chunk: list[tuple[int, bytes]] = []
    lines = _iter_lines(fh, limits)
    if header:
        for raw, size in lines:
            lineno += 1
            reason, field = "malformed_csv_header", None
            try:
                if size > limits.max_record_bytes:
                    raise ValueError("header over max_record_bytes")
                columns = next(csv.reader([raw.decode("utf-8")]))
                header_line = raw if raw.endswith(b"\n") else raw + b"\n"
                aliases = schema.source_names
                if aliases and any(c in aliases for c in columns):
                    # Headers that are not Avro names (`marital-status`) map to their field by cloakbeam.source_name.
                    columns = [aliases.get(c, c) for c in columns]
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="\n").writerow(columns)
                    header_line = buf.getvalue().encode("utf-8")
                dups = _header_conflicts(columns)
                if dups:
                    # Two columns of one name: which one is the field is ambiguous, so no line can be trusted.
                    reason, field = "duplicate_key", next((c for c in dups if c in schema.fields), None)
                    raise ValueError("duplicate header column")
            except (UnicodeDecodeError, csv.Error, StopIteration, ValueError):
                # Without a usable header no line can be mapped to fields: quarantine the whole file as one entry
                # that counts every remaining non-empty line.
                rest = sum(1 for line, n in lines if _is_record(line, n, limits))
                yield Rejected(source, f"line {lineno}", reason, field, raw[: limits.quarantine_record_bytes], records=rest,
                               records_from="remaining lines", size=size)
                return
            break
        if columns is None:
            return
    fast_ok = _fast_path_supported(schema, fmt, columns)
    cap = limits.max_record_bytes
    for raw, size in lines:
        lineno += 1
        if size > cap:
            yield Rejected(source, f"line {lineno}", "oversize", None, raw, detail=f"max_record_bytes {limits.max_record_bytes}", size=size)
            continue
        if not raw.strip():  # blank lines are not records (`_is_record`)
            continue
        chunk.append((lineno, raw if raw.endswith(b"\n") else raw + b"\n"))
        if len(chunk) >= batch_size:
            yield from _read_chunk(chunk, source, schema, fmt, columns, header_line, fast_ok, limits)
            chunk = []
    if chunk:
        yield from _read_chunk(chunk, source, schema, fmt, columns, header_line, fast_ok, limits)


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
        # "infer" rather than "ignore": pyarrow then checks keys the schema does not name too, so a repeated key
        # anywhere in a record fails the chunk (and the line-by-line path names the line). Safe only because
        # `_too_deep` keeps deep lines away from this parser.
        renamed = {v: k for k, v in schema.source_names.items()}  # field -> key in the file
        by_key = pa.schema([f.with_name(renamed.get(f.name, f.name)) for f in loose])
        table = pj.read_json(
            io.BytesIO(data),
            read_options=pj.ReadOptions(block_size=max(1 << 20, len(data) + 1)),
            parse_options=pj.ParseOptions(explicit_schema=by_key, unexpected_field_behavior="infer"),
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


def _too_deep(chunk: list[tuple[int, bytes]], data: bytes, max_depth: int) -> set[int]:
    """Line numbers of the JSON lines (joined in `data`) nested deeper than `max_depth`.

    Vectorized over the chunk: the positions of every opening bracket are found with numpy and counted per line
    (searchsorted + bincount); only a line with more opening brackets than the limit is measured exactly."""
    arr = np.frombuffer(data, dtype=np.uint8)
    opens = np.flatnonzero((arr == 0x7B) | (arr == 0x5B))
    if len(opens) <= max_depth:
        return set()
    ends = np.cumsum(np.fromiter((len(raw) for _, raw in chunk), dtype=np.int64, count=len(chunk)))
    per_line = np.bincount(np.searchsorted(ends, opens, side="right"), minlength=len(chunk))
    return {chunk[i][0] for i in np.flatnonzero(per_line > max_depth).tolist() if json_depth(chunk[i][1]) > max_depth}


def _all_objects(chunk: list[tuple[int, bytes]], data: bytes) -> bool:
    """Whether every line of the chunk (joined in `data`) starts with '{' (vectorized: one gather of first bytes)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    lengths = np.fromiter((len(raw) for _, raw in chunk), dtype=np.int64, count=len(chunk))
    starts = np.cumsum(lengths) - lengths
    return bool((arr[starts] == 0x7B).all())


def _read_chunk(
    chunk: list[tuple[int, bytes]], source: str, schema: InputSchema, fmt: str,
    columns: list[str] | None, header_line: bytes | None, fast_ok: bool, limits: IngestLimits,
) -> Iterator[pa.RecordBatch | Rejected]:
    body = b"".join(raw for _, raw in chunk)
    if fmt == "jsonl":
        deep = _too_deep(chunk, body, limits.max_depth)
        if deep:
            for n, raw in chunk:
                if n in deep:
                    yield Rejected(source, f"line {n}", "malformed_json", None, raw[: limits.quarantine_record_bytes],
                                   detail=f"max_depth {limits.max_depth}", size=len(raw))
            chunk = [(n, raw) for n, raw in chunk if n not in deep]
            if not chunk:
                return
            body = b"".join(raw for _, raw in chunk)
    if fast_ok and fmt == "jsonl" and not _all_objects(chunk, body):
        # pyarrow 25's JSON reader segfaults on a block whose first value is `null` (found by tests/fuzz/fuzz_jsonl.py);
        # a line that does not start with '{' is not a record anyway, so such a chunk takes the line-by-line path.
        fast_ok = False
    if fast_ok:
        data = (header_line or b"") + body if header_line else body
        try:
            # pyarrow's JSON reader does not reject every invalid UTF-8 sequence inside strings; one
            # C-speed decode of the chunk does, and sends the chunk to the line-by-line path.
            data.decode("utf-8")
            batch = _fast_parse(data, schema, fmt, columns)
        except (pa.ArrowException, UnicodeDecodeError, KeyError, ValueError, OverflowError):
            batch = None
        if batch is not None and batch.num_rows == len(chunk):
            good, rejected = validate_batch(batch, schema, source, 0, lines=[n for n, _ in chunk], raws=[r for _, r in chunk], limits=limits)
            yield from rejected
            if good.num_rows:
                yield good
            return
    coercer = RecordCoercer(schema, text_input=fmt == "csv", limits=limits)
    for n, raw in chunk:
        try:
            text = raw.strip().decode("utf-8")
        except UnicodeDecodeError:
            yield Rejected(source, f"line {n}", "invalid_utf8", None, raw[: limits.quarantine_record_bytes], size=len(raw))
            continue
        try:
            record = loads_strict(text, limits.max_depth) if fmt == "jsonl" else _parse_csv_line(text, columns or [])
            coercer.rows.append(coercer.coerce(record))
        except _Invalid as bad:
            field = _field_for_key(schema, bad.field) if bad.reason == "duplicate_key" else bad.field
            yield Rejected(source, f"line {n}", bad.reason, field, raw[: limits.quarantine_record_bytes], detail=bad.detail, size=len(raw))
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
        # Dotted column names rebuild nested records; empty cells are nulls. A name with an empty part ("", "a.")
        # cannot name a schema field and is skipped; the header check has refused a name that is both a field and
        # a record ("a" and "a.b"), so every part below is a mapping.
        parts = name.split(".")
        if "" in parts:
            continue
        target = record
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = None if value == "" else value
    return record


def _header_conflicts(columns: list[str]) -> list[str]:
    """Column names given twice, or given both as a field and as a record of dotted fields ("a" and "a.b")."""
    from collections import Counter

    counts = Counter(c for c in columns if "" not in c.split("."))  # names with an empty part are skipped anyway
    names = set(counts)
    prefixes = {".".join(c.split(".")[:i]) for c in names for i in range(1, c.count(".") + 1)}
    return sorted({c for c, n in counts.items() if n > 1} | (names & prefixes))


def _read_avro(fh: BinaryIO, source: str, schema: InputSchema, batch_size: int, limits: IngestLimits) -> Iterator[pa.RecordBatch | Rejected]:
    """Walk the container block by block. A block whose size or sync marker does not check out is quarantined
    as one entry counting the records its header declares (or an unknown count when that number is damaged too),
    and reading resumes after the next sync marker."""
    import fastavro

    keep = limits.quarantine_record_bytes
    data = fh.read()
    head = io.BytesIO(data)
    try:
        fastavro.block_reader(head)
        header_end = head.tell()
        sync = _avro_sync(data, header_end)
    except Exception:  # fastavro raises assorted errors on a damaged header
        yield Rejected(source, "byte offset 0", "corrupt_avro_header", None, data[:keep], records=0, records_from="unknown", size=len(data))
        return
    header = data[:header_end]
    reader_schema = schema.parsed()
    coercer = RecordCoercer(schema, text_input=False, limits=limits)
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
            yield Rejected(source, f"byte offset {pos}", "corrupt_avro_block", None, data[pos : min(end, pos + keep)],
                           records=count or 0, records_from="avro block header" if count else "unknown", size=end - pos)
            pos = end
            continue
        for rec in records:
            index += 1
            try:
                coercer.rows.append(coercer.coerce(rec))
            except _Invalid as bad:
                raw = json.dumps(rec, default=str).encode()
                yield Rejected(source, f"record {index} (block at byte offset {pos})", bad.reason, bad.field, raw[:keep], detail=bad.detail, size=len(raw))
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


def _read_parquet(fh: BinaryIO, source: str, schema: InputSchema, batch_size: int, limits: IngestLimits) -> Iterator[pa.RecordBatch | Rejected]:
    """Validate a Parquet file row group by row group. A row group that does not decode is quarantined as one
    entry counting the rows the footer gives it; a file whose footer cannot be read has an unknown count."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fh)
        meta = pf.metadata
    except Exception:
        yield Rejected(source, "byte offset 0", "corrupt_parquet", None, b"", records=0, records_from="unknown")
        return
    offset = 0
    aliases = schema.source_names
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        try:
            # Decode the whole row group before yielding any of it, so a group that fails halfway is counted once.
            batches = list(pf.iter_batches(batch_size=batch_size, row_groups=[g]))
            if sum(b.num_rows for b in batches) != rows:
                raise ValueError("row count differs from the footer")
        except Exception as exc:
            yield Rejected(source, f"row group {g} (rows {offset}-{offset + rows - 1})", "corrupt_parquet", None, b"", records=rows,
                           records_from="parquet footer", detail=type(exc).__name__)
            offset += rows
            continue
        for batch in batches:
            if aliases:
                batch = batch.rename_columns([aliases.get(n, n) for n in batch.schema.names])
            good, rejected = validate_batch(batch, schema, source, offset, limits=limits)
            yield from rejected
            if good.num_rows:
                yield good
            offset += batch.num_rows


def validate_batch(
    batch: pa.RecordBatch, schema: InputSchema, source: str, row_offset: int,
    lines: list[int] | None = None, raws: list[bytes] | None = None, limits: IngestLimits | None = None,
) -> tuple[pa.RecordBatch, list[Rejected]]:
    """Column-wise validation of an already-typed batch: cast, required fields, string lengths, finite floats and
    control characters (nested fields and list items too).

    Rejected rows are located as "row N" (row_offset + index) or, when `lines` is given, as "line N"; their
    raw bytes come from `raws` when given, else from the row itself. The first failing check names the field.
    """
    keep = (limits or IngestLimits()).quarantine_record_bytes
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
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
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
            _mark_content(leaf, info, mark)
    loose = pa.RecordBatch.from_arrays(columns, schema=pa.schema([f.with_nullable(True) for f in schema.arrow]))
    bad = code >= 0
    rejected = []
    if bad.any():
        bad_rows = np.flatnonzero(bad)
        raw_rows = [raws[i] for i in bad_rows] if raws is not None else [json.dumps(r, default=str).encode() for r in loose.take(pa.array(bad_rows)).to_pylist()]
        for i, raw in zip(bad_rows.tolist(), raw_rows):
            reason, field = reasons[code[i]]
            where = f"line {lines[i]}" if lines is not None else f"row {row_offset + i}"
            rejected.append(Rejected(source, where, reason, field, raw[:keep], size=len(raw)))
        loose = loose.filter(pa.array(~bad))
    return loose.cast(schema.arrow), rejected


def _may_hold_controls(values: pa.Array) -> bool:
    """False when the string column's data buffer holds no C0 control byte other than tab, LF, CR: the common
    case costs one numpy pass over the bytes, and only a column that may hold one is matched per value (a sliced
    array's buffer may hold bytes outside the slice, which can only send it to the exact check)."""
    buffers = values.buffers()
    if len(buffers) < 3 or buffers[2] is None:
        return False
    d = np.frombuffer(buffers[2], dtype=np.uint8)
    low = d < 0x20
    return bool(low.any() and (low & (d != 0x09) & (d != 0x0A) & (d != 0x0D)).any())


def _mark_content(leaf: pa.Array, info: FieldInfo, mark: Callable[[np.ndarray, str, str], None]) -> None:
    """Non-finite floats (wrong_type) and C0 control characters (control_character), per row, vectorized; list
    items are checked through their parent row."""
    if isinstance(leaf, pa.ChunkedArray):
        leaf = leaf.combine_chunks()
    values, parents = leaf, None
    if pa.types.is_list(leaf.type):
        values = pc.list_flatten(leaf)
        parents = pc.list_parent_indices(leaf).to_numpy(zero_copy_only=False)
    if pa.types.is_floating(values.type) and not info.allow_non_finite:
        bad = pc.invert(pc.fill_null(pc.is_finite(values), True))
        reason = "wrong_type"
    elif pa.types.is_string(values.type) and not info.allow_control_characters:
        if not _may_hold_controls(values):
            return
        bad = pc.fill_null(pc.match_substring_regex(values, _CONTROL), False)
        reason = "control_character"
    else:
        return
    hits = bad.to_numpy(zero_copy_only=False)
    if parents is not None:
        rows = np.zeros(len(leaf), dtype=bool)
        rows[parents[hits]] = True
        hits = rows
    mark(hits, reason, info.path)


def _leaf(col: pa.Array, parts: list[str]) -> pa.Array:
    for p in parts:
        col = pc.struct_field(col, p)
    return col
