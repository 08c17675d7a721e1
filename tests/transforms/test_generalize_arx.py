"""ARX-style generalization: band edges/offset/top-bottom coding, rounding, timestamp truncation, ARX hierarchy
files (validation, paths relative to the policy, attachments for workers) and `on_unknown`."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloakbeam.errors import PolicyError, UnknownValueError
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.transforms.generalize import Hierarchy, band_labels, build_hierarchy, canonical_string, parse_hierarchy_csv
from cloakbeam.transforms.policy import compile_policy, load_policy
from cloakbeam.transforms.protect import protect_batch
from cloakbeam.transforms.registry import ActionContext

SCHEMA = schema_from_dict({"type": "record", "name": "R", "fields": [
    {"name": "age", "type": ["null", "int"], "default": None},
    {"name": "income", "type": ["null", "double"], "default": None},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}},
    {"name": "job", "type": "string"},
]}, source="r.avsc")

AGES = pa.array([-3, 0, 17, 18, 64, 65, 89, 90, 120, None], pa.int32())


def _levels_nest(h: Hierarchy, canon: pa.Array) -> None:
    levels = [h.apply(canon, lv).to_pylist() for lv in range(h.top + 1)]
    for i in range(len(levels) - 1):
        image: dict = {}
        for a, b in zip(levels[i], levels[i + 1]):
            assert image.setdefault(a, b) == b, (i, a, b)
    assert levels[-1] == ["*"] * len(canon)


def test_band_edges_top_and_bottom_coding_with_labels_that_sort():
    h, problem = build_hierarchy({"hierarchy": "band", "edges": [[0, 18, 30, 65, 90], [0, 18, 65, 90]]}, pa.int32())
    assert problem is None and h.top == 3
    lv1 = h.apply(canonical_string(AGES), 1).to_pylist()
    assert lv1 == ["(-inf, 00)", "[00, 18)", "[00, 18)", "[18, 30)", "[30, 65)", "[65, 90)", "[65, 90)", "[90, inf)", "[90, inf)", None]
    labels = ["(-inf, 00)", "[00, 18)", "[18, 30)", "[30, 65)", "[65, 90)", "[90, inf)"]
    assert sorted(labels) == labels  # string order is numeric order
    assert h.apply(canonical_string(AGES), 2).to_pylist()[3:5] == ["[18, 65)", "[18, 65)"]
    _levels_nest(h, canonical_string(AGES))
    assert h.level_names() == ["value", "bands 0|18|30|65|90", "bands 0|18|65|90", "suppressed"]


def test_band_widths_with_offset_and_top_coding_clip_the_last_band():
    h, _ = build_hierarchy({"hierarchy": "band", "widths": [10, 20], "offset": 5, "bottom": 5, "top": 90}, pa.int32())
    out = h.apply(canonical_string(pa.array([4, 5, 14, 15, 84, 89, 90, 200])), 1).to_pylist()
    assert out == ["(-inf, 05)", "[05, 15)", "[05, 15)", "[15, 25)", "[75, 85)", "[85, 90)", "[90, inf)", "[90, inf)"]
    assert h.apply(canonical_string(pa.array([14, 24, 26])), 2).to_pylist() == ["[05, 25)", "[05, 25)", "[25, 45)"]
    # Without an upper bound the labels stay as before (no padding).
    assert band_labels(canonical_string(pa.array([34])), width=10).to_pylist() == ["[30, 40)"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(-50, 200)), max_size=40),
       st.sampled_from([{"hierarchy": "band", "widths": [5, 10, 40], "offset": 3, "top": 150, "bottom": -10},
                        {"hierarchy": "band", "edges": [[-5, 0, 10, 20, 50, 100], [0, 20, 100], [0, 100]]},
                        {"hierarchy": "round", "steps": [5, 10, 100], "top": 150, "bottom": 0}]))
def test_numeric_hierarchies_nest(values, spec):
    h, problem = build_hierarchy(spec, pa.int64())
    assert problem is None
    _levels_nest(h, canonical_string(pa.array(values, pa.int64())))


def test_round_hierarchy_rounds_each_level_from_the_previous():
    h, _ = build_hierarchy({"hierarchy": "round", "steps": [100, 1000], "top": 250000}, pa.float64())
    canon = canonical_string(pa.array([1449.0, 1450.0, 49_999.99, 260_000.0, None]))
    assert h.apply(canon, 1).to_pylist() == ["001400", "001500", "050000", "[250000, inf)", None]
    assert h.apply(canon, 2).to_pylist() == ["001000", "002000", "050000", "[250000, inf)", None]
    assert h.level_names() == ["value", "round 100", "round 1000", "suppressed"]


def test_date_hierarchy_hour_and_day_levels():
    ts = pa.array([dt.datetime(2021, 3, 4, 5, 6, 7)], pa.timestamp("us", tz="UTC"))
    h, _ = build_hierarchy({"hierarchy": "date", "levels": ["hour", "day", "month"]}, ts.type)
    canon = canonical_string(ts)
    assert [h.apply(canon, lv).to_pylist()[0] for lv in range(1, 4)] == ["2021-03-04 05:00", "2021-03-04", "2021-03"]
    h2, problem = build_hierarchy({"hierarchy": "date", "levels": ["hour"]}, pa.date32())
    assert h2 is None and "timestamp" in problem


HIER = "value;l1;l2;*\na;ab;abc;*\nb;ab;abc;*\nc;cd;abc;*\nd;cd;abc;*\n"


def test_csv_hierarchy_parses_arx_format_and_drops_the_star_column():
    rows, problem = parse_hierarchy_csv(HIER.split("\n", 1)[1], ";", "h.csv")
    assert problem is None and rows[0] == ("a", "ab", "abc")


@pytest.mark.parametrize("text, words", [
    ("a;x;*\nb;*\n", "line 2 has 2 columns but line 1 has 3"),
    ("a;x;*\na;y;*\n", "line 2 repeats the value of line 1"),
    ("a;x;p;*\nb;x;q;*\n", "not monotone: lines 1 and 2 share their level 1 value but differ at level 2"),
    ("a;;*\n", "line 1 has an empty cell"),
    ("a;*\n", "at least one generalization level"),
    ("", "has no rows"),
])
def test_csv_hierarchy_validation_names_lines_never_values(text, words):
    rows, problem = parse_hierarchy_csv(text, ";", "h.csv")
    assert rows is None and words in problem and "h.csv" in problem


def _job_policy(tmp_path, on_unknown=None, to=1):
    (tmp_path / "hier").mkdir(exist_ok=True)
    (tmp_path / "hier" / "job.csv").write_text(HIER.split("\n", 1)[1])
    spec = {"action": "generalize", "method": "csv", "path": "hier/job.csv", "to": to}
    if on_unknown:
        spec["on_unknown"] = on_unknown
    pol_path = tmp_path / "policy.yaml"
    import yaml

    pol_path.write_text(yaml.safe_dump({"version": 1, "fields": {"job": spec, "age": "keep"}}))
    return load_policy(pol_path, SCHEMA)


def _batch(jobs):
    n = len(jobs)
    return pa.RecordBatch.from_pydict({
        "age": pa.array([30] * n, pa.int32()), "income": pa.array([1.0] * n), "ts": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
        "day": pa.array([0] * n, pa.date32()), "job": pa.array(jobs)}, schema=SCHEMA.arrow)


def test_csv_action_reads_the_file_relative_to_the_policy_and_workers_use_the_attachment(tmp_path, monkeypatch):
    pol = _job_policy(tmp_path, to=2)
    assert pol.attachments == {"hier/job.csv": HIER.split("\n", 1)[1]}
    monkeypatch.chdir("/")
    out = protect_batch(_batch(["a", "c"]), pol, ActionContext(None))
    assert out.column("job").to_pylist() == ["abc", "abc"]
    # A worker recompiles from the reference: the file need not exist there.
    from cloakbeam.transforms.steps import PolicyRef

    ref = PolicyRef.of(pol)
    (tmp_path / "hier" / "job.csv").unlink()
    assert ref.compile().actions["job"].hierarchy.table == pol.actions["job"].hierarchy.table
    assert pol.actions["job"].describe()["sha256"] == pol.actions["job"].hierarchy.digest


def test_csv_level_above_the_file_and_missing_file_fail_at_compile(tmp_path):
    with pytest.raises(PolicyError, match="above the hierarchy file's levels"):
        _job_policy(tmp_path, to=3)
    with pytest.raises(PolicyError, match="cannot read file nope.csv"):
        compile_policy({"fields": {"job": {"action": "generalize", "method": "csv", "path": "nope.csv", "to": 1}}}, SCHEMA,
                       source=str(tmp_path / "p.yaml"))


def test_on_unknown_error_names_field_and_count_never_the_value(tmp_path):
    pol = _job_policy(tmp_path)
    with pytest.raises(UnknownValueError) as exc:
        protect_batch(_batch(["a", "zebra-secret", "zebra-secret", None]), pol, ActionContext(None))
    msg = str(exc.value)
    assert "field 'job': 2 value(s) are not in its csv hierarchy (file hier/job.csv)" in msg and "zebra" not in msg


def test_on_unknown_suppress_rejects_rows_and_top_generalizes_them(tmp_path):
    from cloakbeam.transforms.protect import protect_batch_with_rejects

    pol = _job_policy(tmp_path, on_unknown="suppress")
    out, rejected = protect_batch_with_rejects(_batch(["a", "zz", "b"]), pol, ActionContext(None))
    assert out.column("job").to_pylist() == ["ab", "ab"] and rejected == [(1, "unknown_value", "job")]
    pol = _job_policy(tmp_path, on_unknown="top")
    out = protect_batch(_batch(["a", "zz"]), pol, ActionContext(None))
    assert out.column("job").to_pylist() == ["ab", "*"]


def test_map_defaults_to_on_unknown_error():
    pol = compile_policy({"fields": {"job": {"action": "generalize", "method": "map", "groups": {"vowel": ["a"]}}}}, SCHEMA)
    with pytest.raises(UnknownValueError, match="1 value"):
        protect_batch(_batch(["a", "b"]), pol, ActionContext(None))


def test_round_and_truncate_actions_keep_numbers_and_timestamps_typed():
    pol = compile_policy({"fields": {
        "income": {"action": "generalize", "method": "round", "to": 1000, "top": 200000, "bottom": 0},
        "age": {"action": "generalize", "method": "round", "to": 5},
        "ts": {"action": "generalize", "method": "truncate", "to": "hour"},
        "day": {"action": "generalize", "method": "truncate", "to": "month"},
    }}, SCHEMA)
    schema = pol.output_schema()
    assert schema.field("income").type == pa.float64() and schema.field("age").type == pa.int32()
    assert schema.field("ts").type == pa.timestamp("us", tz="UTC") and schema.field("day").type == pa.date32()
    batch = pa.RecordBatch.from_pydict({
        "age": pa.array([32, 33, None], pa.int32()), "income": pa.array([51_499.99, 250_000.0, -10.0]),
        "ts": pa.array([dt.datetime(2021, 3, 4, 5, 6, 7)] * 3, pa.timestamp("us", tz="UTC")),
        "day": pa.array([dt.date(2021, 3, 17)] * 3, pa.date32()), "job": pa.array(["a"] * 3)}, schema=SCHEMA.arrow)
    out = protect_batch(batch, pol, ActionContext(None))
    assert out.column("income").to_pylist() == [51_000.0, 200_000.0, 0.0]
    assert out.column("age").to_pylist() == [30, 35, None]
    assert out.column("ts").to_pylist()[0] == dt.datetime(2021, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert out.column("day").to_pylist()[0] == dt.date(2021, 3, 1)


@pytest.mark.parametrize("spec, words", [
    ({"action": "generalize", "method": "round", "to": 0}, "positive step"),
    ({"action": "generalize", "method": "truncate", "to": "week"}, "one of hour, day"),
    ({"action": "generalize", "method": "band", "width": 5, "edges": [0, 5]}, "either 'width' or 'edges'"),
    ({"action": "generalize", "method": "band", "edges": [5, 0]}, "increasing list"),
    ({"action": "generalize", "method": "band", "width": 5, "bottom": 10, "top": 5}, "'bottom' below 'top'"),
    ({"action": "generalize", "method": "csv", "path": "x.csv", "to": 0}, "level to release"),
    ({"action": "generalize", "method": "map", "groups": {"a": [1]}, "on_unknown": "ignore"}, "must be one of"),
])
def test_new_methods_bad_parameters_fail_at_compile(spec, words):
    with pytest.raises(PolicyError) as exc:
        compile_policy({"fields": {"age": spec}}, SCHEMA)
    assert words in str(exc.value) and "age" in str(exc.value)


@pytest.mark.parametrize("spec, words", [
    ({"hierarchy": "band", "edges": [[0, 10, 20], [0, 15, 20]]}, "subset of level 1"),
    ({"hierarchy": "band", "edges": [0, 10], "top": 5}, "takes no 'offset'"),
    ({"hierarchy": "round", "steps": [100, 10]}, "increasing list"),
    ({"hierarchy": "band"}, "either 'widths'"),
    ({"hierarchy": "csv"}, "needs 'path'"),
    ({"hierarchy": "map", "levels": [{"a": ["x"]}], "on_unknown": "drop"}, "on_unknown"),
])
def test_bad_new_hierarchies_are_refused(spec, words):
    h, problem = build_hierarchy(spec, pa.int64() if spec["hierarchy"] != "map" else pa.string())
    assert h is None and words in problem


def test_quantile_bands_resolve_from_a_sample_for_actions_and_qi_hierarchies():
    from cloakbeam.errors import CloakbeamError
    from cloakbeam.transforms.generalize import needs_sample, quantile_edges, resolve_quantiles

    raw = {"version": 1, "fields": {"income": {"action": "generalize", "method": "quantile", "bands": 4},
                                     "age": {"action": "generalize", "level": "auto"}},
           "k_anonymity": {"k": 2, "quasi_identifiers": {"age": {"hierarchy": "quantile", "bands": [8, 4, 2]}}}}
    assert needs_sample(raw) == ["income", "age"]
    unresolved = compile_policy(raw, SCHEMA)
    with pytest.raises(CloakbeamError, match="quantile bands were not computed"):
        protect_batch(_batch(["a"]), unresolved, ActionContext(None))
    rng = __import__("numpy").random.default_rng(0)
    sample = {"income": pa.array(rng.lognormal(10.8, 0.5, 5000)), "age": pa.array(rng.integers(18, 90, 5000), pa.int32())}
    resolved = resolve_quantiles(raw, sample, 5000)
    assert raw["fields"]["income"].get("edges") is None  # the document given is not changed
    assert resolved["fields"]["income"]["edges"] == quantile_edges(sample["income"], 4) and resolved["fields"]["income"]["sample_rows"] == 5000
    levels = resolved["k_anonymity"]["quasi_identifiers"]["age"]["edges"]
    assert len(levels) == 3 and set(levels[1]) <= set(levels[0]) and set(levels[2]) <= set(levels[1])
    pol = compile_policy(resolved, SCHEMA)
    h = pol.sections["k_anonymity"].spec.qis[0].hierarchy
    assert h.kind == "band" and h.top == 4
    assert needs_sample(resolved) == []
    assert quantile_edges(pa.array([1.0, 2.0, 3.0, 4.0]), 2) == [2.5] and quantile_edges(pa.array([], pa.float64()), 3) == [0.0]
