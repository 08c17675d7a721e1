"""Generalization primitives, hierarchies and the `generalize` action.

Every primitive is a vectorized function over Arrow arrays (pyarrow.compute, numpy); nothing here imports Beam
and nothing here logs or raises with a value in the message.

Generalized columns are strings whatever the input type: a column has ONE output type in every batch and file
(`pa.string()`), at every level, so the Parquet schema never depends on the level the k-anonymity search picks.
The two exceptions keep a model's features usable and are plain actions only: `round` keeps a number a number
and `truncate` keeps a timestamp a timestamp. The input is first rendered as its *canonical string* (level 0):

- date32/date64 -> ``1985-03-12``; timestamp -> ``1985-03-12 08:15:00.000000`` (``Z`` suffix when tz-aware)
- integers and floats -> Arrow's decimal rendering (``34``, ``34.5``); strings unchanged; booleans ``true``/``false``

and every hierarchy level is a function of that canonical string, so the k-anonymity stage can generalize a
column that the protect stage already turned into its canonical string (`level: auto`).

Hierarchies (level 0 = canonical value, top level = ``*`` = full suppression of the attribute):

- ``band``   numeric intervals. Either ``widths`` (each a multiple of the one before, cut from ``offset``) or
             ``edges`` (one list per level, each coarser list a subset of the finer one); ``bottom``/``top``
             code the tails as ``(-inf, b)`` and ``[t, inf)``. Labels are half-open intervals ``[30, 40)``;
             when the upper end is bounded, whole numbers are zero-padded (``[005, 010)``) so labels sort.
- ``round``  numbers rounded to a multiple of each step in turn (each level rounds the previous level's value,
             so levels nest: 1450 -> 1500 -> 2000), with optional top/bottom coding.
- ``date``   hour -> day -> month (``1985-03``) -> year (``1985``) -> decade (``1980s``), any increasing subset.
- ``age``    age in whole years at a fixed reference date ``as_of`` (never "today": runs must be reproducible),
             in nested bands, e.g. [5, 10, 20] -> ``[30, 35)``.
- ``prefix`` keep the first N characters and mark the cut with one ``*`` (zip ``94107`` -> ``941*`` -> ``9*``);
             values not longer than N are unchanged.
- ``map``    categorical groups given in the policy, one mapping per level ``{group: [members]}``; each level
             must coarsen the previous one.
- ``csv``    an ARX hierarchy file: one row per value, then its generalizations level by level, ``;`` separated
             (a last column of ``*`` is the top). Validated when the policy compiles: same number of columns on
             every row, no value twice, and monotone (a level's value determines the next level's value).
- ``suppress`` no intermediate level: the value or ``*``.

`map` and `csv` know their domain; a value outside it is handled by ``on_unknown``: ``error`` (default: the run
fails naming the field and the count, never the value), ``suppress`` (the record is removed and counted), or
``top`` (the value becomes ``*`` at every level above 0). Nulls stay null at every level below the top; the
top level is ``*``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.errors import CloakbeamError, UnknownValueError
from cloakbeam.transforms.registry import Action, ActionContext, Param, register

STAR = "*"
DATE_UNITS = ("hour", "day", "month", "year", "decade")
DEFAULT_DATE_LEVELS = ("month", "year", "decade")
TRUNCATE_UNITS = ("hour", "day", "month", "year")
ON_UNKNOWN = ("error", "suppress", "top")


# ---------------------------------------------------------------------------------------------------------
# Canonical string (level 0)
# ---------------------------------------------------------------------------------------------------------
def canonical_string(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Render a column at full detail as strings (see module doc); the level-0 value of every hierarchy."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if pa.types.is_dictionary(t):
        column = column.cast(t.value_type)
        t = column.type
    if pa.types.is_string(t):
        return column
    if pa.types.is_large_string(t):
        return column.cast(pa.string())
    if pa.types.is_boolean(t):
        return pc.if_else(column, "true", "false")
    if pa.types.is_date(t) or pa.types.is_timestamp(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        return column.cast(pa.string())
    if pa.types.is_null(t):
        return pa.nulls(len(column), pa.string())
    raise TypeError(f"cannot generalize a column of type {t}")


def is_generalizable(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_boolean(t)
        or pa.types.is_date(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))
    )


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_temporal(t: pa.DataType) -> bool:
    return pa.types.is_date(t) or pa.types.is_timestamp(t) or pa.types.is_string(t)


# ---------------------------------------------------------------------------------------------------------
# Primitives: canonical strings in, generalized strings out
# ---------------------------------------------------------------------------------------------------------
def _star_like(canon: pa.Array) -> pa.Array:
    return pa.array(np.full(len(canon), STAR, dtype=object), pa.string())


def suppress(canon: pa.Array) -> pa.Array:
    """Full suppression: every value (null included) becomes ``*``."""
    return _star_like(canon)


def _fmt_number(values: np.ndarray, integral: bool) -> pa.Array:
    if integral:
        return pa.array(values.astype(np.int64)).cast(pa.string())
    return pa.array(values.astype(np.float64)).cast(pa.string())


def _num_text(x: float, pad: int = 0) -> str:
    """A number as a label: whole numbers without a decimal point, zero-padded to `pad` digits when >= 0."""
    x = float(x)
    if x.is_integer() and abs(x) < 2**53:
        s = str(int(x))
        return s.zfill(pad) if pad and x >= 0 else s
    return repr(x)


def _as_floats(canon: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, mask of finite parsed values); unparseable strings are not valid (fail closed)."""
    nums = _parse_number_strings(canon) if pa.types.is_string(canon.type) else canon.cast(pa.float64())
    vals = nums.to_numpy(zero_copy_only=False).astype(np.float64)
    return vals, np.isfinite(vals)


def _finish(canon: pa.Array, label: pa.Array, valid: np.ndarray) -> pa.Array:
    """Invalid (unparseable, non-finite) values become ``*``; nulls stay null."""
    label = pc.if_else(pa.array(valid), label, STAR)
    return pc.if_else(pc.is_null(canon), pa.scalar(None, pa.string()), label)


def _tail_labels(bottom: float | None, top: float | None, pad: int) -> tuple[str, str]:
    low = f"(-inf, {_num_text(bottom, pad)})" if bottom is not None else ""
    high = f"[{_num_text(top, pad)}, inf)" if top is not None else ""
    return low, high


def band_labels(canon: pa.Array, width: float | None = None, edges: Sequence[float] = (), offset: float = 0.0,
                bottom: float | None = None, top: float | None = None, pad: int = 0) -> pa.Array:
    """Interval labels for numbers: ``[lo, hi)`` from `width` (cut from `offset`) or from sorted `edges`.

    Values below `bottom` (or the first edge) become ``(-inf, bottom)``, values at or above `top` (or the last
    edge) ``[top, inf)``; bands are clipped to those bounds. Nulls stay null; unparseable values become ``*``."""
    vals, valid = _as_floats(canon)
    safe = np.where(valid, vals, 0.0)
    if edges:
        e = np.asarray(edges, np.float64)
        idx = np.searchsorted(e, safe, side="right") - 1  # -1: below the first edge; len-1: at/above the last
        low, high = _tail_labels(float(e[0]), float(e[-1]), pad)
        names = [low] + [f"[{_num_text(a, pad)}, {_num_text(b, pad)})" for a, b in zip(e[:-1], e[1:])] + [high]
        label = pa.array(names, pa.string()).take(pa.array(idx + 1))
        return _finish(canon, label, valid)
    assert width is not None
    lo = offset + np.floor((safe - offset) / width) * width
    hi = lo + width
    if bottom is not None:
        lo = np.maximum(lo, bottom)
    if top is not None:
        hi = np.minimum(hi, top)
    integral = float(width).is_integer() and float(offset).is_integer() and bool(np.all(np.abs(lo[valid]) < 2**53))
    lo_s, hi_s = _fmt_number(lo, integral), _fmt_number(hi, integral)
    if pad and integral:
        lo_s = pc.if_else(pa.array(lo >= 0), pc.utf8_lpad(lo_s, pad, "0"), lo_s)
        hi_s = pc.if_else(pa.array(hi >= 0), pc.utf8_lpad(hi_s, pad, "0"), hi_s)
    label = pc.binary_join_element_wise("[", lo_s, ", ", hi_s, ")", "")
    low, high = _tail_labels(bottom, top, pad if integral else 0)
    if bottom is not None:
        label = pc.if_else(pa.array(safe < bottom), low, label)
    if top is not None:
        label = pc.if_else(pa.array(safe >= top), high, label)
    return _finish(canon, label, valid)


def numeric_band(canon: pa.Array, width: float) -> pa.Array:
    """Half-open band label ``[lo, hi)`` with lo = floor(v / width) * width; nulls stay null.

    Unparseable or non-finite values become ``*`` (the column's own type guarantees numbers; a string column
    given to a band hierarchy fails closed to suppression)."""
    return band_labels(canon, width=float(width))


def round_half_up(vals: np.ndarray, step: float) -> np.ndarray:
    """Round to the nearest multiple of `step` (halves go up), exactly for whole steps."""
    out = np.floor(vals / step + 0.5) * step
    if float(step).is_integer():
        return out
    digits = max(0, -math.floor(math.log10(step)) + 6)
    return np.round(out, digits)


def rounded_labels(canon: pa.Array, steps: Sequence[float], bottom: float | None = None, top: float | None = None,
                   pad: int = 0) -> pa.Array:
    """The value rounded by each step in turn (a level rounds the previous level's value), as a label.

    Values at or above `top` become ``[top, inf)`` and below `bottom` ``(-inf, bottom)`` at every level."""
    vals, valid = _as_floats(canon)
    safe = np.where(valid, vals, 0.0)
    cur = safe
    for step in steps:
        cur = round_half_up(cur, float(step))
    integral = all(float(s).is_integer() for s in steps) and bool(np.all(np.abs(cur[valid]) < 2**53))
    label = _fmt_number(cur, integral)
    if pad and integral:
        label = pc.if_else(pa.array(cur >= 0), pc.utf8_lpad(label, pad, "0"), label)
    low, high = _tail_labels(bottom, top, pad if integral else 0)
    if bottom is not None:
        label = pc.if_else(pa.array(safe < bottom), low, label)
    if top is not None:
        label = pc.if_else(pa.array(safe >= top), high, label)
    return _finish(canon, label, valid)


def _parse_number_strings(canon: pa.Array) -> pa.Array:
    try:
        return pc.cast(canon, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Fail closed per value: anything not a number becomes NaN, then ``*``.
        vals = []
        for v in canon.to_pylist():  # slow path, only for malformed input; never logged
            try:
                vals.append(float(v) if v is not None else None)
            except ValueError:
                vals.append(float("nan"))
        return pa.array(vals, pa.float64())


def date_unit(canon: pa.Array, unit: str) -> pa.Array:
    """Truncate an ISO date/timestamp string to ``hour`` (YYYY-MM-DD HH:00), ``day`` (YYYY-MM-DD), ``month``
    (YYYY-MM), ``year`` (YYYY) or ``decade`` (YYY0s). Labels sort as strings."""
    if unit == "hour":
        return pc.binary_join_element_wise(pc.utf8_slice_codeunits(canon, 0, 13), ":00", "")
    if unit == "day":
        return pc.utf8_slice_codeunits(canon, 0, 10)
    if unit == "month":
        return pc.utf8_slice_codeunits(canon, 0, 7)
    if unit == "year":
        return pc.utf8_slice_codeunits(canon, 0, 4)
    if unit == "decade":
        return pc.binary_join_element_wise(pc.utf8_slice_codeunits(canon, 0, 3), "0s", "")
    raise ValueError(f"unknown date unit '{unit}'")


def age_years(canon: pa.Array, as_of: _dt.date) -> pa.Array:
    """Whole years between an ISO date/timestamp string and `as_of` (int64, null where unparseable or null)."""
    day = pc.utf8_slice_codeunits(canon, 0, 10)
    ts = pc.strptime(day, format="%Y-%m-%d", unit="s", error_is_null=True)
    y, m, d = pc.year(ts), pc.month(ts), pc.day(ts)
    before = pc.or_(pc.less(m, as_of.month), pc.and_(pc.equal(m, as_of.month), pc.less_equal(d, as_of.day)))
    # birthday reached this year when (m, d) <= as_of (m, d)
    years = pc.subtract(pa.scalar(as_of.year, pa.int64()), y.cast(pa.int64()))
    return pc.if_else(before, years, pc.subtract(years, 1))


def age_band(canon: pa.Array, width: int, as_of: _dt.date) -> pa.Array:
    """Age band ``[30, 40)`` of the age at `as_of`; unparseable dates become ``*``, nulls stay null."""
    ages = age_years(canon, as_of)
    label = numeric_band(ages, float(width))
    unparsed = pc.and_(pc.is_valid(canon), pc.is_null(ages))
    return pc.if_else(unparsed, STAR, label)


def prefix(canon: pa.Array, keep: int) -> pa.Array:
    """Keep the first `keep` characters and mark the cut with ``*``; shorter values are unchanged."""
    longer = pc.greater(pc.utf8_length(canon), keep)
    cut = pc.binary_join_element_wise(pc.utf8_slice_codeunits(canon, 0, keep), STAR, "")
    return pc.if_else(longer, cut, canon)


def categorical_map(canon: pa.Array, groups: Mapping[str, Sequence[Any]]) -> pa.Array:
    """Replace each value by its group name (``{group: [members]}``); unmapped values become ``*``."""
    members: list[str] = []
    names: list[str] = []
    for g, vals in groups.items():
        for v in vals:
            members.append(_member_str(v))
            names.append(str(g))
    idx = pc.index_in(canon, value_set=pa.array(members, pa.string()))
    mapped = pc.take(pa.array(names, pa.string()), idx)
    return pc.if_else(pc.is_null(canon), pa.scalar(None, pa.string()), pc.fill_null(mapped, STAR))


def _member_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (_dt.date, _dt.datetime)):
        return v.isoformat()
    return str(v)


# ---------------------------------------------------------------------------------------------------------
# Hierarchies: level 0 = canonical, levels 1..n-1 = primitives, last level = ``*``
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hierarchy:
    """A generalization hierarchy over canonical strings. Picklable; `apply` is vectorized.

    `steps` holds one entry per intermediate level: a width (band, age), a step (round), a unit (date), a
    length (prefix) or a level number (map, csv). Band levels given by edges keep them in `edges`."""

    kind: str
    steps: tuple[Any, ...] = ()  # one entry per intermediate level
    as_of: _dt.date | None = None
    groups: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = field(default=())  # map levels
    edges: tuple[tuple[float, ...], ...] = ()  # band levels by edges (one sorted tuple per level)
    offset: float = 0.0
    bottom: float | None = None
    top_code: float | None = None
    pad: int = 0  # zero-padding of whole-number labels so they sort as strings
    table: tuple[tuple[str, ...], ...] = ()  # csv: one tuple per value, (value, level 1, level 2, ...)
    on_unknown: str = "top"  # map and csv: error | suppress | top (the policy's default is error)
    source: str = ""  # csv: the file as named in the policy
    digest: str = ""  # csv: SHA-256 of the file's text

    @property
    def top(self) -> int:
        """Index of the top level (``*``); levels run 0..top."""
        return len(self.steps) + 1

    @property
    def has_domain(self) -> bool:
        """True when the hierarchy lists its values (map, csv), so a value can be unknown to it."""
        return self.kind in ("map", "csv")

    def level_names(self) -> list[str]:
        names = ["value"]
        for i, s in enumerate(self.steps):
            if self.kind == "band":
                names.append(f"bands {'|'.join(_num_text(e) for e in self.edges[i])}" if self.edges else f"band {_num_label(s)}")
            elif self.kind == "round":
                names.append(f"round {_num_label(s)}")
            elif self.kind == "age":
                names.append(f"age band {_num_label(s)}")
            elif self.kind == "date":
                names.append(str(s))
            elif self.kind == "prefix":
                names.append(f"prefix {s}")
            elif self.kind == "map":
                names.append(f"map level {len(names)}")
            elif self.kind == "csv":
                names.append(f"level {len(names)}")
            elif self.kind == "quantile":
                names.append(f"{s} quantile bands")
        names.append("suppressed")
        return names

    # -- domain (map, csv) -----------------------------------------------------------------------------
    def _leaves(self) -> pa.Array:
        cached = self.__dict__.get("_leaf_array")
        if cached is None:
            if self.kind == "csv":
                cached = pa.array([row[0] for row in self.table], pa.string())
            else:
                cached = pa.array([m for _, ms in (self.groups[0] if self.groups else ()) for m in ms], pa.string())
            object.__setattr__(self, "_leaf_array", cached)
        return cached

    def unknown(self, canon: pa.Array) -> np.ndarray:
        """Mask of non-null values the hierarchy does not list (always False for hierarchies without a domain)."""
        if not self.has_domain or len(canon) == 0:
            return np.zeros(len(canon), np.bool_)
        known = pc.is_in(canon, value_set=self._leaves())
        return pc.and_(pc.is_valid(canon), pc.invert(known)).to_numpy(zero_copy_only=False)

    def apply(self, canon: pa.Array, level: int) -> pa.Array:
        """Generalize canonical strings to `level` (0 = unchanged, `top` = ``*``). Values outside a map's or a
        csv's domain become ``*`` above level 0 (callers enforce `on_unknown` before releasing anything)."""
        if level < 0 or level > self.top:
            raise ValueError(f"level {level} is outside 0..{self.top}")
        if level == 0:
            return canon
        if level == self.top:
            return suppress(canon)
        if self.kind == "quantile":
            raise CloakbeamError("quantile bands were not computed: they are resolved from a sample of the input when "
                                 "the run is prepared (cloakbeam.pipeline.graph.prepare, or generalize.resolve_quantiles)")
        step = self.steps[level - 1]
        if self.kind == "band":
            if self.edges:
                return band_labels(canon, edges=self.edges[level - 1], pad=self.pad)
            return band_labels(canon, width=float(step), offset=self.offset, bottom=self.bottom, top=self.top_code, pad=self.pad)
        if self.kind == "round":
            return rounded_labels(canon, [float(s) for s in self.steps[:level]], self.bottom, self.top_code, self.pad)
        if self.kind == "date":
            return date_unit(canon, step)
        if self.kind == "age":
            assert self.as_of is not None
            return age_band(canon, int(step), self.as_of)
        if self.kind == "prefix":
            return prefix(canon, int(step))
        if self.kind == "map":
            return categorical_map(canon, {g: list(m) for g, m in self.groups[level - 1]})
        if self.kind == "csv":
            idx = pc.index_in(canon, value_set=self._leaves())
            column = pa.array([row[level] for row in self.table], pa.string())
            return pc.if_else(pc.is_null(canon), pa.scalar(None, pa.string()), pc.fill_null(pc.take(column, idx), STAR))
        raise ValueError(f"unknown hierarchy '{self.kind}'")

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"hierarchy": self.kind, "levels": self.level_names()}
        if self.as_of is not None:
            d["as_of"] = self.as_of.isoformat()
        if self.kind in ("band", "round"):
            for key, v in (("offset", self.offset or None), ("bottom", self.bottom), ("top", self.top_code)):
                if v is not None:
                    d[key] = v
        if self.has_domain:
            d["on_unknown"] = self.on_unknown
        if self.kind == "csv":
            d.update(path=self.source, sha256=self.digest, values=len(self.table))
        return d


def _num_label(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


HIERARCHY_KINDS = ("band", "round", "quantile", "date", "age", "prefix", "map", "csv", "suppress")


def parse_as_of(value: Any) -> _dt.date | None:
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    if isinstance(value, str):
        try:
            return _dt.date.fromisoformat(value)
        except ValueError:
            return None
    return None


_ALLOWED_KEYS = {
    "band": {"widths", "edges", "offset", "top", "bottom"},
    "round": {"steps", "top", "bottom"},
    "quantile": {"bands", "precision", "edges", "sample_rows"},
    "date": {"levels"},
    "age": {"widths", "as_of"},
    "prefix": {"lengths"},
    "map": {"levels", "on_unknown"},
    "csv": {"path", "delimiter", "on_unknown"},
    "suppress": set(),
}


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _digits(*values: float | None) -> int:
    """Zero-padding width for whole-number labels bounded by these values (0 = no padding)."""
    nums = [abs(float(v)) for v in values if v is not None]
    if not nums or any(not float(v).is_integer() for v in nums):
        return 0
    return len(str(int(max(nums))))


def build_hierarchy(spec: Mapping[str, Any], arrow_type: pa.DataType) -> tuple[Hierarchy | None, str | None]:
    """Build a Hierarchy from a policy mapping; return (None, sentence) when the spec is bad.

    Accepted forms: ``{hierarchy: band, widths: [...], offset:, bottom:, top:}``, ``{hierarchy: band,
    edges: [...] or [[...], ...]}``, ``{hierarchy: round, steps: [...], bottom:, top:}``, ``{hierarchy: date,
    levels: [hour, day, month, year, decade]}``, ``{hierarchy: age, as_of: YYYY-MM-DD, widths: [...]}``,
    ``{hierarchy: prefix, lengths: [3, 1]}``, ``{hierarchy: map, levels: [{group: [members]}, ...], on_unknown:}``,
    ``{hierarchy: csv, path: FILE, delimiter: ';', on_unknown:}``, ``{hierarchy: suppress}``.
    """
    if not isinstance(spec, Mapping):
        return None, "must be a mapping such as {hierarchy: prefix, lengths: [3, 1]}"
    kind = spec.get("hierarchy")
    if kind not in HIERARCHY_KINDS:
        return None, f"needs 'hierarchy' set to one of {', '.join(HIERARCHY_KINDS)}"
    allowed = _ALLOWED_KEYS[kind] | {"hierarchy"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        return None, f"has unknown key '{unknown[0]}' for hierarchy '{kind}'; allowed: {', '.join(sorted(allowed))}"
    if not is_generalizable(arrow_type):
        return None, f"has type {arrow_type}, which cannot be generalized"
    on_unknown = spec.get("on_unknown", "error")
    if on_unknown not in ON_UNKNOWN:
        return None, f"needs 'on_unknown' set to one of {', '.join(ON_UNKNOWN)}"

    if kind == "suppress":
        return Hierarchy("suppress"), None
    if kind == "quantile":
        if not (_is_numeric(arrow_type) or pa.types.is_string(arrow_type)):
            return None, f"is of type {arrow_type}; a 'quantile' hierarchy needs a numeric field"
        return _build_quantile(spec)
    if kind in ("band", "round"):
        if not (_is_numeric(arrow_type) or pa.types.is_string(arrow_type)):
            return None, f"is of type {arrow_type}; a '{kind}' hierarchy needs a numeric field"
        return _build_numeric(kind, spec)
    if kind == "age":
        if not _is_temporal(arrow_type):
            return None, f"is of type {arrow_type}; an 'age' hierarchy needs a date or timestamp field"
        widths = spec.get("widths")
        problem = _check_widths(widths, integer=True)
        if problem or widths is None:
            return None, problem or "needs 'widths'"
        as_of = parse_as_of(spec.get("as_of"))
        if as_of is None:
            return None, "needs 'as_of: YYYY-MM-DD', the fixed reference date for ages (never today, so runs repeat)"
        return Hierarchy("age", tuple(widths), as_of=as_of), None
    if kind == "date":
        if not _is_temporal(arrow_type):
            return None, f"is of type {arrow_type}; a 'date' hierarchy needs a date or timestamp field"
        levels = spec.get("levels", list(DEFAULT_DATE_LEVELS))
        if (not isinstance(levels, list) or not levels or any(u not in DATE_UNITS for u in levels)
                or [DATE_UNITS.index(u) for u in levels] != sorted({DATE_UNITS.index(u) for u in levels})):
            return None, "needs 'levels' as an increasing list drawn from hour, day, month, year, decade"
        if "hour" in levels and pa.types.is_date(arrow_type):
            return None, f"is of type {arrow_type}; the 'hour' level needs a timestamp field"
        return Hierarchy("date", tuple(levels)), None
    if kind == "prefix":
        lengths = spec.get("lengths")
        if (not isinstance(lengths, list) or not lengths
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths)
                or any(a <= b for a, b in zip(lengths, lengths[1:]))):
            return None, "needs 'lengths' as a strictly decreasing list of positive integers, e.g. [3, 1]"
        return Hierarchy("prefix", tuple(lengths)), None
    if kind == "csv":
        return _build_csv(spec, on_unknown)
    # map
    levels = spec.get("levels")
    if not isinstance(levels, list) or not levels:
        return None, "needs 'levels': a list of mappings {group: [members]}, finest first"
    parsed: list[tuple[tuple[str, tuple[str, ...]], ...]] = []
    for i, lvl in enumerate(levels, start=1):
        if not isinstance(lvl, Mapping) or not lvl:
            return None, f"map level {i} must be a non-empty mapping {{group: [members]}}"
        seen: set[str] = set()
        groups = []
        for g, members in lvl.items():
            if not isinstance(members, list) or not members:
                return None, f"map level {i}: group '{g}' must list its members"
            ms = tuple(_member_str(m) for m in members)
            dup = seen.intersection(ms)
            if dup:
                return None, f"map level {i}: a member is listed in more than one group"
            seen.update(ms)
            groups.append((str(g), ms))
        parsed.append(tuple(groups))
    problem = _check_map_nesting(parsed)
    if problem:
        return None, problem
    return Hierarchy("map", tuple(range(1, len(parsed) + 1)), groups=tuple(parsed), on_unknown=on_unknown), None


def _build_numeric(kind: str, spec: Mapping[str, Any]) -> tuple[Hierarchy | None, str | None]:
    bottom, top = spec.get("bottom"), spec.get("top")
    for name, v in (("bottom", bottom), ("top", top), ("offset", spec.get("offset"))):
        if v is not None and not _is_number(v):
            return None, f"needs '{name}' as a number"
    if bottom is not None and top is not None and not bottom < top:
        return None, "needs 'bottom' below 'top'"
    if kind == "round":
        steps = spec.get("steps")
        if (not isinstance(steps, list) or not steps or any(not _is_number(s) or not s > 0 for s in steps)
                or any(b <= a for a, b in zip(steps, steps[1:]))):
            return None, "needs 'steps' as an increasing list of positive numbers, e.g. [100, 1000, 10000]"
        pad = _digits(top) if top is not None else 0
        return Hierarchy("round", tuple(steps), bottom=bottom, top_code=top, pad=pad), None
    widths, edges = spec.get("widths"), spec.get("edges")
    if (widths is None) == (edges is None):
        return None, "needs either 'widths' (nested band widths) or 'edges' (band boundaries), not both"
    if edges is not None:
        if "offset" in spec or bottom is not None or top is not None:
            return None, "takes no 'offset', 'bottom' or 'top' with 'edges': the first and last edge bound the bands"
        levels = edges if edges and all(isinstance(e, list) for e in edges) else [edges]
        parsed: list[tuple[float, ...]] = []
        for i, lv in enumerate(levels, start=1):
            if (not isinstance(lv, list) or len(lv) < 1 or any(not _is_number(e) for e in lv)
                    or any(b <= a for a, b in zip(lv, lv[1:]))):
                return None, f"needs 'edges' level {i} as an increasing list of numbers, e.g. [0, 18, 65, 90]"
            parsed.append(tuple(float(e) for e in lv))
        for i in range(1, len(parsed)):
            if not set(parsed[i]) <= set(parsed[i - 1]):
                return None, f"needs the edges of level {i + 1} to be a subset of level {i}'s, so bands nest"
        pad = _digits(*parsed[0])
        return Hierarchy("band", tuple(range(1, len(parsed) + 1)), edges=tuple(parsed), pad=pad), None
    problem = _check_widths(widths, integer=False)
    if problem:
        return None, problem
    offset = float(spec.get("offset", 0.0))
    assert isinstance(widths, list)
    pad = _digits(top, offset, *widths) if top is not None else 0
    return Hierarchy("band", tuple(widths), offset=offset, bottom=bottom, top_code=top, pad=pad), None


def _quantile_bands(value: Any, nested: bool) -> tuple[list[int] | None, str | None]:
    bands = value if isinstance(value, list) else [value]
    if (not bands or any(isinstance(b, bool) or not isinstance(b, int) or b < 2 for b in bands)
            or (nested and any(a % b or b >= a for a, b in zip(bands, bands[1:])))):
        return None, ("needs 'bands' as a whole number of at least 2" if not nested else
                      "needs 'bands' as a list of band counts, each dividing the one before so bands nest, e.g. [8, 4, 2]")
    return bands, None


def _build_quantile(spec: Mapping[str, Any]) -> tuple[Hierarchy | None, str | None]:
    bands, problem = _quantile_bands(spec.get("bands"), nested=True)
    if bands is None:
        return None, problem
    precision = spec.get("precision", 2)
    if isinstance(precision, bool) or not isinstance(precision, int) or not 1 <= precision <= 6:
        return None, "needs 'precision' (significant digits of the edges) between 1 and 6"
    edges = spec.get("edges")
    if edges is None:  # resolved from a sample of the input when the run is prepared (resolve_quantiles)
        return Hierarchy("quantile", tuple(bands)), None
    h, problem = _build_numeric("band", {"edges": edges})
    return h, problem


def quantile_edges(values: pa.Array, bands: int, precision: int = 2) -> list[float]:
    """Interior edges that cut `values` into `bands` bands of about equal counts, rounded to `precision`
    significant digits (so an edge is a round number, not some person's value) and deduplicated. Deterministic:
    the same values give the same edges."""
    vals, ok = _as_floats(canonical_string(values))
    vals = np.sort(vals[ok])
    if not len(vals):
        return [0.0]
    qs = np.quantile(vals, [i / bands for i in range(1, bands)], method="linear")
    edges = sorted({float(f"{q:.{precision}g}") for q in qs})
    return edges or [0.0]


def needs_sample(raw: Mapping[str, Any]) -> list[str]:
    """Fields whose quantile bands (action or QI hierarchy) are not resolved yet."""
    out = [p for p, a in (raw.get("fields") or {}).items()
           if isinstance(a, Mapping) and a.get("method") == "quantile" and a.get("edges") is None]
    qis = ((raw.get("k_anonymity") or {}).get("quasi_identifiers") or {}) if isinstance(raw.get("k_anonymity"), Mapping) else {}
    out += [p for p, h in qis.items() if isinstance(h, Mapping) and h.get("hierarchy") == "quantile" and h.get("edges") is None]
    return out


def resolve_quantiles(raw: Mapping[str, Any], sample: Mapping[str, pa.Array], sample_rows: int) -> dict[str, Any]:
    """A copy of the policy document with every quantile band's edges computed on `sample` (leaf path ->
    column of raw input values) and recorded next to it (`edges`, `sample_rows`), for the manifest."""
    import copy

    out = copy.deepcopy(dict(raw))
    for path, a in (out.get("fields") or {}).items():
        if isinstance(a, dict) and a.get("method") == "quantile" and a.get("edges") is None and path in sample:
            bands = a.get("bands", 4)
            a["edges"] = quantile_edges(sample[path], bands if isinstance(bands, int) else 4, int(a.get("precision", 2)))
            a["sample_rows"] = sample_rows
    kanon = out.get("k_anonymity")
    if isinstance(kanon, dict):
        for path, h in (kanon.get("quasi_identifiers") or {}).items():
            if isinstance(h, dict) and h.get("hierarchy") == "quantile" and h.get("edges") is None and path in sample:
                raw_bands = h.get("bands", 4)
                counts: list[Any] = list(raw_bands) if isinstance(raw_bands, list) else [raw_bands]
                levels = [quantile_edges(sample[path], int(b), int(h.get("precision", 2))) for b in counts]
                for i in range(1, len(levels)):  # rounding can break the subset relation: keep coarser edges on finer ones
                    levels[i] = [e for e in levels[i] if e in set(levels[i - 1])] or levels[i - 1][:1]
                h["edges"] = levels
                h["sample_rows"] = sample_rows
    return out


def _build_csv(spec: Mapping[str, Any], on_unknown: str) -> tuple[Hierarchy | None, str | None]:
    from cloakbeam.core.policy import read_policy_file
    from cloakbeam.errors import PolicyError

    path = spec.get("path")
    if not isinstance(path, str) or not path:
        return None, "needs 'path': an ARX hierarchy file (CSV, ';' separated), relative to the policy file"
    delimiter = spec.get("delimiter", ";")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        return None, "needs 'delimiter' as one character (ARX files use ';')"
    try:
        text = read_policy_file(path, "hierarchy")
    except PolicyError as exc:
        return None, str(exc).split(": ", 1)[-1]
    table, problem = parse_hierarchy_csv(text, delimiter, path)
    if table is None:
        return None, problem
    digest = hashlib.sha256(text.encode()).hexdigest()
    levels = len(table[0]) - 1
    return Hierarchy("csv", tuple(range(1, levels + 1)), table=table, on_unknown=on_unknown, source=path, digest=digest), None


def parse_hierarchy_csv(text: str, delimiter: str, name: str) -> tuple[tuple[tuple[str, ...], ...] | None, str | None]:
    """Parse and validate an ARX hierarchy table; return (rows, None) or (None, sentence naming the line).

    Rows are (value, level 1, ..., level n); a last column that is ``*`` on every row is the implicit top and
    is dropped. Checked: same number of columns on every row, no empty cell, no value twice, monotone levels.
    Sentences name the file and line numbers, never a cell's content."""
    rows: list[tuple[str, ...]] = []
    lines: list[int] = []
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue
            rows.append(tuple(c.strip() for c in cells))
            lines.append(reader.line_num)
    except csv.Error:
        return None, f"hierarchy file {name} is not valid CSV near line {reader.line_num}"
    if not rows:
        return None, f"hierarchy file {name} has no rows"
    width = len(rows[0])
    for row, line in zip(rows, lines):
        if len(row) != width:
            return None, (f"hierarchy file {name} line {line} has {len(row)} columns but line {lines[0]} has {width}; "
                          "every value needs the same number of levels")
        if any(c == "" for c in row):
            return None, f"hierarchy file {name} line {line} has an empty cell"
    if width > 1 and all(r[-1] == STAR for r in rows):
        rows = [r[:-1] for r in rows]
        width -= 1
    if width < 2:
        return None, f"hierarchy file {name} needs at least one generalization level after the value column"
    first: dict[str, int] = {}
    for row, line in zip(rows, lines):
        seen = first.setdefault(row[0], line)
        if seen != line:
            return None, f"hierarchy file {name} line {line} repeats the value of line {seen}; each value needs exactly one row"
    for level in range(1, width - 1):
        image: dict[str, tuple[str, int]] = {}
        for row, line in zip(rows, lines):
            prev = image.setdefault(row[level], (row[level + 1], line))
            if prev[0] != row[level + 1]:
                return None, (f"hierarchy file {name} is not monotone: lines {prev[1]} and {line} share their level {level} "
                              f"value but differ at level {level + 1}; each level's value must determine the next")
    return tuple(rows), None


def _check_widths(widths: Any, integer: bool) -> str | None:
    if (not isinstance(widths, list) or not widths
            or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not math.isfinite(w) for w in widths)):
        return "needs 'widths' as a list of positive numbers, narrowest first, e.g. [5, 10, 20]"
    if integer and any(not float(w).is_integer() for w in widths):
        return "needs whole-year 'widths'"
    for a, b in zip(widths, widths[1:]):
        ratio = b / a
        if b <= a or abs(ratio - round(ratio)) > 1e-9:
            return "needs 'widths' where each width is a multiple of the previous one, so bands nest (e.g. [5, 10, 20])"
    return None


def _check_map_nesting(levels: list[tuple[tuple[str, tuple[str, ...]], ...]]) -> str | None:
    """Each level must coarsen the previous one: members grouped together stay together (unmapped -> ``*``)."""
    for i in range(1, len(levels)):
        fine = {m: g for g, ms in levels[i - 1] for m in ms}
        coarse = {m: g for g, ms in levels[i] for m in ms}
        image: dict[str, str] = {}
        for m in set(fine) | set(coarse):
            g_fine = fine.get(m, STAR)
            g_coarse = coarse.get(m, STAR)
            if image.setdefault(g_fine, g_coarse) != g_coarse:
                return (f"map level {i + 1} does not coarsen level {i}: members of group '{g_fine}' at level {i} "
                        f"must share one group at level {i + 1}")
        if image.get(STAR, STAR) != STAR:
            return f"map level {i + 1}: values unmapped at level {i} ('*') cannot be mapped again at level {i + 1}"
    return None


def unknown_error(path: str, hierarchy: Hierarchy, count: int) -> UnknownValueError:
    """The run-time failure for values outside a hierarchy's domain: field and count, never the value."""
    where = f" (file {hierarchy.source})" if hierarchy.kind == "csv" else ""
    return UnknownValueError(
        f"field '{path}': {count} value(s) are not in its {hierarchy.kind} hierarchy{where}; add them to the hierarchy, "
        "or set on_unknown: suppress (remove those records) or on_unknown: top (generalize them to '*')"
    )


# ---------------------------------------------------------------------------------------------------------
# The `generalize` action
# ---------------------------------------------------------------------------------------------------------
_METHODS = ("band", "quantile", "round", "truncate", "date", "age_band", "prefix", "map", "csv", "suppress")


def _positive(v: Any) -> str | None:
    return None if v > 0 and math.isfinite(v) else "must be a positive number"


@register
class Generalize(Action):
    """Generalize a column to a fixed level, or (``level: auto``) hand it at full detail to the k-anonymity stage.

    Fixed levels: ``{action: generalize, method: band, width: 10}`` (or ``edges: [0, 18, 65]``, with ``offset``,
    ``bottom``, ``top``), ``method: round, to: 1000`` (a number stays a number; ``top``/``bottom`` code the
    tails), ``method: truncate, to: hour|day|month|year`` (a timestamp stays a timestamp), ``method: date,
    to: year``, ``method: age_band, width: 10, as_of: 2025-01-01``, ``method: prefix, keep: 3``, ``method: map,
    groups: {adult: [...]}``, ``method: csv, path: FILE, to: 2``, ``method: suppress``.
    ``level: auto`` outputs the canonical string unchanged at protect time; the `k_anonymity` policy section
    must list the field as a quasi-identifier, and its stage applies the level the search chose. Never leaves a
    value in an error message.
    """

    name = "generalize"
    accepts = (is_generalizable,)
    params = {
        "level": Param(str, choices=("auto",), doc="'auto': the k_anonymity section chooses the level"),
        "method": Param(str, choices=_METHODS),
        "width": Param((int, float), check=_positive),
        "edges": Param(list),
        "offset": Param((int, float)),
        "bottom": Param((int, float)),
        "top": Param((int, float)),
        "to": Param((str, int, float)),
        "keep": Param(int, check=lambda n: None if n >= 1 else "must be at least 1"),
        "groups": Param(dict),
        "as_of": Param((str, _dt.date)),
        "path": Param(str),
        "delimiter": Param(str),
        "on_unknown": Param(str, choices=ON_UNKNOWN),
        "bands": Param(int, check=lambda n: None if n >= 2 else "must be at least 2"),
        "precision": Param(int, check=lambda n: None if 1 <= n <= 6 else "must be between 1 and 6"),
        "sample_rows": Param(int),
    }

    _NEEDS: dict[str, tuple[set[str], set[str]]] = {  # method -> (required, optional)
        "band": (set(), {"width", "edges", "offset", "bottom", "top"}),
        "quantile": ({"bands"}, {"precision", "edges", "sample_rows"}),
        "round": ({"to"}, {"bottom", "top"}),
        "truncate": ({"to"}, set()),
        "date": ({"to"}, set()),
        "age_band": ({"width", "as_of"}, set()),
        "prefix": ({"keep"}, set()),
        "map": ({"groups"}, {"on_unknown"}),
        "csv": ({"path", "to"}, {"delimiter", "on_unknown"}),
        "suppress": (set(), set()),
    }

    def configure(self) -> None:
        o = self.options
        given = {k for k, v in o.items() if v is not None}
        self.hierarchy: Hierarchy | None = None
        self.level = 1
        self.numeric_out: pa.DataType | None = None
        if o["level"] == "auto":
            extra = sorted(given - {"level"})
            if extra:
                raise self.fail(f"'level: auto' takes no other parameter (remove '{extra[0]}'); the hierarchy goes in the k_anonymity section")
            return
        method = o["method"]
        if method is None:
            raise self.fail("needs 'method' (one of " + ", ".join(_METHODS) + ") or 'level: auto'")
        need, optional = self._NEEDS[method]
        missing = sorted(need - given)
        if missing:
            raise self.fail(f"method '{method}' needs parameter '{missing[0]}'")
        extra = sorted(given - need - optional - {"method"})
        if extra:
            raise self.fail(f"method '{method}' does not take parameter '{extra[0]}'")
        t = self.field.arrow_type
        spec = self._spec(method, o, t)
        hierarchy, problem = build_hierarchy(spec, t)
        if hierarchy is None:
            raise self.fail(f"the field {problem}")
        if hierarchy.kind == "csv" and self.level >= hierarchy.top:
            raise self.fail(f"'to: {self.level}' is above the hierarchy file's levels (1..{hierarchy.top - 1}; '*' would be {hierarchy.top})")
        self.hierarchy = hierarchy

    def _spec(self, method: str, o: Mapping[str, Any], t: pa.DataType) -> dict[str, Any]:
        tails = {k: o[k] for k in ("bottom", "top") if o[k] is not None}
        if method == "band":
            if (o["width"] is None) == (o["edges"] is None):
                raise self.fail("method 'band' needs either 'width' or 'edges'")
            if o["edges"] is not None:
                return {"hierarchy": "band", "edges": o["edges"], **tails, **({"offset": o["offset"]} if o["offset"] is not None else {})}
            return {"hierarchy": "band", "widths": [o["width"]], **tails, **({"offset": o["offset"]} if o["offset"] is not None else {})}
        if method == "quantile":
            if not _is_numeric(t):
                raise self.fail(f"method 'quantile' needs a numeric field, not {t}")
            if o["edges"] is None:
                return {"hierarchy": "quantile", "bands": o["bands"]}  # resolved from a sample when the run is prepared
            return {"hierarchy": "band", "edges": o["edges"]}
        if method == "round":
            if not _is_number(o["to"]) or not o["to"] > 0:
                raise self.fail("method 'round' needs 'to' as a positive step, e.g. to: 1000")
            if not _is_numeric(t):
                raise self.fail(f"method 'round' needs a numeric field, not {t}")
            whole = float(o["to"]).is_integer() and all(float(v).is_integer() for v in tails.values())
            self.numeric_out = t if pa.types.is_integer(t) and whole else (t if pa.types.is_floating(t) else pa.float64())
            return {"hierarchy": "round", "steps": [o["to"]], **tails}
        if method == "truncate":
            if o["to"] not in TRUNCATE_UNITS:
                raise self.fail(f"method 'truncate' needs 'to' set to one of {', '.join(TRUNCATE_UNITS)}")
            if not (pa.types.is_timestamp(t) or pa.types.is_date(t)):
                raise self.fail(f"method 'truncate' needs a date or timestamp field, not {t}")
            if o["to"] == "hour" and pa.types.is_date(t):
                raise self.fail("method 'truncate' to 'hour' needs a timestamp field; a date has no hours")
            self.numeric_out = t
            return {"hierarchy": "date", "levels": [o["to"]]}
        if method == "date":
            if o["to"] not in DATE_UNITS:
                raise self.fail(f"method 'date' needs 'to' set to one of {', '.join(DATE_UNITS)}")
            return {"hierarchy": "date", "levels": [o["to"]]}
        if method == "age_band":
            return {"hierarchy": "age", "widths": [o["width"]], "as_of": o["as_of"]}
        if method == "prefix":
            return {"hierarchy": "prefix", "lengths": [o["keep"]]}
        if method == "map":
            return {"hierarchy": "map", "levels": [o["groups"]], "on_unknown": o["on_unknown"] or "error"}
        if method == "csv":
            level = o["to"]
            if isinstance(level, bool) or not isinstance(level, int) or level < 1:
                raise self.fail("method 'csv' needs 'to' as the level to release (1 = first generalization column)")
            self.level = level
            spec = {"hierarchy": "csv", "path": o["path"], "on_unknown": o["on_unknown"] or "error"}
            if o["delimiter"] is not None:
                spec["delimiter"] = o["delimiter"]
            return spec
        return {"hierarchy": "suppress"}

    @property
    def is_auto(self) -> bool:
        return self.options["level"] == "auto"

    def output_type(self) -> pa.DataType:
        return self.numeric_out if self.numeric_out is not None else pa.string()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if isinstance(d.get("as_of"), _dt.date):
            d["as_of"] = d["as_of"].isoformat()
        if self.hierarchy is not None and self.hierarchy.kind == "csv":
            d["sha256"] = self.hierarchy.digest
        return d

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        h = self.hierarchy
        if h is None:  # level: auto -> full detail; the k-anonymity stage generalizes
            return canonical_string(column)
        method = self.options["method"]
        if method == "truncate":
            return _truncate(column, self.options["to"])
        if method == "round":
            return _round_numbers(column, float(self.options["to"]), self.options["bottom"], self.options["top"], self.output_type())
        canon = canonical_string(column)
        if h.has_domain:
            unknown = h.unknown(canon)
            n = int(unknown.sum())
            if n:
                if h.on_unknown == "error":
                    raise unknown_error(self.field.path, h, n)
                if h.on_unknown == "suppress":
                    ctx.reject_rows(unknown, "unknown_value", self.field.path)
                ctx.count(f"generalize.{self.field.path}.unknown", n)
        return h.apply(canon, self.level)


def _truncate(column: pa.Array, unit: str) -> pa.Array:
    """Truncate dates/timestamps to the start of their hour/day/month/year, keeping the column's type."""
    t = column.type
    if pa.types.is_date(t):
        as_ts = column.cast(pa.timestamp("s"))
        return pc.floor_temporal(as_ts, unit=unit).cast(t)
    return pc.floor_temporal(column, unit=unit)


def _round_numbers(column: pa.Array, step: float, bottom: float | None, top: float | None, out: pa.DataType) -> pa.Array:
    """Round numbers to the nearest multiple of `step`, clip to [bottom, top] (top/bottom coding); nulls stay."""
    vals = column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    rounded = round_half_up(np.where(np.isfinite(vals), vals, 0.0), step)
    if bottom is not None:
        rounded = np.where(vals < bottom, bottom, rounded)
    if top is not None:
        rounded = np.where(vals >= top, top, rounded)
    rounded = np.where(np.isfinite(vals), rounded, vals)  # NaN/inf stay as they were (floats only)
    arr = pa.array(rounded, pa.float64(), mask=column.is_null().to_numpy(zero_copy_only=False))
    return arr.cast(out) if out != pa.float64() else arr
