"""The input contract: load an Avro schema and derive the Arrow schema and per-field facts from it.

Supported Avro types: null unions (`["null", T]`), boolean, int, long, float, double, string, bytes, enum,
fixed, records (nested, addressed by dotted path), arrays, and the logical types date, timestamp-millis and
timestamp-micros. Anything else fails at construction with a SchemaError naming the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa

from cloakbeam.errors import SchemaError

DEFAULT_MAX_STRING_BYTES = 1 << 16

_PRIMITIVES: dict[str, pa.DataType] = {
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "string": pa.string(),
    "bytes": pa.binary(),
}


@dataclass(frozen=True)
class FieldInfo:
    """One field of the input schema, leaf or record, addressed by its dotted path."""

    path: str
    arrow_type: pa.DataType
    nullable: bool
    declared_class: str | None = None
    max_length: int | None = None
    is_record: bool = False
    avro_type: Any = None
    source_name: str | None = None  # the name in the input files when it is not a valid Avro name (CSV headers)
    #: `cloakbeam.allowNonFinite: true` on a float/double field (or array of them): NaN and +-Infinity pass.
    allow_non_finite: bool = False
    #: `cloakbeam.allowControlCharacters: true` on a string field (or array of strings): C0 controls pass.
    allow_control_characters: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass
class InputSchema:
    """A parsed Avro schema with its Arrow equivalent and a flat index of every field path."""

    avro: dict[str, Any]
    arrow: pa.Schema
    fields: dict[str, FieldInfo] = field(default_factory=dict)
    source: str = "<inline>"

    @property
    def leaf_paths(self) -> list[str]:
        return [p for p, f in self.fields.items() if not f.is_record]

    @property
    def top_level(self) -> list[str]:
        return [p for p in self.fields if "." not in p]

    @property
    def source_names(self) -> dict[str, str]:
        """Input-file name -> field name, for fields declaring `cloakbeam.source_name` (top level only)."""
        return {f.source_name: p for p, f in self.fields.items() if f.source_name is not None}

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.avro, sort_keys=True).encode()).hexdigest()

    def parsed(self) -> Any:
        """The fastavro-parsed schema (for readers and writers)."""
        return fastavro.parse_schema(self.avro)


def load_schema(path: str | Path) -> InputSchema:
    """Load and convert an `.avsc` file; raise SchemaError with a sentence a user can act on."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SchemaError(f"cannot read schema file {p}: {exc.strerror}") from None
    try:
        avro = json.loads(text, object_pairs_hook=_unique_keys)
    except _RepeatedKey as exc:
        raise SchemaError(f"schema file {p} repeats the key '{exc.key}' in one object; each key may appear once") from None
    except json.JSONDecodeError as exc:
        raise SchemaError(f"schema file {p} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise SchemaError(f"schema file {p} is nested too deeply to read") from None
    try:
        return schema_from_dict(avro, source=str(p))
    except RecursionError:
        raise SchemaError(f"schema file {p} is nested too deeply to read") from None


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__("repeated key")
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedKey(k)
        out[k] = v
    return out


def schema_from_dict(avro: dict[str, Any], source: str = "<inline>") -> InputSchema:
    if not isinstance(avro, dict) or avro.get("type") != "record":
        raise SchemaError(f"schema {source} must be an Avro record at the top level")
    try:
        fastavro.parse_schema(avro)
    except Exception as exc:  # fastavro raises several types; the message names the schema problem
        raise SchemaError(f"schema {source} is not a valid Avro schema: {exc}") from None
    index: dict[str, FieldInfo] = {}
    fields = [_convert_field(f, "", index, source) for f in avro["fields"]]
    _check_source_names(index, source)
    return InputSchema(avro=avro, arrow=pa.schema(fields), fields=index, source=source)


def _check_source_names(index: dict[str, FieldInfo], source: str) -> None:
    """`cloakbeam.source_name` maps a header such as `marital-status` (not an Avro name) to a field."""
    seen: dict[str, str] = {}
    for path, info in index.items():
        alias = info.source_name
        if alias is None:
            continue
        if "." in path:
            raise SchemaError(f"schema {source}: field '{path}': cloakbeam.source_name is supported on top-level fields only")
        if not isinstance(alias, str) or not alias:
            raise SchemaError(f"schema {source}: field '{path}': cloakbeam.source_name must be a non-empty string")
        if alias in index and alias != path:
            raise SchemaError(f"schema {source}: field '{path}': cloakbeam.source_name '{alias}' is the name of another field")
        if alias in seen:
            raise SchemaError(f"schema {source}: fields '{seen[alias]}' and '{path}' declare the same cloakbeam.source_name '{alias}'")
        seen[alias] = path


def _split_nullable(t: Any) -> tuple[Any, bool]:
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        if len(non_null) != 1:
            raise ValueError("only unions of null and one type are supported")
        return non_null[0], len(non_null) != len(t)
    return t, False


def _arrow_type(t: Any, path: str, index: dict[str, FieldInfo], source: str) -> tuple[pa.DataType, bool]:
    if isinstance(t, str):
        if t in _PRIMITIVES:
            return _PRIMITIVES[t], False
        raise SchemaError(f"schema {source}: field '{path}' has unsupported or named type '{t}'")
    kind = t.get("type")
    logical = t.get("logicalType")
    if logical == "date" and kind == "int":
        return pa.date32(), False
    if logical == "timestamp-micros" and kind == "long":
        return pa.timestamp("us", tz="UTC"), False
    if logical == "timestamp-millis" and kind == "long":
        return pa.timestamp("ms", tz="UTC"), False
    if kind == "record":
        # Children are nullable in Arrow: a null parent record makes every child null, which a non-nullable
        # Arrow child cannot hold. Required-ness of children is enforced by ingest from FieldInfo.nullable.
        children = [_convert_field(f, path + ".", index, source).with_nullable(True) for f in t["fields"]]
        return pa.struct(children), True
    if kind == "enum":
        return pa.string(), False
    if kind == "fixed":
        return pa.binary(int(t["size"])), False
    if kind == "array":
        item, nullable = _split_nullable(t["items"])
        item_type, is_rec = _arrow_type(item, path + "[]", {}, source)
        if is_rec:
            raise SchemaError(f"schema {source}: field '{path}' is an array of records, which is not supported")
        return pa.list_(pa.field("item", item_type, nullable=nullable)), False
    if isinstance(kind, str) and kind in _PRIMITIVES:
        return _PRIMITIVES[kind], False
    raise SchemaError(f"schema {source}: field '{path}' has unsupported type {json.dumps(t)}")


def _convert_field(f: dict[str, Any], prefix: str, index: dict[str, FieldInfo], source: str) -> pa.Field:
    name = f.get("name")
    if not name or "." in name:
        raise SchemaError(f"schema {source}: every field needs a name without dots (near '{prefix}{name}')")
    path = prefix + name
    try:
        inner, nullable = _split_nullable(f["type"])
    except ValueError as exc:
        raise SchemaError(f"schema {source}: field '{path}': {exc}") from None
    # Register the record before its children so the index lists parents first.
    index[path] = FieldInfo(path=path, arrow_type=pa.null(), nullable=nullable)
    arrow_type, is_record = _arrow_type(inner, path, index, source)
    max_len = f.get("cloakbeam.maxLength")
    if max_len is None and pa.types.is_string(arrow_type):
        max_len = DEFAULT_MAX_STRING_BYTES
    leaf_type = arrow_type.value_type if pa.types.is_list(arrow_type) else arrow_type
    allow_nf = f.get("cloakbeam.allowNonFinite", False)
    allow_cc = f.get("cloakbeam.allowControlCharacters", False)
    for key, value, ok in (("cloakbeam.allowNonFinite", allow_nf, pa.types.is_floating(leaf_type)),
                           ("cloakbeam.allowControlCharacters", allow_cc, pa.types.is_string(leaf_type))):
        if not isinstance(value, bool):
            raise SchemaError(f"schema {source}: field '{path}': '{key}' must be true or false")
        if value and not ok:
            kind = "float or double" if key == "cloakbeam.allowNonFinite" else "string"
            raise SchemaError(f"schema {source}: field '{path}': '{key}' applies to {kind} fields (or arrays of them) only")
    index[path] = FieldInfo(
        path=path,
        arrow_type=arrow_type,
        nullable=nullable,
        declared_class=f.get("cloakbeam.class"),
        max_length=max_len,
        is_record=is_record,
        avro_type=inner,
        source_name=f.get("cloakbeam.source_name"),
        allow_non_finite=allow_nf,
        allow_control_characters=allow_cc,
    )
    return pa.field(name, arrow_type, nullable=nullable)


def iter_leaves(schema: pa.Schema, prefix: str = "") -> Iterator[tuple[str, pa.Field]]:
    """Yield (dotted path, field) for every non-struct field of an Arrow schema."""
    for f in schema:
        yield from _iter_field(f, prefix)


def _iter_field(f: pa.Field, prefix: str) -> Iterator[tuple[str, pa.Field]]:
    path = prefix + f.name
    if pa.types.is_struct(f.type):
        for child in f.type:
            yield from _iter_field(child, path + ".")
    else:
        yield path, f
