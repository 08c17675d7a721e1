"""Generalization primitives and the `generalize` action.

Every primitive is a vectorized function over Arrow arrays (pyarrow.compute, numpy); nothing here imports Beam
and nothing here logs or raises with a value in the message.

All generalized columns are strings, whatever the input type: a column has ONE output type in every batch and
file (`pa.string()`), at every level, so the Parquet schema never depends on the level the k-anonymity search
picks. The input is first rendered as its *canonical string* (level 0, full detail):

- date32/date64 -> ``1985-03-12``; timestamp -> ``1985-03-12 08:15:00.000000`` (``Z`` suffix when tz-aware)
- integers and floats -> Arrow's decimal rendering (``34``, ``34.5``); strings unchanged; booleans ``true``/``false``

and every hierarchy level is a function of that canonical string, so the k-anonymity stage can generalize a
column that the protect stage already turned into its canonical string (`level: auto`).

Hierarchies (level 0 = canonical value, top level = ``*`` = full suppression of the attribute):

- ``band``   numeric bands of widening widths, e.g. widths [5, 10, 20]; each width must divide the next so bands
             nest. Labels are half-open intervals ``[30, 40)``.
- ``date``   day -> month (``1985-03``) -> year (``1985``) -> decade (``1980s``), any increasing subset.
- ``age``    age in whole years at a fixed reference date ``as_of`` (never "today": runs must be reproducible),
             in nested bands, e.g. [5, 10, 20] -> ``[30, 35)``.
- ``prefix`` keep the first N characters and mark the cut with one ``*`` (zip ``94107`` -> ``941*`` -> ``9*``);
             values not longer than N are unchanged.
- ``map``    categorical groups given in the policy, one mapping per level ``{group: [members]}``; each level
             must coarsen the previous one; values not mapped at a level become ``*``.
- ``suppress`` no intermediate level: the value or ``*``.

Nulls stay null at every level below the top (a null is its own equivalence class); the top level is ``*``.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cloakbeam.transforms.registry import Action, ActionContext, Param, register

STAR = "*"
DATE_UNITS = ("month", "year", "decade")


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


def numeric_band(canon: pa.Array, width: float) -> pa.Array:
    """Half-open band label ``[lo, hi)`` with lo = floor(v / width) * width; nulls stay null.

    Unparseable or non-finite values become ``*`` (the column's own type guarantees numbers; a string column
    given to a band hierarchy fails closed to suppression)."""
    nums = pc.cast(canon, pa.float64(), safe=False) if pa.types.is_string(canon.type) else canon.cast(pa.float64())
    vals = nums.to_numpy(zero_copy_only=False)
    valid = ~np.isnan(vals) & np.isfinite(vals)
    lo = np.where(valid, np.floor(np.where(valid, vals, 0.0) / width) * width, 0.0)
    hi = lo + width
    integral = float(width).is_integer() and bool(np.all(np.abs(lo[valid]) < 2**53))
    lo_s, hi_s = _fmt_number(lo, integral), _fmt_number(hi, integral)
    label = pc.binary_join_element_wise("[", lo_s, ", ", hi_s, ")", "")
    null_mask = pc.is_null(canon)
    label = pc.if_else(pa.array(valid), label, STAR)
    return pc.if_else(null_mask, pa.scalar(None, pa.string()), label)


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
    """Truncate an ISO date/timestamp string to ``month`` (YYYY-MM), ``year`` (YYYY) or ``decade`` (YYY0s)."""
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
    """A generalization hierarchy over canonical strings. Picklable; `apply` is vectorized."""

    kind: str
    steps: tuple[Any, ...] = ()  # one entry per intermediate level
    as_of: _dt.date | None = None
    groups: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = field(default=())  # map levels

    @property
    def top(self) -> int:
        """Index of the top level (``*``); levels run 0..top."""
        return len(self.steps) + 1

    def level_names(self) -> list[str]:
        names = ["value"]
        for s in self.steps:
            if self.kind == "band":
                names.append(f"band {_num_label(s)}")
            elif self.kind == "age":
                names.append(f"age band {_num_label(s)}")
            elif self.kind == "date":
                names.append(str(s))
            elif self.kind == "prefix":
                names.append(f"prefix {s}")
            elif self.kind == "map":
                names.append(f"map level {len(names)}")
        names.append("suppressed")
        return names

    def apply(self, canon: pa.Array, level: int) -> pa.Array:
        """Generalize canonical strings to `level` (0 = unchanged, `top` = ``*``)."""
        if level < 0 or level > self.top:
            raise ValueError(f"level {level} is outside 0..{self.top}")
        if level == 0:
            return canon
        if level == self.top:
            return suppress(canon)
        step = self.steps[level - 1]
        if self.kind == "band":
            return numeric_band(_parse_number_strings(canon), float(step))
        if self.kind == "date":
            return date_unit(canon, step)
        if self.kind == "age":
            assert self.as_of is not None
            return age_band(canon, int(step), self.as_of)
        if self.kind == "prefix":
            return prefix(canon, int(step))
        if self.kind == "map":
            return categorical_map(canon, {g: list(m) for g, m in self.groups[level - 1]})
        raise ValueError(f"unknown hierarchy '{self.kind}'")

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"hierarchy": self.kind, "levels": self.level_names()}
        if self.as_of is not None:
            d["as_of"] = self.as_of.isoformat()
        return d


def _num_label(x: Any) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


HIERARCHY_KINDS = ("band", "date", "age", "prefix", "map", "suppress")


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


def build_hierarchy(spec: Mapping[str, Any], arrow_type: pa.DataType) -> tuple[Hierarchy | None, str | None]:
    """Build a Hierarchy from a policy mapping; return (None, sentence) when the spec is bad.

    Accepted forms: ``{hierarchy: band, widths: [...]}``, ``{hierarchy: date, levels: [month, year, decade]}``,
    ``{hierarchy: age, as_of: YYYY-MM-DD, widths: [...]}``, ``{hierarchy: prefix, lengths: [3, 1]}``,
    ``{hierarchy: map, levels: [{group: [members]}, ...]}``, ``{hierarchy: suppress}``.
    """
    if not isinstance(spec, Mapping):
        return None, "must be a mapping such as {hierarchy: prefix, lengths: [3, 1]}"
    kind = spec.get("hierarchy")
    if kind not in HIERARCHY_KINDS:
        return None, f"needs 'hierarchy' set to one of {', '.join(HIERARCHY_KINDS)}"
    allowed = {"band": {"widths"}, "date": {"levels"}, "age": {"widths", "as_of"}, "prefix": {"lengths"},
               "map": {"levels"}, "suppress": set()}[kind] | {"hierarchy"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        return None, f"has unknown key '{unknown[0]}' for hierarchy '{kind}'; allowed: {', '.join(sorted(allowed))}"
    if not is_generalizable(arrow_type):
        return None, f"has type {arrow_type}, which cannot be generalized"

    if kind == "suppress":
        return Hierarchy("suppress"), None
    if kind in ("band", "age"):
        if kind == "band" and not (_is_numeric(arrow_type) or pa.types.is_string(arrow_type)):
            return None, f"is of type {arrow_type}; a 'band' hierarchy needs a numeric field"
        if kind == "age" and not _is_temporal(arrow_type):
            return None, f"is of type {arrow_type}; an 'age' hierarchy needs a date or timestamp field"
        widths = spec.get("widths")
        problem = _check_widths(widths, integer=(kind == "age"))
        if problem or widths is None:
            return None, problem or "needs 'widths'"
        as_of = None
        if kind == "age":
            as_of = parse_as_of(spec.get("as_of"))
            if as_of is None:
                return None, "needs 'as_of: YYYY-MM-DD', the fixed reference date for ages (never today, so runs repeat)"
        return Hierarchy(kind, tuple(widths), as_of=as_of), None
    if kind == "date":
        if not _is_temporal(arrow_type):
            return None, f"is of type {arrow_type}; a 'date' hierarchy needs a date or timestamp field"
        levels = spec.get("levels", list(DATE_UNITS))
        if (not isinstance(levels, list) or not levels or any(u not in DATE_UNITS for u in levels)
                or [DATE_UNITS.index(u) for u in levels] != sorted({DATE_UNITS.index(u) for u in levels})):
            return None, "needs 'levels' as an increasing list drawn from month, year, decade"
        return Hierarchy("date", tuple(levels)), None
    if kind == "prefix":
        lengths = spec.get("lengths")
        if (not isinstance(lengths, list) or not lengths
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths)
                or any(a <= b for a, b in zip(lengths, lengths[1:]))):
            return None, "needs 'lengths' as a strictly decreasing list of positive integers, e.g. [3, 1]"
        return Hierarchy("prefix", tuple(lengths)), None
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
    return Hierarchy("map", tuple(range(1, len(parsed) + 1)), groups=tuple(parsed)), None


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


# ---------------------------------------------------------------------------------------------------------
# The `generalize` action
# ---------------------------------------------------------------------------------------------------------
_METHODS = ("band", "date", "age_band", "prefix", "map", "suppress")


@register
class Generalize(Action):
    """Generalize a column to a fixed level, or (``level: auto``) hand it at full detail to the k-anonymity stage.

    Fixed levels: ``{action: generalize, method: band, width: 10}``, ``method: date, to: year``,
    ``method: age_band, width: 10, as_of: 2025-01-01``, ``method: prefix, keep: 3``,
    ``method: map, groups: {adult: [...]}``, ``method: suppress``.
    ``level: auto`` outputs the canonical string unchanged at protect time; the `k_anonymity` policy section
    must list the field as a quasi-identifier, and its stage applies the level the search chose. The output is
    always a string column. Never leaves a value in an error message.
    """

    name = "generalize"
    accepts = (is_generalizable,)
    params = {
        "level": Param(str, choices=("auto",), doc="'auto': the k_anonymity section chooses the level"),
        "method": Param(str, choices=_METHODS),
        "width": Param((int, float), check=lambda w: None if w > 0 and math.isfinite(w) else "must be a positive number"),
        "to": Param(str, choices=DATE_UNITS),
        "keep": Param(int, check=lambda n: None if n >= 1 else "must be at least 1"),
        "groups": Param(dict),
        "as_of": Param((str, _dt.date)),
    }

    _NEEDS = {"band": {"width"}, "date": {"to"}, "age_band": {"width", "as_of"}, "prefix": {"keep"},
              "map": {"groups"}, "suppress": set()}

    def configure(self) -> None:
        o = self.options
        given = {k for k, v in o.items() if v is not None}
        if o["level"] == "auto":
            extra = sorted(given - {"level"})
            if extra:
                raise self.fail(f"'level: auto' takes no other parameter (remove '{extra[0]}'); the hierarchy goes in the k_anonymity section")
            self.hierarchy = None
            return
        method = o["method"]
        if method is None:
            raise self.fail("needs 'method' (one of " + ", ".join(_METHODS) + ") or 'level: auto'")
        need = self._NEEDS[method]
        missing = sorted(need - given)
        if missing:
            raise self.fail(f"method '{method}' needs parameter '{missing[0]}'")
        extra = sorted(given - need - {"method"})
        if extra:
            raise self.fail(f"method '{method}' does not take parameter '{extra[0]}'")
        t = self.field.arrow_type
        if method == "band":
            spec: dict[str, Any] = {"hierarchy": "band", "widths": [o["width"]]}
        elif method == "date":
            spec = {"hierarchy": "date", "levels": [o["to"]]}
        elif method == "age_band":
            spec = {"hierarchy": "age", "widths": [o["width"]], "as_of": o["as_of"]}
        elif method == "prefix":
            spec = {"hierarchy": "prefix", "lengths": [o["keep"]]}
        elif method == "map":
            spec = {"hierarchy": "map", "levels": [o["groups"]]}
        else:
            spec = {"hierarchy": "suppress"}
        hierarchy, problem = build_hierarchy(spec, t)
        if hierarchy is None:
            raise self.fail(f"the field {problem}")
        self.hierarchy = hierarchy

    @property
    def is_auto(self) -> bool:
        return self.options["level"] == "auto"

    def output_type(self) -> pa.DataType:
        return pa.string()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if isinstance(d.get("as_of"), _dt.date):
            d["as_of"] = d["as_of"].isoformat()
        return d

    def apply(self, column: pa.Array, columns: Mapping[str, pa.Array], ctx: ActionContext) -> pa.Array:
        canon = canonical_string(column)
        if self.hierarchy is None:  # level: auto -> full detail; the k-anonymity stage generalizes
            return canon
        return self.hierarchy.apply(canon, 1)
