"""Metrics and privacy models of the k-anonymity search, without Beam.

- minimality: for every metric (with weights and the suppression weight) and every privacy model, `search`
  returns exactly the exhaustive optimum on random small tables (hypothesis);
- every output is checked by an independent implementation written from the definitions (plain Python over
  the released rows), and by pycanon where pycanon implements the model (k, distinct-l, entropy-l, t-closeness
  with equal distance);
- known answers for every metric on a small table.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycanon import anonymity as pycanon

from cloakbeam.transforms.generalize import Hierarchy
from cloakbeam.transforms.kanon import (
    METRICS,
    AnonymityTargetError,
    KAnonSpec,
    Lattice,
    Presence,
    QuasiIdentifier,
    enforce_table,
    exhaustive_search,
    frequency_set,
    make_plan,
    search,
)

HIERARCHIES = {
    "band": (Hierarchy("band", (5, 10, 20)), st.integers(0, 60).map(str)),
    "edges": (Hierarchy("band", (1, 2), edges=((0.0, 10.0, 20.0, 40.0), (0.0, 20.0, 40.0)), pad=2), st.integers(-5, 50).map(str)),
    "prefix": (Hierarchy("prefix", (3, 1)), st.sampled_from(["94107", "94110", "94301", "10001", "10002", "2"])),
    "date": (Hierarchy("date", ("month", "year", "decade")),
             st.builds(lambda y, m, d: f"{y}-{m:02d}-{d:02d}", st.integers(1978, 1993), st.integers(1, 12), st.integers(1, 3))),
    "map": (Hierarchy("map", (1, 2), groups=((("a", ("x", "y")), ("b", ("z",))), (("all", ("x", "y", "z")),))),
            st.sampled_from(["x", "y", "z"])),
    "suppress": (Hierarchy("suppress"), st.sampled_from(["p", "q"])),
    "csv": (Hierarchy("csv", (1, 2), table=(("a", "ab", "abcd"), ("b", "ab", "abcd"), ("c", "cd", "abcd"), ("d", "cd", "abcd"),
                                           ("e", "ef", "ef"))), st.sampled_from(list("abcde"))),
    "round": (Hierarchy("round", (5, 10, 50), top_code=100.0, pad=3), st.integers(0, 130).map(str)),
}
SENS = ["flu", "cold", "ok", "hiv", "tb"]
# A tree over the sensitive values for hierarchical EMD: leaves -> {respiratory, other} -> *
SENS_H = Hierarchy("map", (1,), groups=((("resp", ("flu", "cold", "tb")), ("other", ("ok", "hiv"))),))


@st.composite
def problems(draw, max_rows=70, max_qis=3):
    kinds = draw(st.lists(st.sampled_from(sorted(HIERARCHIES)), min_size=1, max_size=max_qis))
    n = draw(st.integers(1, max_rows))
    cols, qis = {}, []
    for i, kind in enumerate(kinds):
        h, values = HIERARCHIES[kind]
        cols[f"c{i}"] = pa.array(draw(st.lists(values, min_size=n, max_size=n)), pa.string())
        qis.append(QuasiIdentifier(f"c{i}", h))
    cols["s"] = pa.array(draw(st.lists(st.sampled_from(SENS), min_size=n, max_size=n)), pa.string())
    k = draw(st.integers(2, 5))
    metric = draw(st.sampled_from(METRICS))
    weights = tuple(draw(st.lists(st.sampled_from([0.5, 1.0, 3.0]), min_size=len(qis), max_size=len(qis)))) \
        if metric in ("loss", "entropy", "precision") and draw(st.booleans()) else None
    sw = draw(st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0])) if metric in ("loss", "precision") else 0.5
    model = draw(st.sampled_from(["none", "distinct", "entropy", "recursive", "t-equal", "t-hier"]))
    l = c = t = None
    diversity, t_measure, sens_h = "distinct", "equal", None
    if model in ("distinct", "entropy", "recursive"):
        l, diversity = draw(st.integers(2, min(3, k))), model
        c = draw(st.sampled_from([1.0, 2.0, 3.0])) if model == "recursive" else None
    elif model.startswith("t-"):
        t = draw(st.sampled_from([0.2, 0.35, 0.5]))
        if model == "t-hier":
            t_measure, sens_h = "hierarchical", SENS_H
    limit = draw(st.sampled_from([0.0, 0.05, 0.2, 0.4]))
    spec = KAnonSpec(tuple(qis), k, limit, "s" if model != "none" else None, l, metric=metric, weights=weights,
                     suppression_weight=sw, diversity=diversity, c=c, t=t, t_measure=t_measure, sensitive_hierarchy=sens_h)
    return pa.table(cols), spec


def _freq(table: pa.Table, spec: KAnonSpec) -> pa.Table:
    return frequency_set(dict(zip(table.column_names, table.columns)), spec)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_search_equals_exhaustive_optimum_for_every_metric_and_model(problem):
    table, spec = problem
    best = exhaustive_search(Lattice(_freq(table, spec), spec))
    lat = Lattice(_freq(table, spec), spec)
    if best is None:
        with pytest.raises(AnonymityTargetError):
            search(lat)
        return
    found = search(lat)
    assert (found.loss, found.suppressed, found.node) == (best.loss, best.suppressed, best.node)


@pytest.mark.parametrize("metric", METRICS)
def test_minimality_on_a_larger_lattice_for_each_metric(metric):
    rng = np.random.default_rng(11)
    n = 3000
    cols = {"a": pa.array(rng.integers(0, 100, n).astype(str)), "b": pa.array(rng.choice(["94107", "94110", "10001", "10002", "60601"], n)),
            "c": pa.array([f"{y}-{m:02d}-01" for y, m in zip(rng.integers(1970, 2000, n), rng.integers(1, 13, n))]),
            "s": pa.array(rng.choice(SENS, n))}
    spec = KAnonSpec((QuasiIdentifier("a", Hierarchy("band", (5, 10, 20, 40))), QuasiIdentifier("b", Hierarchy("prefix", (4, 3, 1))),
                      QuasiIdentifier("c", Hierarchy("date", ("month", "year", "decade")))), 15, 0.03, "s", 2, metric=metric)
    table = pa.table(cols)
    best = exhaustive_search(Lattice(_freq(table, spec), spec))
    lat = Lattice(_freq(table, spec), spec)
    found = search(lat)
    assert (found.loss, found.suppressed, found.node) == (best.loss, best.suppressed, best.node)
    assert lat.evaluations < lat.size  # the bounds prune


# ------------------------------------------------------------------------------------------------------------
# Independent checks from the definitions (plain Python over released rows)
# ------------------------------------------------------------------------------------------------------------
def _released(table: pa.Table, spec: KAnonSpec, plan) -> list[dict]:
    out, suppressed = enforce_table(table, spec, plan)
    assert suppressed == plan.report["records_suppressed"]
    assert suppressed <= math.floor(spec.suppression_limit * table.num_rows + 1e-9)
    return out.to_pylist()


def _classes(rows: list[dict], spec: KAnonSpec) -> dict[tuple, list[str]]:
    classes: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        classes[tuple(r[q.path] for q in spec.qis)].append(r["s"])
    return classes


def _tv(values: list[str], q: dict[str, float]) -> float:
    c = Counter(values)
    return 0.5 * sum(abs(c.get(v, 0) / len(values) - q.get(v, 0.0)) for v in set(q) | set(c))


def _hier_emd(values: list[str], q: dict[str, float]) -> float:
    """Li et al.'s EMD over the two-level tree SENS_H (height 2), written out by hand."""
    c = Counter(values)
    extra = {v: c.get(v, 0) / len(values) - q.get(v, 0.0) for v in SENS}
    groups = {"resp": ["flu", "cold", "tb"], "other": ["ok", "hiv"]}
    cost = 0.0
    for members in groups.values():  # height-1 nodes: children are leaves
        pos = sum(extra[m] for m in members if extra[m] > 0)
        neg = -sum(extra[m] for m in members if extra[m] < 0)
        cost += 0.5 * min(pos, neg)
    ex = [sum(extra[m] for m in members) for members in groups.values()]  # root: children are the groups
    cost += 1.0 * min(sum(e for e in ex if e > 0), -sum(e for e in ex if e < 0))
    return cost


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_rows=90))
def test_every_release_satisfies_its_models_by_independent_checks(problem):
    table, spec = problem
    try:
        plan = make_plan(_freq(table, spec), spec)
    except AnonymityTargetError as exc:
        assert "cannot be met" in str(exc)
        assert exhaustive_search(Lattice(_freq(table, spec), spec)) is None
        return
    rows = _released(table, spec, plan)
    classes = _classes(rows, spec)
    q_all = {v: n / table.num_rows for v, n in Counter(table.column("s").to_pylist()).items()}
    for sens in classes.values():
        assert len(sens) >= spec.k
        if spec.l is not None:
            counts = sorted(Counter(sens).values(), reverse=True)
            assert len(counts) >= spec.l
            if spec.diversity == "entropy":
                h = -sum(n / len(sens) * math.log(n / len(sens)) for n in counts)
                assert h >= math.log(spec.l) - 1e-9
            if spec.diversity == "recursive":
                assert counts[0] < spec.c * sum(counts[spec.l - 1:])
        if spec.t is not None:
            d = _hier_emd(sens, q_all) if spec.t_measure == "hierarchical" else _tv(sens, q_all)
            assert d <= spec.t + 1e-9
    if rows and spec.sensitive is not None:
        _pycanon_agrees(rows, spec, table)


def _pycanon_agrees(rows: list[dict], spec: KAnonSpec, table: pa.Table) -> None:
    df = pd.DataFrame(rows)[[q.path for q in spec.qis] + ["s"]].astype(str)
    qi = [q.path for q in spec.qis]
    assert pycanon.k_anonymity(df, qi) >= spec.k
    if spec.l is not None:
        assert pycanon.l_diversity(df, qi, ["s"]) >= spec.l
        if spec.diversity == "entropy":
            exact = min(math.exp(-sum(n / len(v) * math.log(n / len(v)) for n in Counter(v).values()))
                        for v in _classes(rows, spec).values())
            if abs(exact - round(exact)) > 1e-6:  # pycanon floors e^H: only compare away from ties
                assert pycanon.entropy_l_diversity(df, qi, ["s"]) == math.floor(exact) >= spec.l
    if spec.t is not None and spec.t_measure == "equal" and len(rows) == table.num_rows:
        # pycanon measures against the distribution of the data it is given: the input, when nothing was suppressed.
        assert pycanon.t_closeness(df, qi, ["s"]) <= spec.t + 1e-9


def test_delta_presence_against_a_population_table(tmp_path):
    rng = np.random.default_rng(2)
    pop_n, sample_n = 4000, 600
    pop = pd.DataFrame({"zip": rng.choice(["94107", "94110", "94301", "10001", "10002", "60601"], pop_n),
                        "age": rng.integers(18, 90, pop_n).astype(str)})
    idx = rng.choice(pop_n, sample_n, replace=False)
    # The sample over-represents one zip code, so some classes are too present at fine levels.
    idx = np.concatenate([idx, np.flatnonzero(pop["zip"].to_numpy() == "94107")[:150]])
    sample = pop.iloc[np.unique(idx)]
    pop.to_csv(tmp_path / "population.csv", index=False)
    spec = KAnonSpec((QuasiIdentifier("zip", Hierarchy("prefix", (3, 1))), QuasiIdentifier("age", Hierarchy("band", (5, 10, 20)))),
                     3, 0.05, presence=Presence("population.csv", str(tmp_path), 0.05, 0.25, (("zip", "zip"), ("age", "age"))))
    table = pa.table({"zip": pa.array(sample["zip"].tolist()), "age": pa.array(sample["age"].tolist())})
    freq = _freq(table, spec)
    plan = make_plan(freq, spec)
    best = exhaustive_search(Lattice(freq, spec, _population(pop, spec)))
    assert plan.levels == best.node
    rows = _released(table, spec, plan)
    # Independent check: generalize the population at the chosen levels and compare class sizes.
    pop_classes = Counter(tuple(q.hierarchy.apply(pa.array(pop[q.path].tolist()), lv).to_pylist()[i] for q, lv in zip(spec.qis, plan.levels))
                          for i in range(pop_n))
    for key, sens in _classes([{**r, "s": None} for r in rows], spec).items():
        delta = len(sens) / pop_classes[key]
        assert 0.05 - 1e-12 <= delta <= 0.25 + 1e-12
    lo, hi = plan.report["delta_achieved"]
    assert 0.05 <= lo <= hi <= 0.25


def _population(pop: pd.DataFrame, spec: KAnonSpec) -> pa.Table:
    from cloakbeam.transforms.kanon import population_frequency

    return population_frequency(spec)


def test_delta_presence_fails_clearly_when_the_population_lacks_the_sample(tmp_path):
    pd.DataFrame({"zip": ["10001"] * 50}).to_csv(tmp_path / "pop.csv", index=False)
    spec = KAnonSpec((QuasiIdentifier("zip", Hierarchy("suppress")),), 2, 0.0,
                     presence=Presence("pop.csv", str(tmp_path), 0.0, 0.5, (("zip", "zip"),)))
    with pytest.raises(AnonymityTargetError, match="delta-presence in \\[0.0, 0.5\\] cannot be met"):
        make_plan(_freq(pa.table({"zip": pa.array(["10001"] * 30 + ["94107"] * 30)}), spec), spec)
    spec_bad = KAnonSpec(spec.qis, 2, 0.0, presence=Presence("missing.csv", str(tmp_path), 0.0, 0.5, (("zip", "zip"),)))
    with pytest.raises(AnonymityTargetError, match="cannot read population table missing.csv"):
        make_plan(_freq(pa.table({"zip": pa.array(["10001"] * 30)}), spec_bad), spec_bad)


# ------------------------------------------------------------------------------------------------------------
# Known answers
# ------------------------------------------------------------------------------------------------------------
def test_known_answer_metrics_on_a_small_table():
    # 10 records, one QI with values a,a,a,a,b,b,b,c,c,d; hierarchy a,b -> ab; c,d -> cd; then '*'.
    h = Hierarchy("map", (1,), groups=((("ab", ("a", "b")), ("cd", ("c", "d"))),))
    cols = {"q": pa.array(list("aaaabbbccd"))}
    spec = KAnonSpec((QuasiIdentifier("q", h),), 3, 0.1)
    lat = Lattice(_freq(pa.table(cols), spec), spec)
    # Level 0: classes a(4) b(3) c(2) d(1): c and d fail k=3 -> 3 records suppressed > limit 1; not satisfied.
    # Level 1: ab(7) cd(3): nothing suppressed.
    m1 = lat.all_metrics((1,))
    assert m1["discernibility"] == 7 ** 2 + 3 ** 2
    assert m1["aecs"] == 10 / 2
    assert m1["loss"] == pytest.approx(1 / 3)  # every group holds 2 of 4 observed values: (2-1)/(4-1)
    assert m1["precision"] == pytest.approx(0.5)
    # Non-uniform entropy: sum over records of log2(|group| / |value|), per record.
    ent = (4 * math.log2(7 / 4) + 3 * math.log2(7 / 3) + 2 * math.log2(3 / 2) + 1 * math.log2(3 / 1)) / 10
    assert m1["entropy"] == pytest.approx(ent)
    # Level 0 with a limit that allows suppressing d: classes a, b, c released? c(2) < 3 also fails.
    spec2 = KAnonSpec(spec.qis, 2, 0.1)
    lat2 = Lattice(_freq(pa.table(cols), spec2), spec2)
    m0 = lat2.all_metrics((0,))
    assert m0["discernibility"] == 4 ** 2 + 3 ** 2 + 2 ** 2 + 1 * 10  # the suppressed record costs N
    assert m0["aecs"] == pytest.approx(10 / 4)  # three released classes plus one of suppressed records
    assert m0["loss"] == pytest.approx(0.1)  # the suppressed record loses everything: 1/10
    assert m0["entropy"] == pytest.approx(math.log2(10 / 1) / 10)  # its value's entropy at '*'


def test_suppression_weight_trades_suppression_for_generalization():
    rng = np.random.default_rng(4)
    vals = list(rng.integers(0, 40, 200).astype(str)) + ["99", "98"]
    cols = {"a": pa.array(vals)}
    qis = (QuasiIdentifier("a", Hierarchy("band", (10, 20, 50))),)
    cheap_sup = make_plan(_freq(pa.table(cols), KAnonSpec(qis, 5, 0.05, suppression_weight=0.0)), KAnonSpec(qis, 5, 0.05, suppression_weight=0.0))
    cheap_gen = make_plan(_freq(pa.table(cols), KAnonSpec(qis, 5, 0.05, suppression_weight=1.0)), KAnonSpec(qis, 5, 0.05, suppression_weight=1.0))
    assert cheap_sup.report["records_suppressed"] > cheap_gen.report["records_suppressed"]
    assert cheap_sup.levels < cheap_gen.levels


def test_weights_steer_which_attribute_keeps_detail():
    rng = np.random.default_rng(9)
    n = 400
    cols = {"a": pa.array(rng.integers(0, 100, n).astype(str)), "b": pa.array(rng.integers(0, 100, n).astype(str))}
    qis = (QuasiIdentifier("a", Hierarchy("band", (10, 20, 50))), QuasiIdentifier("b", Hierarchy("band", (10, 20, 50))))
    favour_a = make_plan(_freq(pa.table(cols), KAnonSpec(qis, 8, 0.0, weights=(10.0, 1.0))), KAnonSpec(qis, 8, 0.0, weights=(10.0, 1.0)))
    favour_b = make_plan(_freq(pa.table(cols), KAnonSpec(qis, 8, 0.0, weights=(1.0, 10.0))), KAnonSpec(qis, 8, 0.0, weights=(1.0, 10.0)))
    assert favour_a.levels[0] < favour_a.levels[1] and favour_b.levels[1] < favour_b.levels[0]


def test_every_metric_is_reported_and_the_chosen_one_named():
    cols = {"a": pa.array([str(i % 30) for i in range(300)])}
    for metric in METRICS:
        spec = KAnonSpec((QuasiIdentifier("a", Hierarchy("band", (10, 20))),), 5, 0.0, metric=metric)
        rep = make_plan(_freq(pa.table(cols), spec), spec).report
        assert rep["metric"] == metric and set(rep["metrics"]) == set(METRICS)


def test_unknown_values_in_a_qi_hierarchy_error_suppress_or_top():
    from cloakbeam.errors import UnknownValueError

    h = Hierarchy("map", (1,), groups=((("ab", ("a", "b")),),), on_unknown="error")
    cols = {"q": pa.array(list("aaabbb") + ["secret", "secret"])}
    spec = KAnonSpec((QuasiIdentifier("q", h),), 2, 0.3)
    with pytest.raises(UnknownValueError) as exc:
        make_plan(_freq(pa.table(cols), spec), spec)
    assert "field 'q': 2 value(s)" in str(exc.value) and "secret" not in str(exc.value)
    sup = KAnonSpec((QuasiIdentifier("q", Hierarchy("map", (1,), groups=h.groups, on_unknown="suppress")),), 2, 0.3)
    plan = make_plan(_freq(pa.table(cols), sup), sup)
    out, s = enforce_table(pa.table(cols), sup, plan)
    assert s == 2 and plan.report["records_suppressed_unknown"] == 2 and "secret" not in out.column("q").to_pylist()
    tight = KAnonSpec(sup.qis, 2, 0.1)  # 2 unknown records exceed 10% of 8
    with pytest.raises(AnonymityTargetError, match="outside a hierarchy with on_unknown: suppress"):
        make_plan(_freq(pa.table(cols), tight), tight)


def test_lattice_bounds_never_exceed_the_score_above_them():
    """The bound of a node is below the score of every satisfying node above it (what makes pruning sound)."""
    rng = np.random.default_rng(1)
    n = 500
    cols = {"a": pa.array(rng.integers(0, 60, n).astype(str)), "b": pa.array(rng.choice(["94107", "94110", "10001", "2"], n)),
            "s": pa.array(rng.choice(SENS, n))}
    for metric in METRICS:
        spec = KAnonSpec((QuasiIdentifier("a", Hierarchy("band", (5, 10, 20))), QuasiIdentifier("b", Hierarchy("prefix", (3, 1)))),
                         4, 0.1, "s", 2, metric=metric, diversity="entropy")
        lat = Lattice(_freq(pa.table(cols), spec), spec)
        nodes = list(itertools.product(range(5), range(4)))
        results = {nd: lat.evaluate(nd) for nd in nodes}
        for low in nodes:
            for high in nodes:
                if all(h >= lw for h, lw in zip(high, low)) and results[high].satisfied:
                    assert lat.bound(low) <= results[high].loss + 1e-9
