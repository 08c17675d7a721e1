"""Shared helpers for the k-anonymity and generalize tests: a small schema, policies, tables and checks."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from cloakbeam.core.policy import CompiledPolicy
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.transforms.policy import compile_policy
from cloakbeam.transforms.protect import protect_batch
from cloakbeam.transforms.registry import ActionContext

PEOPLE = {
    "type": "record",
    "name": "Person",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "dob", "type": {"type": "int", "logicalType": "date"}},
        {"name": "zip", "type": "string"},
        {"name": "gender", "type": "string"},
        {"name": "age", "type": ["null", "int"], "default": None},
        {"name": "diagnosis", "type": "string"},
        {"name": "home", "type": {"type": "record", "name": "Home", "fields": [{"name": "city", "type": "string"}]}},
    ],
}

QI_HIERARCHIES: dict[str, dict[str, Any]] = {
    "dob": {"hierarchy": "date", "levels": ["month", "year", "decade"]},
    "zip": {"hierarchy": "prefix", "lengths": [3, 1]},
    "gender": {"hierarchy": "map", "levels": [{"known": ["f", "m"], "other": ["x"]}]},
    "age": {"hierarchy": "band", "widths": [5, 10, 20]},
    "home.city": {"hierarchy": "suppress"},
}


def people_schema():
    return schema_from_dict(PEOPLE, source="people.avsc")


def people_policy(qis: Sequence[str] = ("dob", "zip", "gender"), k: int = 3, l: int | None = None,
                  limit: float = 0.1, streaming: dict | None = None) -> CompiledPolicy:
    fields: dict[str, Any] = {"id": "drop", "diagnosis": "keep", "dob": "drop", "zip": "drop", "gender": "drop",
                              "age": "drop", "home.city": "keep"}
    for q in qis:
        fields[q] = {"action": "generalize", "level": "auto"}
    section: dict[str, Any] = {"k": k, "suppression_limit": limit,
                               "quasi_identifiers": {q: QI_HIERARCHIES[q] for q in qis}}
    if l is not None:
        section["sensitive"] = {"field": "diagnosis", "l": l}
    if streaming is not None:
        section["streaming"] = streaming
    return compile_policy({"version": 1, "dataset": "people", "fields": fields, "k_anonymity": section}, people_schema())


def people_batch(rows: Iterable[dict[str, Any]]) -> pa.RecordBatch:
    rows = list(rows)
    full = []
    for i, r in enumerate(rows):
        full.append({"id": f"p{i}", "dob": r.get("dob", dt.date(1980, 1, 1)), "zip": r.get("zip", "10001"),
                     "gender": r.get("gender", "f"), "age": r.get("age"), "diagnosis": r.get("diagnosis", "flu"),
                     "home": {"city": r.get("city", "Oslo")}})
    return pa.RecordBatch.from_pylist(full, schema=people_schema().arrow)


def protect(batch: pa.RecordBatch, policy: CompiledPolicy) -> pa.RecordBatch:
    return protect_batch(batch, policy, ActionContext(None))


def released_classes(rows: Iterable[dict[str, Any]], qis: Sequence[str]) -> dict[tuple, list[Any]]:
    """Released QI tuple -> list of sensitive values (rows as pylist dicts; dotted paths into nested dicts)."""
    out: dict[tuple, list[Any]] = defaultdict(list)
    for r in rows:
        key = tuple(_get(r, q) for q in qis)
        out[key].append(r.get("diagnosis"))
    return out


def _get(row: dict[str, Any], path: str) -> Any:
    cur: Any = row
    for part in path.split("."):
        cur = None if cur is None else cur.get(part)
    return cur


def check_k_l(rows: list[dict[str, Any]], qis: Sequence[str], k: int, l: int | None) -> None:
    for sens in released_classes(rows, qis).values():
        assert len(sens) >= k, f"class of size {len(sens)} < k={k}"
        if l is not None:
            assert len(set(sens)) >= l, f"class with {len(set(sens))} distinct sensitive values < l={l}"


def class_sizes(rows: list[dict[str, Any]], qis: Sequence[str]) -> Counter:
    return Counter(tuple(_get(r, q) for q in qis) for r in rows)
