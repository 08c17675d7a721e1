"""Subject-disjoint train/validation/test splits: the `split` policy section and its plain functions.

    split: {by: customer_id, train: 0.8, validation: 0.1, test: 0.1}

Each record's split is a keyed digest of its subject: HMAC-SHA256 under the keyring's PRF key for the purpose
"split" over the subject's exact text, read as a number u in [0, 1) and placed by the declared fractions (in the
order written). The assignment depends on the subject value and the keyring only -- not on input order, batch
size, worker or runner -- so every record of one subject lands in the same split, on every run. The same
purpose key is used for every dataset, so tables joined on a subject keep that subject in one split.

Protect attaches the label to each protected batch as the hidden column `SPLIT_COLUMN`; k-anonymity passes it
through; the sink removes it and writes the rows under OUT/data/split=<name>/ (Hive-style partitions, read as a
`split` column by DuckDB, Polars, Spark and pyarrow datasets). A record without a subject cannot be placed and
goes to the quarantine (reason `missing_subject`). Digests never leave this process; nothing here logs a value.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.core.policy import CompiledPolicy, register_section
from cloakbeam.core.stats import RunStats
from cloakbeam.errors import PolicyError
from cloakbeam.schemas.avro import InputSchema
from cloakbeam.transforms.keyed import digest_words, keyed_digests

SECTION = "split"
SPLIT_COLUMN = "__cloakbeam_split"  # hidden column between Protect and the sink; never written
PARTITION_KEY = "split"  # the Hive partition name in OUT/data/split=<name>/
KEY_PURPOSE = "split"
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


def _err(msg: str) -> PolicyError:
    return PolicyError(f"split: {msg}")


@dataclass(frozen=True)
class SplitSpec:
    """The subject field and the ordered (name, fraction) pairs; picklable, holds no data."""

    by: str
    fractions: tuple[tuple[str, float], ...]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.fractions]

    def edges(self) -> np.ndarray:
        """Upper edges of each split on [0, 1); the last is exactly 1."""
        cum = np.cumsum([f for _, f in self.fractions])
        cum[-1] = 1.0
        return cum


def assign(subjects: pa.Array, key: bytes, spec: SplitSpec) -> pa.Array:
    """Split name per row (dictionary-encoded strings) from the keyed digest of each subject; null subject -> null.

    Vectorized: one HMAC per distinct subject (`keyed_digests`), then numpy over rows."""
    digests, index = keyed_digests(key, subjects, how="exact")
    words = digest_words(digests).astype(np.uint64) if len(digests) else np.zeros((0, 8), np.uint64)
    # 64 bits of the digest as u in [0, 1); float64 keeps 53 of them, far finer than any declared fraction.
    u = ((words[:, 0] << np.uint64(32)) | words[:, 1]).astype(np.float64) / float(2**64)
    code_per_value = np.searchsorted(spec.edges(), u, side="right").astype(np.int32)
    code_per_value = np.minimum(code_per_value, len(spec.fractions) - 1)
    codes = np.where(index >= 0, code_per_value[np.maximum(index, 0)] if len(code_per_value) else 0, -1).astype(np.int32)
    mask = codes < 0
    indices = pa.array(np.where(mask, 0, codes), pa.int32(), mask=mask)
    return pa.DictionaryArray.from_arrays(indices, pa.array(spec.names, pa.string()))


def subject_column(columns: Mapping[str, pa.Array], spec: SplitSpec) -> pa.Array:
    col = columns[spec.by]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def attach(protected: pa.RecordBatch, labels: pa.Array) -> pa.RecordBatch:
    """The protected batch with the hidden split column appended (schema metadata kept)."""
    meta = protected.schema.metadata
    out = pa.RecordBatch.from_arrays(list(protected.columns) + [labels], schema=protected.schema.append(pa.field(SPLIT_COLUMN, labels.type)))
    return out.replace_schema_metadata(meta)


def partitions(batch: pa.RecordBatch | pa.Table) -> list[tuple[str | None, pa.RecordBatch | pa.Table]]:
    """[(split name, rows of that split without the hidden column)]; [(None, batch)] when the batch has none."""
    names = batch.schema.names
    if SPLIT_COLUMN not in names:
        return [(None, batch)]
    i = names.index(SPLIT_COLUMN)
    labels = batch.column(i)
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    rest = batch.remove_column(i)
    if batch.num_rows == 0:
        return []
    plain = labels.dictionary_decode() if pa.types.is_dictionary(labels.type) else labels
    out: list[tuple[str | None, Any]] = []
    for name in pc.unique(plain).to_pylist():
        if name is None:
            raise ValueError("a record without a split label reached the sink")
        out.append((str(name), rest.filter(pc.equal(plain, name))))
    out.sort(key=lambda t: t[0] or "")
    return out


class SplitSection:
    """The compiled `split` section; the manifest calls its report `splits`."""

    manifest_name = "splits"

    def __init__(self, spec: SplitSpec) -> None:
        self.spec = spec

    def labels(self, columns: Mapping[str, pa.Array], ctx: Any) -> pa.Array:
        return assign(subject_column(columns, self.spec), ctx.keys.prf_key(KEY_PURPOSE), self.spec)

    def check(self, columns: Mapping[str, pa.Array], ctx: Any) -> None:
        """Per input batch: a record without a subject cannot be placed in a split; it is quarantined."""
        col = subject_column(columns, self.spec)
        if col.null_count:
            ctx.reject_rows(pc.is_null(col).to_numpy(zero_copy_only=False), "missing_subject", self.spec.by)

    def describe(self) -> dict[str, Any]:
        return {
            "by": self.spec.by,
            "fractions": dict(self.spec.fractions),
            "method": "HMAC-SHA256 of the subject under the keyring's PRF key for purpose 'split', read as u in [0,1)",
            "layout": f"data/{PARTITION_KEY}=<name>/ (Hive-style partitions)",
        }

    def report(self, run_stats: RunStats) -> dict[str, Any]:
        """Rows per split from the committed files; reconciles with `written`. Counts only."""
        rows: Counter[str] = Counter({n: 0 for n in self.spec.names})
        files: Counter[str] = Counter()
        for f in run_stats.files:
            if f.kind == "data" and f.split is not None:
                rows[f.split] += f.rows
                files[f.split] += 1
        written = int(run_stats.counts.get("written", 0))
        total = sum(rows.values())
        out: dict[str, Any] = {
            "policy": self.describe(),
            "counts": {n: int(rows[n]) for n in self.spec.names},
            "files": {n: int(files[n]) for n in self.spec.names},
            "shares": {n: (round(rows[n] / total, 6) if total else 0.0) for n in self.spec.names},
            "reconciled": total == written,
        }
        out["summary"] = ", ".join(f"{n} {rows[n]:,}" for n in self.spec.names) + (" (reconciled)" if total == written else f" != written {written:,}")
        return out


def _fraction(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1) or math.isnan(v):
        raise _err(f"'{name}' must be a fraction between 0 and 1 (for example 0.8)")
    return float(v)


def compile_section(value: Any, schema: InputSchema, policy: CompiledPolicy) -> SplitSection | None:
    """Validate `split` against the schema: fractions sum to 1, the subject is a leaf field of the input."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or "by" not in value:
        raise _err("the section must be a mapping such as {by: customer_id, train: 0.8, validation: 0.1, test: 0.1}")
    by = value["by"]
    if not isinstance(by, str) or by not in schema.fields:
        raise _err(f"subject field '{by}' is not in schema {schema.source}; 'by' names the field that identifies a subject")
    if schema.fields[by].is_record:
        raise _err(f"subject field '{by}' is a record; name a leaf field by dotted path")
    pairs: list[tuple[str, float]] = []
    for name, v in value.items():
        if name in ("by", "description"):
            continue
        if not isinstance(name, str) or not name or set(name) - _NAME_OK:
            raise _err(f"split name {name!r} must be lower-case letters, digits, '-' or '_' (it becomes a directory name)")
        pairs.append((name, _fraction(name, v)))
    if len(pairs) < 2:
        raise _err("declare at least two splits, for example train: 0.8 and test: 0.2")
    total = sum(f for _, f in pairs)
    if abs(total - 1.0) > 1e-9:
        raise _err(f"the fractions add up to {total:g}; they must add up to 1")
    if PARTITION_KEY in {p.split(".")[0] for p in policy.output_actions}:
        raise _err(f"the output already has a field named '{PARTITION_KEY}', which would clash with the partition column; rename or drop it")
    section = SplitSection(SplitSpec(by, tuple(pairs)))
    policy.checks.append(section.check)
    return section


register_section(SECTION, compile_section)
