"""The lattice search and plans, without Beam: property tests over random tables and policies, minimality
against an exhaustive search, risk metrics on known answers, and the failure message."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloakbeam.transforms.generalize import Hierarchy
from cloakbeam.transforms.kanon import (
    AnonymityTargetError,
    KAnonSpec,
    Lattice,
    QuasiIdentifier,
    class_size_histogram,
    enforce_table,
    exhaustive_search,
    frequency_set,
    make_plan,
    merge_frequency_sets,
    search,
)

HIERARCHIES = {
    "band": (Hierarchy("band", (5, 10, 20)), st.integers(0, 60).map(str)),
    "prefix": (Hierarchy("prefix", (3, 1)), st.sampled_from(["94107", "94110", "94301", "10001", "10002", "2"])),
    "date": (Hierarchy("date", ("month", "year", "decade")),
             st.builds(lambda y, m, d: f"{y}-{m:02d}-{d:02d}", st.integers(1978, 1993), st.integers(1, 12), st.integers(1, 3))),
    "map": (Hierarchy("map", (1, 2), groups=((("a", ("x", "y")), ("b", ("z",))), (("all", ("x", "y", "z")),))),
            st.sampled_from(["x", "y", "z", "w"])),
    "suppress": (Hierarchy("suppress"), st.sampled_from(["p", "q"])),
}


@st.composite
def problems(draw, max_rows=120, max_qis=3):
    kinds = draw(st.lists(st.sampled_from(sorted(HIERARCHIES)), min_size=1, max_size=max_qis))
    n = draw(st.integers(0, max_rows))
    cols = {}
    qis = []
    for i, kind in enumerate(kinds):
        h, values = HIERARCHIES[kind]
        cols[f"c{i}"] = pa.array(draw(st.lists(st.one_of(values, st.none()) if i == 0 else values, min_size=n, max_size=n)), pa.string())
        qis.append(QuasiIdentifier(f"c{i}", h))
    cols["s"] = pa.array(draw(st.lists(st.sampled_from(["flu", "cold", "ok", "hiv"]), min_size=n, max_size=n)), pa.string())
    cols["other"] = pa.array(list(range(n)), pa.int64())
    k = draw(st.integers(2, 8))
    l = draw(st.one_of(st.none(), st.integers(2, min(3, k))))
    limit = draw(st.sampled_from([0.0, 0.02, 0.1, 0.3]))
    spec = KAnonSpec(tuple(qis), k, limit, "s" if l else None, l)
    return pa.table(cols), spec


def _split(table: pa.Table, parts: int) -> list[pa.Table]:
    step = max(1, -(-table.num_rows // parts))
    return [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(1, 4))
def test_every_output_is_k_anonymous_l_diverse_within_limit_or_fails_clearly(problem, parts):
    table, spec = problem
    # Count per batch, merge (as the combiner does), plan, then enforce batch by batch.
    freq = merge_frequency_sets([frequency_set(dict(zip(t.column_names, t.columns)), spec) for t in _split(table, parts)])
    try:
        plan = make_plan(freq, spec)
    except AnonymityTargetError as exc:
        msg = str(exc)
        assert (f"k={spec.k}" in msg) or (f"l={spec.l}" in msg)
        assert "cannot be met" in msg and "suppression limit" in msg
        # The top node (everything '*') is the last resort: failing means fewer than k records or l values.
        n = table.num_rows
        distinct = len(set(table.column("s").to_pylist()))
        assert n < spec.k or (spec.l is not None and distinct < spec.l)
        return
    released, suppressed = [], 0
    for t in _split(table, parts):
        out, s = enforce_table(t, spec, plan)
        released += out.to_pylist()
        suppressed += s
    n = table.num_rows
    assert len(released) + suppressed == n
    assert suppressed == plan.report["records_suppressed"]
    assert suppressed <= spec.suppression_limit * n + 1e-9
    classes: dict[tuple, list] = {}
    for r in released:
        classes.setdefault(tuple(r[q.path] for q in spec.qis), []).append(r["s"])
    for sens in classes.values():
        assert len(sens) >= spec.k
        if spec.l:
            assert len(set(sens)) >= spec.l
    if released:
        assert plan.report["k_achieved"] == min(len(v) for v in classes.values())
        assert plan.report["classes"] == len(classes)
        assert plan.report["prosecutor_risk"] == pytest.approx(1 / plan.report["k_achieved"], abs=1e-6)
    # Released QI values are exactly the hierarchy's values at the chosen level (nothing finer leaks).
    for q, lv in zip(spec.qis, plan.levels):
        expected = q.hierarchy.apply(table.column(q.path).combine_chunks(), lv).to_pylist()
        assert set(r[q.path] for r in released) <= set(expected)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_rows=80, max_qis=4))
def test_search_is_minimal_against_exhaustive_search(problem):
    table, spec = problem
    freq = frequency_set(dict(zip(table.column_names, table.columns)), spec)
    best = exhaustive_search(Lattice(freq, spec))
    lat = Lattice(freq, spec)
    if best is None:
        with pytest.raises(AnonymityTargetError):
            search(lat)
        return
    found = search(lat)
    if table.num_rows == 0:
        assert found.node == lat.bottom
        return
    assert (found.loss, found.suppressed, found.node) == (best.loss, best.suppressed, best.node)


def test_loss_never_decreases_up_the_lattice():
    rng = np.random.default_rng(3)
    cols = {"c0": pa.array(rng.integers(0, 90, 500).astype(str)), "c1": pa.array(rng.choice(["94107", "94110", "10001"], 500))}
    spec = KAnonSpec((QuasiIdentifier("c0", Hierarchy("band", (5, 10, 30))), QuasiIdentifier("c1", Hierarchy("prefix", (3, 1)))), 5, 0.0)
    lat = Lattice(frequency_set(cols, spec), spec)
    for node in itertools.product(range(5), range(4)):
        for i in range(2):
            if node[i] < lat.tops[i]:
                up = tuple(v + (j == i) for j, v in enumerate(node))
                assert lat.loss(up) >= lat.loss(node)
                assert lat.evaluate(up).suppressed <= lat.evaluate(node).suppressed
    assert lat.loss(lat.bottom) == 0 and lat.loss(lat.top) == 1


def test_search_stays_fast_and_pruned_at_eight_qis():
    rng = np.random.default_rng(0)
    n = 20_000
    cols, qis = {}, []
    for i in range(8):
        if i % 2:
            cols[f"c{i}"] = pa.array(np.char.zfill(rng.integers(0, 99999, n).astype(str), 5))
            qis.append(QuasiIdentifier(f"c{i}", Hierarchy("prefix", (4, 3, 2, 1))))
        else:
            cols[f"c{i}"] = pa.array(rng.integers(0, 100, n).astype(str))
            qis.append(QuasiIdentifier(f"c{i}", Hierarchy("band", (5, 10, 20, 40))))
    spec = KAnonSpec(tuple(qis), 10, 0.02)
    lat = Lattice(frequency_set(cols, spec), spec)
    res = search(lat)
    assert lat.size == 6 ** 8
    assert res.evaluations < lat.size / 100  # monotonicity pruning: a tiny fraction of the lattice is evaluated
    assert lat.evaluate(res.node).satisfied


def test_known_answer_plan_and_risk_metrics():
    # Two QIs; at the bottom one class of size 1 (suppressed), classes of 3 and 4 are released.
    rows = [("941", "f")] * 4 + [("941", "m")] * 3 + [("100", "m")]
    cols = {"zip": pa.array([r[0] for r in rows]), "g": pa.array([r[1] for r in rows])}
    spec = KAnonSpec((QuasiIdentifier("zip", Hierarchy("prefix", (1,))), QuasiIdentifier("g", Hierarchy("suppress"))), 3, 0.2)
    plan = make_plan(frequency_set(cols, spec), spec)
    rep = plan.report
    assert plan.levels == (0, 0)
    assert rep["records_suppressed"] == 1 and rep["records_released"] == 7
    assert rep["k_achieved"] == 3 and rep["classes"] == 2
    assert rep["prosecutor_risk"] == pytest.approx(1 / 3, abs=1e-6)
    assert rep["journalist_risk"] == pytest.approx((1 / 3 + 1 / 4) / 2, abs=1e-6)
    assert rep["marketer_risk"] == pytest.approx(2 / 7, abs=1e-6)
    assert rep["information_loss"] == pytest.approx(1 / 8, abs=1e-6)  # only the suppressed record lost everything
    assert rep["class_size_histogram"] == {"3-4": {"classes": 2, "records": 7}}
    assert rep["levels"] == {"zip": {"level": 0, "name": "value", "of": 2}, "g": {"level": 0, "name": "value", "of": 1}}
    out, s = enforce_table(pa.table(cols), spec, plan)
    assert s == 1 and Counter(zip(out.column("zip").to_pylist(), out.column("g").to_pylist())) == {("941", "f"): 4, ("941", "m"): 3}
    # With no suppression allowed, the search must generalize instead: prefix 1 keeps 9* and 1* apart, and
    # suppressing gender leaves the lone 100 record alone, so only zip -> '*' works.
    spec0 = KAnonSpec(spec.qis, 3, 0.0)
    plan0 = make_plan(frequency_set(cols, spec0), spec0)
    assert plan0.report["records_suppressed"] == 0
    assert plan0.levels == (2, 0)
    assert plan0.report["generalization_loss"] == 0.5


def test_l_diversity_suppresses_homogeneous_classes():
    cols = {"q": pa.array(["a"] * 5 + ["b"] * 5), "s": pa.array(["x"] * 5 + ["x", "y", "x", "y", "x"])}
    spec = KAnonSpec((QuasiIdentifier("q", Hierarchy("suppress")),), 3, 0.5, "s", 2)
    plan = make_plan(frequency_set(cols, spec), spec)
    assert plan.levels == (0,) and plan.report["records_suppressed"] == 5 and plan.report["l_achieved"] == 2
    spec_strict = KAnonSpec(spec.qis, 3, 0.2, "s", 2)
    plan2 = make_plan(frequency_set(cols, spec_strict), spec_strict)
    assert plan2.levels == (1,) and plan2.report["records_suppressed"] == 0


def test_unreachable_targets_fail_naming_the_target_and_no_value():
    cols = {"zip": pa.array(["94107", "94110", "10001"]), "s": pa.array(["secret-dx"] * 3)}
    spec = KAnonSpec((QuasiIdentifier("zip", Hierarchy("prefix", (3,))),), 5, 0.02)
    with pytest.raises(AnonymityTargetError) as exc:
        make_plan(frequency_set(cols, spec), spec)
    msg = str(exc.value)
    assert "k-anonymity target k=5 cannot be met" in msg and "only 3 records" in msg and "2%" in msg
    assert "94107" not in msg
    spec_l = KAnonSpec(spec.qis, 2, 0.02, "s", 2)
    with pytest.raises(AnonymityTargetError) as exc:
        make_plan(frequency_set(cols, spec_l), spec_l)
    msg = str(exc.value)
    assert "l-diversity target l=2 for sensitive attribute 's' cannot be met" in msg and "secret-dx" not in msg


def test_empty_input_plans_the_bottom_and_reports_zeros():
    spec = KAnonSpec((QuasiIdentifier("q", Hierarchy("suppress")),), 3, 0.0)
    plan = make_plan(None, spec)
    assert plan.levels == (0,) and plan.report["records_in"] == 0 and plan.report["k_achieved"] is None


def test_histogram_buckets():
    assert class_size_histogram(np.array([1, 2, 3, 4, 10, 19, 20, 12000])) == {
        "1": {"classes": 1, "records": 1}, "2": {"classes": 1, "records": 2}, "3-4": {"classes": 2, "records": 7},
        "10-19": {"classes": 2, "records": 29}, "20-49": {"classes": 1, "records": 20}, "10000+": {"classes": 1, "records": 12000},
    }


def test_non_nesting_hierarchy_disables_roll_up_but_output_stays_k_anonymous():
    # widths 20 -> 50 do not nest ([40, 60) straddles 50): no roll-up, every node evaluated on the full set.
    rng = np.random.default_rng(5)
    cols = {"a": pa.array(rng.integers(0, 100, 3000).astype(str)), "b": pa.array(rng.integers(0, 100, 3000).astype(str))}
    spec = KAnonSpec((QuasiIdentifier("a", Hierarchy("band", (20, 50))), QuasiIdentifier("b", Hierarchy("band", (5, 10)))), 10, 0.02)
    lat = Lattice(frequency_set(cols, spec), spec)
    assert lat.nested is False
    plan = make_plan(frequency_set(cols, spec), spec)
    out, s = enforce_table(pa.table(cols), spec, plan)
    assert s <= 60 and min(Counter(zip(out.column("a").to_pylist(), out.column("b").to_pylist())).values()) >= 10
