"""Differentially private statistics: the `dp_statistics` policy section and its plain column functions.

    dp_statistics:
      privacy_unit: customer_id            # one subject = one unit of privacy; contributions are bounded per subject
      budget: {epsilon: 3.0, delta: 1.0e-6}
      statistics:
        - {name: customers_by_gender, metric: count, group_by: {field: gender, partitions: [female, male, nonbinary, unknown]},
           epsilon: 1.0}
        - {name: mean_income_by_age_band, metric: mean, value: income, min_value: 0, max_value: 250000,
           group_by: {field: date_of_birth, bands: [30, 45, 65], as_of: "2025-01-01"}, epsilon: 1.0}

Statistics are computed with PipelineDP (`pipeline-dp`: its contribution bounding, done here over whole batches, and
its combiners' noise; `transforms/dp_beam.py`) on the raw, pre-protection values inside the pipeline. Partitions are public: every group key is declared in the policy
(a list, or numeric/age bands), so the set of released keys reveals nothing and no data value is ever written;
rows whose group is not declared do not contribute. Budgets compose sequentially: the run refuses a policy whose
statistics together spend more than `budget`. The privacy unit reaches PipelineDP only as a keyed digest
(purpose "dp"). Nothing here logs or raises with a value.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
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

SECTION = "dp_statistics"
KEY_PURPOSE = "dp"
METRICS = ("count", "sum", "mean")
NOISE = ("laplace", "gaussian")
ALL = "all"  # the single partition of a statistic without group_by
_STAT_KEYS = {"name", "metric", "value", "group_by", "epsilon", "delta", "noise", "max_partitions_contributed",
              "max_contributions_per_partition", "min_value", "max_value", "description"}


def _err(msg: str) -> PolicyError:
    return PolicyError(f"dp_statistics: {msg}")


@dataclass(frozen=True)
class GroupBy:
    """Public partitions: declared category values, or bands over a number (or over age at `as_of` for a date)."""

    field: str
    partitions: tuple[str, ...] = ()
    bands: tuple[float, ...] = ()
    as_of: str | None = None

    def labels(self) -> list[str]:
        if not self.bands:
            return list(self.partitions)
        b = list(self.bands)
        if self.as_of:  # ages in whole years: "30-44" reads as 30 to 44 inclusive
            return [f"<{_num(b[0])}"] + [f"{_num(lo)}-{_below(hi)}" for lo, hi in zip(b, b[1:])] + [f"{_num(b[-1])}+"]
        return [f"<{_num(b[0])}"] + [f"[{_num(lo)}, {_num(hi)})" for lo, hi in zip(b, b[1:])] + [f">={_num(b[-1])}"]

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"field": self.field}
        if self.bands:
            d["bands"] = list(self.bands)
            if self.as_of:
                d["as_of"] = self.as_of
                d["of"] = "age in whole years"
        else:
            d["partitions"] = list(self.partitions)
        return d


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _below(v: float) -> str:
    return str(int(v) - 1) if float(v).is_integer() else f"<{v:g}"


@dataclass(frozen=True)
class DpStatistic:
    name: str
    metric: str
    value: str | None
    group_by: GroupBy | None
    epsilon: float
    delta: float
    noise: str
    max_partitions_contributed: int
    max_contributions_per_partition: int
    min_value: float | None
    max_value: float | None

    def partitions(self) -> list[str]:
        return self.group_by.labels() if self.group_by is not None else [ALL]

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "metric": self.metric, "epsilon": self.epsilon, "delta": self.delta, "noise": self.noise,
            "max_partitions_contributed": self.max_partitions_contributed,
            "max_contributions_per_partition": self.max_contributions_per_partition,
            "group_by": self.group_by.describe() if self.group_by is not None else None,
        }
        if self.value is not None:
            d.update(value=self.value, min_value=self.min_value, max_value=self.max_value)
        return d


@dataclass(frozen=True)
class DpSpec:
    privacy_unit: str
    budget_epsilon: float
    budget_delta: float
    statistics: tuple[DpStatistic, ...]

    @property
    def spent_epsilon(self) -> float:
        return float(sum(s.epsilon for s in self.statistics))

    @property
    def spent_delta(self) -> float:
        return float(sum(s.delta for s in self.statistics))


# ------------------------------------------------------------------------------------------------ columns
def privacy_ids(column: pa.Array, key: bytes) -> np.ndarray:
    """64-bit keyed digest per row of the privacy unit (uint64; nulls -> 0, which the caller drops)."""
    digests, index = keyed_digests(key, column, how="exact")
    if not len(digests):
        return np.zeros(len(index), np.uint64)
    w = digest_words(digests).astype(np.uint64)
    per_value = (w[:, 0] << np.uint64(32)) | w[:, 1]
    return np.where(index >= 0, per_value[np.maximum(index, 0)], np.uint64(0)).astype(np.uint64)


def _age_years(col: pa.Array, as_of: str) -> pa.Array:
    ref = dt.date.fromisoformat(as_of)
    d = col.cast(pa.date32()) if not pa.types.is_date(col.type) else col
    years = pc.subtract(pa.scalar(ref.year, pa.int64()), pc.year(d))
    later = pc.or_(pc.greater(pc.month(d), ref.month), pc.and_(pc.equal(pc.month(d), ref.month), pc.greater(pc.day(d), ref.day)))
    return pc.subtract(years, pc.cast(later, pa.int64()))


def group_keys(columns: Mapping[str, pa.Array], group: GroupBy | None, n: int) -> pa.Array:
    """The public partition label of each row (null where the row's group is not a declared partition)."""
    if group is None:
        return pa.array([ALL] * n, pa.string()) if n else pa.array([], pa.string())
    col = columns[group.field]
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not group.bands:
        strings = col.cast(pa.string()) if not pa.types.is_string(col.type) else col
        return pc.if_else(pc.is_in(strings, value_set=pa.array(list(group.partitions), pa.string())), strings, pa.scalar(None, pa.string()))
    nums = _age_years(col, group.as_of) if group.as_of else col.cast(pa.float64())
    x = np.asarray(pc.fill_null(nums.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)
    labels = np.array(group.labels(), dtype=object)
    idx = np.searchsorted(np.asarray(group.bands, np.float64), x, side="right")
    out = labels[np.minimum(idx, len(labels) - 1)]
    return pa.array(out, pa.string(), mask=np.isnan(x))


def numeric_values(col: pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_boolean(col.type):
        return pc.cast(col, pa.float64())
    return col.cast(pa.float64())


def contributions(columns: Mapping[str, pa.Array], stat: DpStatistic, privacy_unit: str, key: bytes, n: int) -> tuple[list[int], list[str], list[float]]:
    """(privacy id, partition, value) per contributing row of one statistic, as Python lists for PipelineDP.

    Rows without a privacy unit, without a declared partition or (sum/mean) without a value do not contribute."""
    unit = columns[privacy_unit]
    if isinstance(unit, pa.ChunkedArray):
        unit = unit.combine_chunks()
    ok = pc.is_valid(unit)
    keys = group_keys(columns, stat.group_by, n)
    ok = pc.and_(ok, pc.is_valid(keys))
    if stat.value is not None:
        vals = numeric_values(columns[stat.value])
        ok = pc.and_(ok, pc.is_valid(vals))
    else:
        vals = pa.array(np.zeros(n), pa.float64())
    mask = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    pids = privacy_ids(unit, key)[mask]
    return pids.tolist(), keys.filter(pa.array(mask)).to_pylist(), vals.filter(pa.array(mask)).to_pylist()


# ------------------------------------------------------------------------------------------------ vectorized bounding
# The aggregation PipelineDP performs before noise, over whole batches: contributions are bounded per privacy unit
# exactly as its SamplingCrossAndPerPartitionContributionBounder does (at most `max_contributions_per_partition`
# values per (unit, partition), then at most `max_partitions_contributed` partitions per unit, each value clamped
# to [min_value, max_value] by the combiner), and the surviving accumulators are summed per public partition.
# PipelineDP chooses the kept contributions uniformly at random; here they are the ones with the smallest
# pseudo-random priority (a 64-bit mix of the keyed privacy id, the partition and the value): also a uniformly
# random subset, a function of that unit's own records only (what bounding needs), and the same on every runner,
# retry and batching of the input. Noise is added afterwards by PipelineDP's own combiners (transforms/dp_beam.py).
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _seed(stat: DpStatistic, what: str) -> np.uint64:
    import hashlib

    return np.uint64(int.from_bytes(hashlib.sha256(f"cloakbeam-dp-bounding\0{what}\0{stat.name}".encode()).digest()[:8], "big"))


def row_priorities(stat: DpStatistic, pid: np.ndarray, part: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Priority of each contribution within its (unit, partition): the smallest `max_contributions_per_partition`
    are kept. Equal contributions get equal priorities, and either of them gives the same accumulator."""
    bits = np.ascontiguousarray(value, np.float64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(pid.astype(np.uint64) ^ _seed(stat, "row"))
        h = _mix64(h ^ (part.astype(np.uint64) * _GOLDEN))
        return _mix64(h ^ bits)


def partition_priorities(stat: DpStatistic, pid: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Priority of each (unit, partition) pair within its unit: the smallest `max_partitions_contributed` are kept."""
    with np.errstate(over="ignore"):
        h = _mix64(pid.astype(np.uint64) ^ _seed(stat, "partition"))
        return _mix64(h ^ (part.astype(np.uint64) * _GOLDEN))


@dataclass
class DpPartial:
    """Contributions of one statistic that survive per-(unit, partition) bounding so far, sorted by (unit,
    partition, priority): at most `k` per pair. Mergeable (`merge`); holds keyed ids, partition indexes and raw
    values only inside the pipeline, never written anywhere."""

    pid: np.ndarray  # uint64 keyed digest of the privacy unit
    part: np.ndarray  # int64 index into the statistic's declared partitions
    prio: np.ndarray  # uint64 row priority
    value: np.ndarray  # float64 value (0 for a count)
    k: int
    seconds: float = 0.0  # worker wall time spent building and merging (stage timer `dp_statistics`)

    @classmethod
    def empty(cls, k: int) -> DpPartial:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.float64), k)

    def __len__(self) -> int:
        return len(self.pid)

    @classmethod
    def merge(cls, parts: Sequence[DpPartial]) -> DpPartial:
        parts = [p for p in parts if len(p)] or list(parts[:1])
        if not parts:
            raise ValueError("nothing to merge")
        if len(parts) == 1:
            return parts[0]
        out = _bottom_k(np.concatenate([p.pid for p in parts]), np.concatenate([p.part for p in parts]),
                        np.concatenate([p.prio for p in parts]), np.concatenate([p.value for p in parts]), parts[0].k)
        out.seconds = float(sum(p.seconds for p in parts))
        return out


def _group_starts(*keys: np.ndarray) -> np.ndarray:
    """For arrays sorted by `keys`: True where a new group begins."""
    n = len(keys[0])
    start = np.zeros(n, dtype=bool)
    if n:
        start[0] = True
        for k in keys:
            start[1:] |= k[1:] != k[:-1]
    return start


def _rank_in_group(start: np.ndarray) -> np.ndarray:
    idx = np.arange(len(start))
    return idx - np.maximum.accumulate(np.where(start, idx, 0))


def _bottom_k(pid: np.ndarray, part: np.ndarray, prio: np.ndarray, value: np.ndarray, k: int) -> DpPartial:
    order = np.lexsort((prio, part, pid))
    pid, part, prio, value = pid[order], part[order], prio[order], value[order]
    keep = _rank_in_group(_group_starts(pid, part)) < k
    return DpPartial(pid[keep], part[keep], prio[keep], value[keep], k)


def batch_partial(columns: Mapping[str, pa.Array], stat: DpStatistic, privacy_unit: str, key: bytes, n: int) -> DpPartial:
    """One batch's contributions to `stat`, bounded per (unit, partition): the same rows `contributions` hands to
    PipelineDP (no unit, no declared partition or no value: no contribution), as arrays."""
    unit = columns[privacy_unit]
    if isinstance(unit, pa.ChunkedArray):
        unit = unit.combine_chunks()
    keys = group_keys(columns, stat.group_by, n)
    ok = pc.and_(pc.is_valid(unit), pc.is_valid(keys))
    if stat.value is not None:
        vals = numeric_values(columns[stat.value])
        ok = pc.and_(ok, pc.is_valid(vals))
        value = np.asarray(pc.fill_null(vals, 0.0).to_numpy(zero_copy_only=False), np.float64)
    else:
        value = np.zeros(n, np.float64)
    mask = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    part = pc.index_in(keys, value_set=pa.array(stat.partitions(), pa.string()))
    part = np.asarray(pc.fill_null(part, -1).to_numpy(zero_copy_only=False), np.int64)
    mask &= part >= 0
    pid = privacy_ids(unit, key)[mask]
    part, value = part[mask], value[mask]
    return _bottom_k(pid, part, row_priorities(stat, pid, part, value), value, stat.max_contributions_per_partition)


@dataclass(frozen=True)
class PartitionTotals:
    """Per declared partition (in `stat.partitions()` order), the sums of the bounded per-(unit, partition)
    accumulators: what PipelineDP's combiners would hold before `compute_metrics`."""

    pairs: np.ndarray  # int64: (unit, partition) pairs kept
    count: np.ndarray  # int64: contributions kept
    total: np.ndarray  # float64: sum of clamped values
    normalized: np.ndarray  # float64: sum of (clamped value - middle of [min, max]), for a mean


def bounded_totals(partial: DpPartial, stat: DpStatistic, middle: float = 0.0) -> PartitionTotals:
    """Cross-partition bounding (at most `max_partitions_contributed` partitions per unit) and the per-partition
    totals. `partial` must hold every contribution of the run (merged)."""
    p = len(stat.partitions())
    value = partial.value
    if stat.min_value is not None and stat.max_value is not None:
        value = np.clip(value, stat.min_value, stat.max_value)
    start = _group_starts(partial.pid, partial.part)
    group = np.cumsum(start) - 1
    g = int(start.sum())
    gpid, gpart = partial.pid[start], partial.part[start]
    gcount = np.bincount(group, minlength=g).astype(np.int64) if g else np.zeros(0, np.int64)
    gsum = np.bincount(group, weights=value, minlength=g) if g else np.zeros(0, np.float64)
    gnorm = np.bincount(group, weights=value - middle, minlength=g) if g else np.zeros(0, np.float64)
    order = np.lexsort((partition_priorities(stat, gpid, gpart), gpid))
    keep = order[_rank_in_group(_group_starts(gpid[order])) < stat.max_partitions_contributed]
    kp = gpart[keep]
    return PartitionTotals(
        pairs=np.bincount(kp, minlength=p).astype(np.int64),
        count=np.bincount(kp, weights=gcount[keep], minlength=p).astype(np.int64),
        total=np.bincount(kp, weights=gsum[keep], minlength=p).astype(np.float64),
        normalized=np.bincount(kp, weights=gnorm[keep], minlength=p).astype(np.float64),
    )


# ------------------------------------------------------------------------------------------------ section
class DpStatisticsSection:
    """The compiled `dp_statistics` section: the graph adds `beam_transform`, the manifest its `report`."""

    def __init__(self, spec: DpSpec) -> None:
        self.spec = spec

    def beam_transform(self, runtime: Any) -> Any:
        """PTransform over raw RecordBatch | RunStats elements yielding one RunStats with every statistic's results."""
        from cloakbeam.transforms.dp_beam import ComputeDpStatistics

        return ComputeDpStatistics(self.spec, runtime)

    def describe(self) -> dict[str, Any]:
        s = self.spec
        import importlib.metadata as md

        try:
            version = md.version("pipeline-dp")
        except md.PackageNotFoundError:  # pragma: no cover - a declared dependency
            version = "unknown"
        return {
            "privacy_unit": s.privacy_unit,
            "budget": {"epsilon": s.budget_epsilon, "delta": s.budget_delta},
            "spent": {"epsilon": round(s.spent_epsilon, 12), "delta": s.spent_delta},
            "composition": "basic sequential composition: the spent budget is the sum over statistics",
            "partition_selection": "public partitions declared in the policy (no data-dependent partition selection)",
            "computed_on": "raw values before protection, inside the pipeline; contributions bounded per privacy unit",
            "library": f"pipeline-dp {version} (its contribution bounding over Arrow batches, its combiners' noise)",
        }

    def report(self, run_stats: RunStats) -> dict[str, Any]:
        """The manifest's `sections.dp_statistics`: budget, spent, and per statistic its parameters and DP results."""
        results = {r["name"]: r for r in run_stats.extra.get("dp_statistics", [])}
        stats = []
        for st in self.spec.statistics:
            entry = st.describe()
            got = results.get(st.name)
            entry["partitions"] = st.partitions()  # the declared order (JSON objects are written with sorted keys)
            entry["results"] = got["results"] if got else None
            stats.append(entry)
        out = self.describe()
        out["statistics"] = stats
        out["computed"] = all(e["results"] is not None for e in stats)
        if not out["computed"]:
            out["reason"] = ("the run reported no DP results: streaming runs do not compute dp_statistics (a per-window "
                             "statistic would spend the budget once per window); run the data as a batch job for them")
        out["summary"] = (f"{len(stats)} statistics, epsilon spent {self.spec.spent_epsilon:g} of {self.spec.budget_epsilon:g}"
                          + (f", delta {self.spec.spent_delta:g} of {self.spec.budget_delta:g}" if self.spec.budget_delta else ""))
        return out


def _positive(name: str, v: Any, *, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v) or v < 0 or (v == 0 and not allow_zero):
        raise _err(f"'{name}' must be a {'non-negative' if allow_zero else 'positive'} number")
    return float(v)


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _err(f"'{name}' must be a whole number of at least 1")
    return v


def _leaf(schema: InputSchema, path: Any, what: str) -> str:
    if not isinstance(path, str) or path not in schema.fields or schema.fields[path].is_record:
        raise _err(f"{what} '{path}' is not a leaf field of schema {schema.source}")
    return path


def _group(schema: InputSchema, raw: Any, where: str) -> GroupBy | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or "field" not in raw or set(raw) - {"field", "partitions", "bands", "as_of"}:
        raise _err(f"{where}: 'group_by' must be {{field: F, partitions: [..]}} or {{field: F, bands: [..], as_of: DATE}}")
    field = _leaf(schema, raw["field"], f"{where}: group_by field")
    info = schema.fields[field]
    if ("partitions" in raw) == ("bands" in raw):
        raise _err(f"{where}: 'group_by' declares its public partitions with exactly one of 'partitions' (a list of values) or 'bands'")
    if "partitions" in raw:
        parts = raw["partitions"]
        if not isinstance(parts, Sequence) or isinstance(parts, str) or not parts or len(set(map(str, parts))) != len(parts):
            raise _err(f"{where}: 'partitions' must be a non-empty list of distinct values")
        return GroupBy(field, partitions=tuple(str(p) for p in parts))
    bands = raw["bands"]
    if (not isinstance(bands, Sequence) or isinstance(bands, str) or not bands
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in bands) or list(bands) != sorted(set(bands))):
        raise _err(f"{where}: 'bands' must be a non-empty list of increasing numbers (band edges)")
    as_of = raw.get("as_of")
    is_date = pa.types.is_date(info.arrow_type) or pa.types.is_timestamp(info.arrow_type)
    if is_date:
        if as_of is None:
            raise _err(f"{where}: group_by field '{field}' is a date; give 'as_of: YYYY-MM-DD' so bands are ages in years at that date")
        try:
            dt.date.fromisoformat(str(as_of))
        except ValueError:
            raise _err(f"{where}: 'as_of' must be a date written YYYY-MM-DD") from None
        as_of = str(as_of)
    elif as_of is not None:
        raise _err(f"{where}: 'as_of' applies to date fields only")
    elif not (pa.types.is_integer(info.arrow_type) or pa.types.is_floating(info.arrow_type)):
        raise _err(f"{where}: 'bands' need a numeric or date field; '{field}' is neither (declare 'partitions' instead)")
    return GroupBy(field, bands=tuple(float(b) for b in bands), as_of=as_of)


def _statistic(schema: InputSchema, raw: Any, i: int) -> DpStatistic:
    where = f"statistic {i + 1}"
    if not isinstance(raw, Mapping):
        raise _err(f"{where} must be a mapping with 'name', 'metric' and 'epsilon'")
    unknown = sorted(set(raw) - _STAT_KEYS)
    if unknown:
        raise _err(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(_STAT_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _err(f"{where} needs a 'name'")
    where = f"statistic '{name}'"
    metric = raw.get("metric")
    if metric not in METRICS:
        raise _err(f"{where}: 'metric' must be one of {', '.join(METRICS)}")
    noise = raw.get("noise", "laplace")
    if noise not in NOISE:
        raise _err(f"{where}: 'noise' must be laplace or gaussian")
    eps = _positive(f"{where}: epsilon", raw.get("epsilon"))
    delta = _positive(f"{where}: delta", raw.get("delta", 0.0), allow_zero=True)
    if delta >= 1:
        raise _err(f"{where}: 'delta' must be below 1 (typically under 1/number of subjects)")
    if noise == "gaussian" and delta == 0:
        raise _err(f"{where}: gaussian noise needs a positive 'delta'")
    value = min_v = max_v = None
    if metric in ("sum", "mean"):
        value = _leaf(schema, raw.get("value"), f"{where}: value field")
        t = schema.fields[value].arrow_type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise _err(f"{where}: value field '{value}' must be numeric or boolean")
        if "min_value" not in raw or "max_value" not in raw:
            raise _err(f"{where}: a {metric} needs 'min_value' and 'max_value' (each contribution is clamped to them)")
        min_v, max_v = raw["min_value"], raw["max_value"]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (min_v, max_v)) or not min_v < max_v:
            raise _err(f"{where}: 'min_value' must be a number below 'max_value'")
        min_v, max_v = float(min_v), float(max_v)
    elif "value" in raw or "min_value" in raw or "max_value" in raw:
        raise _err(f"{where}: a count takes no 'value', 'min_value' or 'max_value'")
    return DpStatistic(
        name=name, metric=metric, value=value, group_by=_group(schema, raw.get("group_by"), where), epsilon=eps, delta=delta,
        noise=noise, max_partitions_contributed=_count(f"{where}: max_partitions_contributed", raw.get("max_partitions_contributed", 1)),
        max_contributions_per_partition=_count(f"{where}: max_contributions_per_partition", raw.get("max_contributions_per_partition", 1)),
        min_value=min_v, max_value=max_v,
    )


def compile_section(value: Any, schema: InputSchema, policy: CompiledPolicy) -> DpStatisticsSection | None:
    """Validate `dp_statistics`; a declaration that spends more than the budget is refused here (exit 2)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - {"privacy_unit", "budget", "statistics", "description"}:
        raise _err("the section must be a mapping with 'privacy_unit', 'budget' and 'statistics'")
    unit = _leaf(schema, value.get("privacy_unit"), "privacy_unit")
    budget = value.get("budget")
    if not isinstance(budget, Mapping) or "epsilon" not in budget or set(budget) - {"epsilon", "delta"}:
        raise _err("'budget' must be {epsilon: E, delta: D} (the total privacy loss this release may spend)")
    b_eps = _positive("budget.epsilon", budget["epsilon"])
    b_delta = _positive("budget.delta", budget.get("delta", 0.0), allow_zero=True)
    raw_stats = value.get("statistics")
    if not isinstance(raw_stats, Sequence) or isinstance(raw_stats, str) or not raw_stats:
        raise _err("'statistics' must be a non-empty list")
    stats = tuple(_statistic(schema, s, i) for i, s in enumerate(raw_stats))
    names = [s.name for s in stats]
    if len(set(names)) != len(names):
        raise _err("every statistic needs a distinct 'name'")
    spec = DpSpec(unit, b_eps, b_delta, stats)
    tol = 1e-9
    if spec.spent_epsilon > b_eps + tol or spec.spent_delta > b_delta + tol * max(b_delta, 1e-12):
        raise _err(f"the statistics spend epsilon {spec.spent_epsilon:g} and delta {spec.spent_delta:g}, more than the budget "
                   f"(epsilon {b_eps:g}, delta {b_delta:g}); lower some statistic's epsilon/delta or raise the budget")
    return DpStatisticsSection(spec)


register_section(SECTION, compile_section)
