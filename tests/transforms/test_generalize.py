"""The generalization primitives and the `generalize` action: known answers, nulls, nesting, bad parameters."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.errors import PolicyError
from cloakbeam.tests.kanon_fixtures import people_batch, people_schema, protect
from cloakbeam.transforms.generalize import (
    Hierarchy,
    age_band,
    build_hierarchy,
    canonical_string,
    categorical_map,
    date_unit,
    numeric_band,
    prefix,
    suppress,
)
from cloakbeam.transforms.policy import compile_policy

DATES = pa.array([dt.date(1985, 3, 12), None, dt.date(2000, 12, 31), dt.date(1969, 1, 1)], pa.date32())


def test_canonical_string_renders_each_type_at_full_detail():
    assert canonical_string(DATES).to_pylist() == ["1985-03-12", None, "2000-12-31", "1969-01-01"]
    assert canonical_string(pa.array([34, None, -5])).to_pylist() == ["34", None, "-5"]
    assert canonical_string(pa.array([34.5, 2.0])).to_pylist() == ["34.5", "2"]
    assert canonical_string(pa.array([True, None, False])).to_pylist() == ["true", None, "false"]
    ts = pa.array([dt.datetime(2020, 5, 1, 8, 30)], pa.timestamp("us"))
    assert canonical_string(ts).to_pylist() == ["2020-05-01 08:30:00.000000"]


def test_date_units_known_answers():
    c = canonical_string(DATES)
    assert date_unit(c, "month").to_pylist() == ["1985-03", None, "2000-12", "1969-01"]
    assert date_unit(c, "year").to_pylist() == ["1985", None, "2000", "1969"]
    assert date_unit(c, "decade").to_pylist() == ["1980s", None, "2000s", "1960s"]
    with pytest.raises(ValueError):
        date_unit(c, "week")


def test_age_band_counts_birthdays_exactly():
    c = canonical_string(DATES)
    # 1985-03-12 turns 40 on 2025-03-12, not a day earlier.
    assert age_band(c, 10, dt.date(2025, 3, 12)).to_pylist() == ["[40, 50)", None, "[20, 30)", "[50, 60)"]
    assert age_band(c, 10, dt.date(2025, 3, 11)).to_pylist() == ["[30, 40)", None, "[20, 30)", "[50, 60)"]
    assert age_band(pa.array(["garbage"]), 5, dt.date(2025, 1, 1)).to_pylist() == ["*"]


def test_numeric_bands_floor_negatives_and_keep_nulls():
    c = canonical_string(pa.array([34, None, -5, 40, 0]))
    assert numeric_band(c, 10).to_pylist() == ["[30, 40)", None, "[-10, 0)", "[40, 50)", "[0, 10)"]
    assert numeric_band(canonical_string(pa.array([0.3, 0.74])), 0.25).to_pylist() == ["[0.25, 0.5)", "[0.5, 0.75)"]
    h = Hierarchy("band", (10, 20))
    assert h.apply(pa.array(["not a number", None, "nan"]), 1).to_pylist() == ["*", None, "*"]


def test_prefix_and_map_and_suppress():
    z = pa.array(["94107", "9410", None, "1"])
    assert prefix(z, 3).to_pylist() == ["941*", "941*", None, "1"]
    assert prefix(z, 1).to_pylist() == ["9*", "9*", None, "1"]
    g = pa.array(["male", "female", "other", None])
    assert categorical_map(g, {"M": ["male"], "F": ["female"]}).to_pylist() == ["M", "F", "*", None]
    assert suppress(g).to_pylist() == ["*"] * 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(alphabet="0123456789ab", max_size=7)), max_size=30))
def test_prefix_hierarchy_levels_nest(values):
    """Level j is a function of level i < j: values sharing a level-i label share every higher label."""
    h = Hierarchy("prefix", (5, 3, 1))
    canon = pa.array(values, pa.string())
    levels = [h.apply(canon, lv).to_pylist() for lv in range(h.top + 1)]
    for i in range(len(levels)):
        for j in range(i + 1, len(levels)):
            image = {}
            for a, b in zip(levels[i], levels[j]):
                assert image.setdefault(a, b) == b


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(-10_000, 10_000)), max_size=30))
def test_band_hierarchy_levels_nest(values):
    h = Hierarchy("band", (5, 10, 50))
    canon = canonical_string(pa.array(values, pa.int64()))
    levels = [h.apply(canon, lv).to_pylist() for lv in range(h.top + 1)]
    for i in range(len(levels) - 1):
        image = {}
        for a, b in zip(levels[i], levels[i + 1]):
            assert image.setdefault(a, b) == b
    assert levels[-1] == ["*"] * len(values)


@pytest.mark.parametrize(
    "spec, arrow_type, words",
    [
        ({"hierarchy": "band", "widths": [5, 12]}, pa.int32(), "multiple of the previous"),
        ({"hierarchy": "band", "widths": []}, pa.int32(), "positive numbers"),
        ({"hierarchy": "band", "widths": [10]}, pa.date32(), "numeric field"),
        ({"hierarchy": "date", "levels": ["year", "month"]}, pa.date32(), "increasing list"),
        ({"hierarchy": "date"}, pa.int64(), "date or timestamp"),
        ({"hierarchy": "age", "widths": [5]}, pa.date32(), "as_of"),
        ({"hierarchy": "prefix", "lengths": [1, 3]}, pa.string(), "strictly decreasing"),
        ({"hierarchy": "map", "levels": [{"a": ["x", "y"], "b": ["z"]}, {"p": ["x"], "q": ["y", "z"]}]}, pa.string(), "does not coarsen"),
        ({"hierarchy": "map", "levels": [{"a": ["x"], "b": ["x"]}]}, pa.string(), "more than one group"),
        ({"hierarchy": "map", "levels": [{"a": ["x"]}, {"a": ["x"], "b": ["y"]}]}, pa.string(), "unmapped"),
        ({"hierarchy": "cube"}, pa.string(), "one of"),
        ({"hierarchy": "prefix", "lengths": [3], "width": 2}, pa.string(), "unknown key"),
    ],
)
def test_bad_hierarchies_are_refused_with_a_sentence(spec, arrow_type, words):
    h, problem = build_hierarchy(spec, arrow_type)
    assert h is None and words in problem


def _policy(field_spec):
    fields = {"id": "drop", "diagnosis": "keep", "dob": "drop", "zip": "drop", "gender": "drop", "age": "drop", "home": "drop"}
    fields.update(field_spec)
    return compile_policy({"fields": fields}, people_schema())


def test_generalize_action_fixed_levels_through_protect_batch():
    pol = _policy({
        "dob": {"action": "generalize", "method": "date", "to": "year"},
        "zip": {"action": "generalize", "method": "prefix", "keep": 3},
        "gender": {"action": "generalize", "method": "map", "groups": {"known": ["f", "m"]}, "on_unknown": "top"},
        "age": {"action": "generalize", "method": "band", "width": 10},
    })
    assert all(pol.output_schema().field(n).type == pa.string() for n in ("dob", "zip", "gender", "age"))
    batch = people_batch([{"dob": dt.date(1985, 3, 12), "zip": "94107", "gender": "x", "age": 37},
                          {"dob": dt.date(1990, 1, 1), "zip": "10001", "gender": "m", "age": None}])
    out = protect(batch, pol).to_pylist()
    assert [(r["dob"], r["zip"], r["gender"], r["age"]) for r in out] == [
        ("1985", "941*", "*", "[30, 40)"),
        ("1990", "100*", "known", None),
    ]


def test_generalize_age_band_and_suppress_actions():
    pol = _policy({"dob": {"action": "generalize", "method": "age_band", "width": 5, "as_of": "2025-06-30"},
                   "zip": {"action": "generalize", "method": "suppress"}})
    out = protect(people_batch([{"dob": dt.date(1985, 3, 12), "zip": "94107"}]), pol).to_pylist()
    assert (out[0]["dob"], out[0]["zip"]) == ("[40, 45)", "*")
    assert pol.actions["dob"].describe()["as_of"] == "2025-06-30"


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"action": "generalize"}, "needs 'method'"),
        ({"action": "generalize", "method": "date"}, "needs parameter 'to'"),
        ({"action": "generalize", "method": "date", "to": "year", "keep": 3}, "does not take parameter 'keep'"),
        ({"action": "generalize", "method": "band", "width": 10}, "numeric field"),
        ({"action": "generalize", "method": "age_band", "width": 5, "as_of": "yesterday"}, "as_of"),
        ({"action": "generalize", "level": "auto", "method": "date"}, "takes no other parameter"),
        ({"action": "generalize", "level": "max"}, "must be one of"),
        ({"action": "generalize", "method": "prefix", "keep": 0}, "at least 1"),
    ],
)
def test_generalize_action_bad_parameters_fail_at_compile(spec, words):
    with pytest.raises(PolicyError) as exc:
        _policy({"dob": spec})
    assert words in str(exc.value) and "dob" in str(exc.value)


def test_generalize_refuses_unsupported_types():
    schema = {"type": "record", "name": "B", "fields": [{"name": "blob", "type": "bytes"}]}
    from cloakbeam.schemas.avro import schema_from_dict

    with pytest.raises(PolicyError, match="cannot be applied"):
        compile_policy({"fields": {"blob": {"action": "generalize", "method": "suppress"}}}, schema_from_dict(schema))
