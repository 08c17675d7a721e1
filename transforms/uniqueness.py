"""Quasi-identifier discovery: the uniqueness scan of the release, and the `uniqueness` policy section.

k-anonymity over a declared QI list protects only against the adversary the list imagines. The scan measures,
on the *released* (protected) records, every scanned column and every combination of up to `max_combination`
of them: the fraction of records that are unique on that combination, and the fraction in classes smaller
than k. A column or combination whose unique fraction exceeds `max_unique_fraction` fails the run, unless all
its columns are declared quasi-identifiers (k-anonymity then bounds their classes) or the policy accepts the
risk (`accept_risk`, with a reason recorded in the manifest).

Counting is vectorized and bounded. Each column is hashed once per batch (keyed SipHash-2-4 for strings via
pandas, a keyed 64-bit mixer for numbers and times; nulls have their own hash), a combination's hash mixes its
columns' hashes, and each combination keeps a *bottom-k sketch with counts*: the `exact_up_to` smallest
distinct hashes with their record counts. While a combination has at most that many distinct values the
sketch holds all of them and the figures are exact; beyond it the sketch is a uniform sample of the distinct
values (by hash order) whose counts are still exact, and the figures are estimated from it (KMV estimate of
the number of distinct values times the sample's share of singletons). Sketches merge by union, so the scan
is a Beam combiner whose memory does not grow with the data.

Nothing here imports Beam; `cloakbeam.transforms.kanon_beam.ScanUniqueness` is the adapter. Reports, errors
and sketches hold column names, counts, fractions and hashes, never a value.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.core.policy import CompiledPolicy, register_section
from cloakbeam.errors import CloakbeamError, PolicyError
from cloakbeam.schemas.avro import InputSchema
from cloakbeam.transforms import kanon as _kanon  # noqa: F401 - registers k_anonymity first: this section reads its QIs

SECTION = "uniqueness"
DEFAULT_MAX_UNIQUE_FRACTION = 0.01
DEFAULT_MAX_COMBINATION = 3
DEFAULT_EXACT_UP_TO = 1 << 14
#: Sketch entries (hash + count, 16 bytes each) over all combinations: bounds one accumulator's memory.
DEFAULT_BUDGET_ENTRIES = 1 << 23
MIN_SKETCH = 1024
_SECTION_KEYS = {"max_unique_fraction", "max_combination", "k", "exact_up_to", "accept_risk", "accept_reason", "description"}
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class UniquenessRiskError(CloakbeamError):
    """The release singles people out beyond the policy's limit (names columns and fractions, never values)."""


# =========================================================================================================
# Which columns are scanned
# =========================================================================================================
def keyed_reason(action: Any) -> str | None:
    """Why a released column cannot be matched against background knowledge, or None when it can.

    Ciphertexts, keyed surrogates and keyed tokens are computed with a key an outsider does not hold, so
    knowing a person's real value does not find their row. A token that keeps real trailing digits does
    show part of the value, and is scanned."""
    name = getattr(action, "name", "")
    opts = getattr(action, "options", {}) or {}
    if name == "encrypt":
        return "encrypted (AES-256-GCM cells): not computable without the key"
    if name == "pseudonymize":
        return "keyed surrogate: not computable without the key"
    if name == "tokenize" and not opts.get("keep_last"):
        return "keyed token: not computable without the key"
    return None


# =========================================================================================================
# Spec (picklable, compiled from the policy)
# =========================================================================================================
@dataclass(frozen=True)
class Acceptance:
    columns: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class ScanSpec:
    """What the scan measures and how it judges; picklable, holds no data."""

    columns: tuple[str, ...]  # scanned leaf paths
    combos: tuple[tuple[int, ...], ...]  # combinations measured (indexes into columns)
    exempt: tuple[tuple[tuple[int, ...], str], ...]  # combinations not measured, with why
    not_scanned: tuple[tuple[str, str], ...]  # released columns left out, with why
    k: int
    max_unique_fraction: float
    max_combination: int
    sketch_size: int  # distinct values kept per combination (exact up to this many)
    key: bytes  # 16 bytes for keyed hashing (deterministic per policy; never written)
    acceptances: tuple[Acceptance, ...] = ()
    qis: tuple[str, ...] = ()
    exact_up_to: int = DEFAULT_EXACT_UP_TO

    def names(self, combo: Sequence[int]) -> list[str]:
        return [self.columns[i] for i in combo]


def combinations(columns: Sequence[str], max_combination: int) -> list[tuple[int, ...]]:
    return [c for r in range(1, max_combination + 1) for c in itertools.combinations(range(len(columns)), r)]


# =========================================================================================================
# Hashing (vectorized)
# =========================================================================================================
def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective 64-bit mixer (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _key_words(key: bytes) -> tuple[np.uint64, np.uint64]:
    return np.uint64(int.from_bytes(key[:8], "little")), np.uint64(int.from_bytes(key[8:16], "little"))


_NULL_SALT = np.uint64(0x9E3779B97F4A7C15)


def column_hash(col: pa.Array, key: bytes) -> np.ndarray:
    """Keyed 64-bit hash per row (uint64). Equal values hash equally in every batch and worker; nulls get one
    hash of their own. Strings: SipHash-2-4 over the distinct values (pandas), taken back to the rows."""
    from pandas.util import hash_array

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    k0, k1 = _key_words(key)
    t = col.type
    n = len(col)
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    valid = ~col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.ones(n, np.bool_)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t):
        if pa.types.is_floating(t):
            v = pc.fill_null(col.cast(pa.float64()), 0.0).to_numpy(zero_copy_only=False)
            v = np.where(v == 0.0, 0.0, v)  # -0.0 == 0.0
            bits = v.view(np.uint64)
        elif pa.types.is_boolean(t):
            bits = pc.fill_null(col, False).to_numpy(zero_copy_only=False).astype(np.uint64)
        else:
            as_int = col if pa.types.is_integer(t) else col.view(pa.int32() if t.bit_width == 32 else pa.int64())
            bits = pc.fill_null(as_int, 0).to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
        h = _mix(_mix(bits ^ k0) ^ k1)
    else:
        strings = col if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) else _as_text(col)
        enc = pc.dictionary_encode(strings)
        idx = enc.indices.to_numpy(zero_copy_only=False)
        values = enc.dictionary.to_numpy(zero_copy_only=False).astype(object)
        hk = key.hex()[:16]  # pandas takes a 16-character key
        dict_h = hash_array(values, hash_key=hk, categorize=False) if len(values) else np.zeros(0, np.uint64)
        h = np.asarray(dict_h, np.uint64)[np.where(valid, idx, 0).astype(np.int64)] if len(values) else np.zeros(n, np.uint64)
        h = _mix(h ^ k1)
    null_hash = _mix(np.asarray([k0 ^ _NULL_SALT], np.uint64))[0]
    return np.where(valid, h, null_hash)


def _as_text(col: pa.Array) -> pa.Array:
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import json

        return pa.array([None if v is None else json.dumps(v, sort_keys=True, default=str) for v in col.to_pylist()], pa.string())


def combo_hash(hashes: Sequence[np.ndarray], combo: Sequence[int], key: bytes) -> np.ndarray:
    """One 64-bit hash per row for a combination of columns (order as given)."""
    _, k1 = _key_words(key)
    acc = np.full(len(hashes[combo[0]]), k1, np.uint64)
    with np.errstate(over="ignore"):
        for j in combo:
            acc = _mix(acc ^ hashes[j])
    return acc


# =========================================================================================================
# Sketches
# =========================================================================================================
@dataclass
class ComboSketch:
    """Bottom-k sketch with counts of one combination: the smallest distinct hashes and their record counts."""

    hashes: np.ndarray  # sorted uint64
    counts: np.ndarray  # int64, same length
    truncated: bool = False  # True once more than `size` distinct values were seen

    @classmethod
    def of(cls, h: np.ndarray, size: int) -> ComboSketch:
        u, c = np.unique(h, return_counts=True)
        return cls(u[:size], c[:size].astype(np.int64), len(u) > size)

    def merge(self, other: ComboSketch, size: int) -> ComboSketch:
        if not len(other.hashes):
            return ComboSketch(self.hashes, self.counts, self.truncated or other.truncated)
        if not len(self.hashes):
            return ComboSketch(other.hashes, other.counts, self.truncated or other.truncated)
        h = np.concatenate([self.hashes, other.hashes])
        c = np.concatenate([self.counts, other.counts])
        u, inv = np.unique(h, return_inverse=True)
        summed = np.bincount(inv.reshape(-1), weights=c, minlength=len(u)).astype(np.int64)
        return ComboSketch(u[:size], summed[:size], self.truncated or other.truncated or len(u) > size)


@dataclass
class ScanSketch:
    """The scan's accumulator: one ComboSketch per measured combination, and the number of records.
    `seconds`: worker seconds spent sketching (the stage timer; never part of the report's figures)."""

    rows: int = 0
    combos: list[ComboSketch] = field(default_factory=list)
    seconds: float = field(default=0.0, compare=False)

    def merge(self, other: ScanSketch, size: int) -> ScanSketch:
        seconds = self.seconds + other.seconds
        if not other.combos:
            self.rows += other.rows
            self.seconds = seconds
            return self
        if not self.combos:
            return ScanSketch(self.rows + other.rows, list(other.combos), seconds)
        return ScanSketch(self.rows + other.rows, [a.merge(b, size) for a, b in zip(self.combos, other.combos)], seconds)


def sketch_batch(columns: Mapping[str, pa.Array], spec: ScanSpec) -> ScanSketch:
    """The sketch of one released batch (vectorized: one hash per column, one unique per combination)."""
    n = len(next(iter(columns.values()))) if columns else 0
    if n == 0 or not spec.combos:
        return ScanSketch(n, [])
    hashes = [column_hash(columns[c], spec.key) for c in spec.columns]
    return ScanSketch(n, [ComboSketch.of(combo_hash(hashes, combo, spec.key), spec.sketch_size) for combo in spec.combos])


def merge_sketches(items: Sequence[ScanSketch], spec: ScanSpec) -> ScanSketch:
    out = ScanSketch()
    for s in items:
        out = out.merge(s, spec.sketch_size)
    return out


# =========================================================================================================
# Figures and verdict
# =========================================================================================================
@dataclass(frozen=True)
class ComboFigures:
    columns: tuple[str, ...]
    unique_fraction: float
    small_class_fraction: float
    distinct: int  # distinct combinations (estimated on the sketch path)
    method: str  # exact | sketch
    status: str = "ok"  # ok | fail | accepted | quasi-identifiers

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "unique_fraction": round(self.unique_fraction, 6),
                "small_class_fraction": round(self.small_class_fraction, 6), "distinct": self.distinct,
                "method": self.method, "status": self.status}


def combo_figures(sk: ComboSketch, rows: int, k: int) -> tuple[float, float, int, str]:
    """(unique fraction, fraction in classes < k, distinct values, method) of one combination."""
    if rows == 0 or not len(sk.hashes):
        return 0.0, 0.0, 0, "exact"
    counts = sk.counts
    if not sk.truncated:
        unique = int((counts == 1).sum())
        small = int(counts[counts < k].sum())
        return unique / rows, small / rows, int(len(counts)), "exact"
    m = len(counts)
    kth = float(sk.hashes[-1]) / 2.0**64
    distinct = (m - 1) / kth if kth > 0 else float(m)
    est_unique = distinct * float((counts == 1).mean())
    est_small = distinct * float(np.where(counts < k, counts, 0).mean())
    return min(est_unique / rows, 1.0), min(est_small / rows, 1.0), int(round(distinct)), "sketch"


def evaluate(sketch: ScanSketch, spec: ScanSpec) -> dict[str, Any]:
    """The scan's report: figures per combination, the failures (minimal ones), the verdict. No values."""
    rows = sketch.rows
    figures: list[ComboFigures] = []
    accepted_sets = {frozenset(a.columns) for a in spec.acceptances}
    for combo, sk in zip(spec.combos, sketch.combos):
        u, s, d, method = combo_figures(sk, rows, spec.k)
        if frozenset(spec.names(combo)) in accepted_sets:
            status = "accepted"
        else:
            status = "fail" if u > spec.max_unique_fraction else "ok"
        figures.append(ComboFigures(tuple(spec.names(combo)), u, s, d, method, status))
    failing = [f for f in figures if f.status == "fail"]
    failing_sets = [set(f.columns) for f in failing]
    minimal = [f for f in failing if not any(other < set(f.columns) for other in failing_sets)]
    riskiest = sorted((f for f in figures if f.status != "accepted"), key=lambda f: (-f.unique_fraction, len(f.columns), f.columns))[:20]
    accepted: list[dict[str, Any]] = []
    for a in spec.acceptances:
        hit = next((f for f in figures if set(f.columns) == set(a.columns)), None)
        accepted.append({"columns": list(a.columns), "reason": a.reason})
        if hit is not None:
            accepted[-1]["unique_fraction"] = round(hit.unique_fraction, 6)
    exempt_qi = [{"columns": spec.names(c), "reason": why} for c, why in spec.exempt if why.startswith("quasi-identifiers")]
    report: dict[str, Any] = {
        "passed": not failing,
        "records": rows,
        "max_unique_fraction": spec.max_unique_fraction,
        "max_combination": spec.max_combination,
        "k": spec.k,
        "sketch_size": spec.sketch_size,
        "scanned_columns": list(spec.columns),
        "not_scanned": dict(spec.not_scanned),
        "combinations_measured": len(figures),
        "combinations_exempt": len(spec.exempt),
        "exact": all(f.method == "exact" for f in figures),
        "failing": [f.to_json() for f in sorted(minimal, key=lambda f: (len(f.columns), -f.unique_fraction, f.columns))],
        "failing_total": len(failing),
        "riskiest": [f.to_json() for f in riskiest],
        "accepted": accepted,
        "quasi_identifier_combinations": len(exempt_qi),
    }
    report["summary"] = summary_line(report)
    if failing:
        report["error"] = failure_sentence(report, spec)
    return report


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def summary_line(rep: Mapping[str, Any]) -> str:
    head = (f"{rep['combinations_measured']} combinations of {len(rep['scanned_columns'])} released columns scanned "
            f"over {rep['records']:,} records")
    if rep["passed"]:
        top = rep["riskiest"][0] if rep["riskiest"] else None
        worst = f"; riskiest {'+'.join(top['columns'])} {_pct(top['unique_fraction'])} unique" if top else ""
        return f"passed: {head}{worst} (limit {_pct(rep['max_unique_fraction'])})"
    return f"FAILED: {head}; {rep['failing_total']} over the limit of {_pct(rep['max_unique_fraction'])}"


def _suggestion(columns: Sequence[str], spec: ScanSpec, kinds: Mapping[str, str]) -> str:
    tips = []
    for c in columns:
        kind = kinds.get(c, "")
        if kind == "number":
            tips.append(f"{c}: {{action: generalize, method: round, to: 1000}}")
        elif kind == "time":
            tips.append(f"{c}: {{action: generalize, method: truncate, to: month}}")
        elif kind == "generalized":
            tips.append(f"coarser levels for {c}")
    return ("; e.g. " + ", ".join(dict.fromkeys(tips))) if tips else ""


def failure_sentence(rep: Mapping[str, Any], spec: ScanSpec, kinds: Mapping[str, str] | None = None) -> str:
    """One sentence naming the failing columns (smallest combinations first) and their unique fractions."""
    parts = []
    for f in rep["failing"][:6]:
        cols = f["columns"]
        what = f"column '{cols[0]}' singles" if len(cols) == 1 else "columns " + " + ".join(f"'{c}'" for c in cols) + " single"
        est = " (estimated)" if f["method"] == "sketch" else ""
        parts.append(f"{what} out {_pct(f['unique_fraction'])}{est} of released records")
    more = len(rep["failing"]) - len(parts)
    listed = "; ".join(parts) + (f"; and {more} more combinations" if more > 0 else "")
    cols = list(dict.fromkeys(c for f in rep["failing"] for c in f["columns"]))
    return (f"uniqueness scan: {listed} (limit {_pct(spec.max_unique_fraction)} unique, uniqueness.max_unique_fraction). "
            f"Generalize them{_suggestion(cols, spec, kinds or {})}, declare them quasi-identifiers in k_anonymity, drop them, "
            f"or accept the risk with uniqueness.accept_risk: [{{columns: [{', '.join(rep['failing'][0]['columns'])}], reason: ...}}]")


# =========================================================================================================
# Policy section
# =========================================================================================================
def _err(msg: str) -> PolicyError:
    return PolicyError(f"uniqueness: {msg}")


def _fraction(v: Any, name: str) -> float:
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            v = float(v.strip()[:-1]) / 100.0
        except ValueError:
            raise _err(f"'{name}' must be a share such as 0.01 or '1%'") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise _err(f"'{name}' must be a share between 0 and 1 (e.g. 0.01; 1 measures and reports without failing) "
                   "or a percentage such as '1%'")
    return float(v)


def _acceptances(raw: Any, reason: Any, scanned: Sequence[str], released: Sequence[str],
                 not_scanned: Mapping[str, str]) -> tuple[Acceptance, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _err("'accept_risk' must be a list: [signup_ts] with 'accept_reason', or [{columns: [a, b], reason: ...}]")
    out = []
    for item in raw:
        if isinstance(item, str):
            cols = tuple(c.strip() for c in item.split("+"))
            why = reason
        elif isinstance(item, Mapping) and set(item) <= {"columns", "reason"} and "columns" in item:
            cols = tuple(item["columns"]) if isinstance(item["columns"], list) else (item["columns"],)
            why = item.get("reason", reason)
        else:
            raise _err("each 'accept_risk' entry is a column name, 'a+b' for a combination, or {columns: [a, b], reason: ...}")
        if not isinstance(why, str) or not why.strip():
            raise _err(f"accepting the risk of {'+'.join(map(str, cols))} needs a reason: write "
                       f"{{columns: [{', '.join(map(str, cols))}], reason: \"why this is acceptable\"}} or set 'accept_reason'")
        for c in cols:
            if c not in released:
                raise _err(f"'accept_risk' names '{c}', which is not a released field")
            if c not in scanned:
                raise _err(f"'accept_risk' names '{c}', which the scan does not measure ({not_scanned.get(c, 'keyed')}); remove it")
        out.append(Acceptance(cols, why.strip()))
    return tuple(out)


class UniquenessSection:
    """The compiled `uniqueness` section (always present: the scan is on by default, fail closed)."""

    def __init__(self, spec: ScanSpec, kinds: dict[str, str]) -> None:
        self.spec = spec
        self.kinds = kinds  # column -> number | time | text (for suggestions)

    def batch_transform(self, runtime: Any = None) -> Any:
        """PTransform over RecordBatch | RunStats elements: passes everything through and adds one RunStats
        holding the scan report (`extra.uniqueness`)."""
        from cloakbeam.transforms.kanon_beam import ScanUniqueness

        return ScanUniqueness(self.spec)

    def verdict(self, run_stats: Any) -> dict[str, Any] | None:
        return getattr(run_stats, "extra", {}).get(SECTION)

    def check(self, run_stats: Any) -> None:
        """Raise UniquenessRiskError when the run's scan failed (the launcher calls this before releasing)."""
        rep = self.verdict(run_stats)
        if rep is not None and not rep.get("passed", True):
            raise UniquenessRiskError(failure_sentence(rep, self.spec, self.kinds))

    def report(self, run_stats: Any) -> dict[str, Any]:
        """The manifest's `sections.uniqueness`: the policy and the scan's figures (names and fractions only)."""
        out: dict[str, Any] = {"policy": self.describe()}
        rep = self.verdict(run_stats)
        if rep is None:
            out["scanned"] = False
            out["summary"] = "not scanned (streaming runs are not scanned yet)"
            return out
        out.update(scanned=True, **{k: v for k, v in rep.items() if k != "error"})
        return out

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {
            "max_unique_fraction": s.max_unique_fraction,
            "max_combination": s.max_combination,
            "k": s.k,
            "exact_up_to": s.exact_up_to,
            "accept_risk": [{"columns": list(a.columns), "reason": a.reason} for a in s.acceptances],
            "quasi_identifiers": list(s.qis),
        }


def _kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_temporal(t):
        return "time"
    return "text"


def compile_section(value: Any, schema: InputSchema, policy: CompiledPolicy) -> UniquenessSection:
    """Compile the section (None = defaults): which released columns are scanned, the combinations, the exemptions."""
    raw = {} if value is None else value
    if not isinstance(raw, Mapping):
        raise _err("the section must be a mapping (max_unique_fraction, max_combination, accept_risk, ...)")
    unknown = sorted(set(raw) - _SECTION_KEYS)
    if unknown:
        raise _err(f"unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(_SECTION_KEYS))}")
    limit = _fraction(raw.get("max_unique_fraction", DEFAULT_MAX_UNIQUE_FRACTION), "max_unique_fraction")
    max_c = raw.get("max_combination", DEFAULT_MAX_COMBINATION)
    if isinstance(max_c, bool) or not isinstance(max_c, int) or not 1 <= max_c <= 5:
        raise _err("'max_combination' must be a whole number from 1 to 5")
    kanon = policy.sections.get("k_anonymity")
    k_default = kanon.spec.k if kanon is not None else 10
    k = raw.get("k", k_default)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise _err("'k' (the class size below which records count as in small classes) must be an integer of at least 2")
    exact = raw.get("exact_up_to", DEFAULT_EXACT_UP_TO)
    if isinstance(exact, bool) or not isinstance(exact, int) or exact < MIN_SKETCH:
        raise _err(f"'exact_up_to' must be a whole number of at least {MIN_SKETCH}")
    released = list(policy.output_actions)
    scanned, not_scanned = [], []
    for path in released:
        why = keyed_reason(policy.actions[path])
        if why is None:
            scanned.append(path)
        else:
            not_scanned.append((path, why))
    acceptances = _acceptances(raw.get("accept_risk"), raw.get("accept_reason"), scanned, released, dict(not_scanned))
    qis = tuple(q.path for q in kanon.spec.qis) if kanon is not None else ()
    all_combos = combinations(scanned, max_c)
    combos, exempt = [], []
    accepted_sets = [set(a.columns) for a in acceptances]
    for combo in all_combos:
        names = {scanned[i] for i in combo}
        acc = next((a for a in acceptances if set(a.columns) <= names), None)
        if acc is not None and names in accepted_sets:
            combos.append(combo)  # measured for the record (status "accepted"), never failing
        elif acc is not None:
            exempt.append((combo, f"accepted: {acc.reason}"))
        elif qis and names <= set(qis):
            exempt.append((combo, "quasi-identifiers: k_anonymity gives every class at least k records"))
        else:
            combos.append(combo)
    size = max(MIN_SKETCH, min(exact, DEFAULT_BUDGET_ENTRIES // max(len(combos), 1)))
    key = hashlib.blake2b(f"{policy.dataset}\0{policy.content_hash}".encode(), digest_size=16, person=b"cb-uniqueness").digest()
    spec = ScanSpec(tuple(scanned), tuple(combos), tuple(exempt), tuple(not_scanned), k, limit, max_c, size, key, acceptances, qis, exact)
    # For suggestions: raw numbers and times can be rounded or truncated; a generalized column needs coarser levels.
    kinds = {p: (_kind(policy.actions[p].output_type()) if policy.actions[p].name == "keep" else
                 "generalized" if policy.actions[p].name == "generalize" and p not in qis else "text") for p in scanned}
    return UniquenessSection(spec, kinds)


register_section(SECTION, compile_section)
