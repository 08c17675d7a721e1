"""The uniqueness scan without Beam: exact figures against brute force (hypothesis), the sketch path's estimates
against exact counts, merging, combinations and minimal failures, exemptions (quasi-identifiers, accept_risk),
columns left out (keyed), hashing, the policy section's errors, and that nothing reported holds a value."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloakbeam.errors import PolicyError
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.transforms.policy import compile_policy
from cloakbeam.transforms.uniqueness import (
    ComboSketch,
    ScanSpec,
    UniquenessRiskError,
    column_hash,
    combinations,
    combo_figures,
    evaluate,
    merge_sketches,
    sketch_batch,
)

KEY = b"0123456789abcdef"


def _spec(columns, max_combination=2, sketch_size=1 << 14, k=3, limit=0.01) -> ScanSpec:
    return ScanSpec(tuple(columns), tuple(combinations(columns, max_combination)), (), (), k, limit, max_combination, sketch_size, KEY)


def _brute(rows: list[tuple], k: int) -> tuple[float, float]:
    c = Counter(rows)
    return sum(1 for r in rows if c[r] == 1) / len(rows), sum(1 for r in rows if c[r] < k) / len(rows)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 120).flatmap(lambda n: st.tuples(
    st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=n, max_size=n),
    st.lists(st.sampled_from(["a", "b", "c", None]), min_size=n, max_size=n),
    st.lists(st.floats(0, 3).map(lambda x: round(x, 0)), min_size=n, max_size=n),
    st.integers(1, 4))))
def test_exact_figures_equal_brute_force_for_every_combination(data):
    ints, strs, floats, parts = data
    n = len(ints)
    cols = {"i": pa.array(ints, pa.int64()), "s": pa.array(strs, pa.string()), "f": pa.array(floats, pa.float64())}
    spec = _spec(list(cols), max_combination=3)
    step = max(1, -(-n // parts))
    sketches = [sketch_batch({c: a.slice(o, step) for c, a in cols.items()}, spec) for o in range(0, n, step)]
    rep = evaluate(merge_sketches(sketches, spec), spec)
    assert rep["records"] == n and rep["exact"]
    got = {tuple(f["columns"]): (f["unique_fraction"], f["small_class_fraction"]) for f in rep["riskiest"]}
    py = {c: a.to_pylist() for c, a in cols.items()}
    for combo in itertools.chain.from_iterable(itertools.combinations(list(cols), r) for r in (1, 2, 3)):
        if combo not in got:
            continue  # only the 20 riskiest are listed
        u, s = _brute(list(zip(*(py[c] for c in combo))), spec.k)
        assert got[combo] == (round(u, 6), round(s, 6))
    assert rep["passed"] == all(f["unique_fraction"] <= spec.max_unique_fraction for f in rep["riskiest"])


def test_sketch_path_estimates_within_a_few_percent_and_says_so():
    rng = np.random.default_rng(0)
    n = 200_000
    # 30% of records carry a unique value, the rest share 5,000 values: unique fraction 0.30 exactly.
    vals = np.where(rng.random(n) < 0.3, np.arange(n) + 10_000_000, rng.integers(0, 5000, n))
    true_u, true_s = _brute(list(vals), 10)
    spec = _spec(["v"], max_combination=1, sketch_size=4096, k=10)
    batches = [sketch_batch({"v": pa.array(vals[o:o + 65_536])}, spec) for o in range(0, n, 65_536)]
    rep = evaluate(merge_sketches(batches, spec), spec)
    f = rep["riskiest"][0]
    assert f["method"] == "sketch" and not rep["exact"]
    assert abs(f["unique_fraction"] - true_u) < 0.03 and abs(f["small_class_fraction"] - true_s) < 0.03
    assert abs(f["distinct"] - len(set(vals.tolist()))) / len(set(vals.tolist())) < 0.06
    assert "estimated" in "; ".join(rep.get("error", "estimated").split())


def test_sketches_merge_in_any_order_to_the_same_result():
    rng = np.random.default_rng(3)
    cols = {"a": pa.array(rng.integers(0, 3000, 20_000)), "b": pa.array(rng.choice(["x", "y", "z"], 20_000))}
    spec = _spec(list(cols), sketch_size=1024)
    parts = [sketch_batch({c: a.slice(o, 3000) for c, a in cols.items()}, spec) for o in range(0, 20_000, 3000)]
    one = merge_sketches(parts, spec)
    other = merge_sketches(list(reversed(parts)), spec)
    whole = sketch_batch(cols, spec)
    for x, y, z in zip(one.combos, other.combos, whole.combos):
        assert np.array_equal(x.hashes, y.hashes) and np.array_equal(x.counts, y.counts) and x.truncated == y.truncated
        assert np.array_equal(x.hashes, z.hashes) and np.array_equal(x.counts, z.counts)


def test_a_pair_can_single_people_out_when_neither_column_does_and_only_the_minimal_failure_is_named():
    # a and b each take 40 values 25 times; together every record is unique.
    n = 1000
    a, b = np.arange(n) % 40, np.arange(n) // 25
    cols = {"a": pa.array(a), "b": pa.array(b), "c": pa.array(np.zeros(n, np.int64))}
    spec = _spec(list(cols), max_combination=3)
    rep = evaluate(sketch_batch(cols, spec), spec)
    assert not rep["passed"]
    assert [f["columns"] for f in rep["failing"]] == [["a", "b"]]  # a+b+c fails too, but a+b is the minimal failure
    assert rep["failing_total"] == 2
    assert "columns 'a' + 'b' single out 100.00% of released records" in rep["error"]


def test_hashes_are_stable_across_batches_types_and_nulls():
    h1 = column_hash(pa.array(["x", None, "y", "x"]), KEY)
    h2 = column_hash(pa.array(["y", "x", None]).dictionary_encode(), KEY)
    assert h1[0] == h1[3] == h2[1] and h1[2] == h2[0] and h1[1] == h2[2] and h1[0] != h1[2]
    assert column_hash(pa.array([0.0, -0.0]), KEY)[0] == column_hash(pa.array([-0.0]), KEY)[0]
    assert column_hash(pa.array([1, 2]), KEY)[0] != column_hash(pa.array([1, 2]), b"fedcba9876543210")[0]
    ts = pa.array([0, 0], pa.timestamp("us", tz="UTC"))
    assert column_hash(ts, KEY)[0] == column_hash(ts, KEY)[1]
    days = column_hash(pa.array([0, 1, 0, None], pa.date32()), KEY)
    assert days[0] == days[2] != days[1] and days[3] == h1[1]  # one null hash for every type


def test_combo_figures_on_an_empty_sketch():
    assert combo_figures(ComboSketch(np.zeros(0, np.uint64), np.zeros(0, np.int64)), 0, 5) == (0.0, 0.0, 0, "exact")


# ------------------------------------------------------------------------------------------------------------
# The policy section
# ------------------------------------------------------------------------------------------------------------
SCHEMA = schema_from_dict({"type": "record", "name": "C", "fields": [
    {"name": "id", "type": "string"},
    {"name": "card", "type": "string"},
    {"name": "dob", "type": {"type": "int", "logicalType": "date"}},
    {"name": "zip", "type": "string"},
    {"name": "income", "type": ["null", "double"], "default": None},
    {"name": "signup", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "dx", "type": "string"},
]}, source="c.avsc")

AUTO = {"action": "generalize", "level": "auto"}


def _policy(uniqueness=None, **fields):
    f = {"id": "encrypt", "card": {"action": "tokenize", "format": "digits", "keep_last": 4}, "dob": AUTO, "zip": AUTO,
         "income": "keep", "signup": "keep", "dx": "keep"}
    f.update(fields)
    raw = {"version": 1, "dataset": "c", "fields": f, "k_anonymity": {"k": 5, "quasi_identifiers": {
        "dob": {"hierarchy": "date"}, "zip": {"hierarchy": "prefix", "lengths": [3, 1]}}}}
    if uniqueness is not None:
        raw["uniqueness"] = uniqueness
    return compile_policy(raw, SCHEMA, source="c.yaml")


def test_section_defaults_scan_value_revealing_columns_and_exempt_quasi_identifier_combinations():
    sec = _policy().sections["uniqueness"]
    s = sec.spec
    assert s.max_unique_fraction == 0.01 and s.max_combination == 3 and s.k == 5  # k from k_anonymity
    assert s.columns == ("card", "dob", "zip", "income", "signup", "dx")  # a token keeping real digits is scanned
    assert dict(s.not_scanned) == {"id": "encrypted (AES-256-GCM cells): not computable without the key"}
    exempt = {tuple(s.names(c)): why for c, why in s.exempt}
    assert set(exempt) == {("dob",), ("zip",), ("dob", "zip")} and all(w.startswith("quasi-identifiers") for w in exempt.values())
    assert ("dob", "zip", "income") in {tuple(s.names(c)) for c in s.combos}  # QIs with another column are measured
    d = sec.describe()
    assert d["quasi_identifiers"] == ["dob", "zip"] and d["accept_risk"] == []


def test_accept_risk_exempts_every_combination_holding_the_accepted_columns_and_records_the_reason():
    sec = _policy({"accept_risk": ["signup", {"columns": ["income", "dx"], "reason": "bands are coarse enough for this team"}],
                   "accept_reason": "session features need the exact time"}).sections["uniqueness"]
    s = sec.spec
    names = [set(s.names(c)) for c in s.combos]
    # The accepted sets themselves are measured for the record; every larger combination holding them is exempt.
    assert [n for n in names if "signup" in n] == [{"signup"}] and [n for n in names if {"income", "dx"} <= n] == [{"income", "dx"}]
    assert any(n == {"income"} for n in names)
    assert [(a.columns, a.reason) for a in s.acceptances] == [
        (("signup",), "session features need the exact time"), (("income", "dx"), "bands are coarse enough for this team")]
    rep = sec.report(type("S", (), {"extra": {}})())
    assert rep["scanned"] is False and rep["policy"]["accept_risk"][0] == {"columns": ["signup"], "reason": "session features need the exact time"}


@pytest.mark.parametrize("section, words", [
    ({"accept_risk": ["signup"]}, "needs a reason"),
    ({"accept_risk": [{"columns": ["nope"], "reason": "x"}]}, "'nope', which is not a released field"),
    ({"accept_risk": [{"columns": ["id"], "reason": "x"}]}, "which the scan does not measure (encrypted"),
    ({"accept_risk": "signup"}, "must be a list"),
    ({"max_unique_fraction": 2}, "'max_unique_fraction' must be a share"),
    ({"max_combination": 0}, "'max_combination' must be a whole number from 1 to 5"),
    ({"exact_up_to": 10}, "'exact_up_to' must be a whole number of at least 1024"),
    ({"k": 1}, "'k' (the class size"),
    ({"limit": 0.1}, "unknown key 'limit'"),
])
def test_bad_sections_fail_at_compile(section, words):
    with pytest.raises(PolicyError) as exc:
        _policy(section)
    assert words in str(exc.value) and "c.yaml" in str(exc.value)


def test_check_raises_a_sentence_with_columns_fractions_and_a_fix_but_no_value():
    sec = _policy().sections["uniqueness"]
    n = 500
    secret = [f"secret-{i:04d}" for i in range(n)]
    cols = {"card": pa.array(secret), "dob": pa.array(["1980-01"] * n), "zip": pa.array(["9*"] * n),
            "income": pa.array(np.arange(n, dtype=np.float64) * 1.37), "signup": pa.array(np.arange(n), pa.timestamp("us", tz="UTC")),
            "dx": pa.array(["flu"] * n)}
    rep = evaluate(sketch_batch(cols, sec.spec), sec.spec)
    stats = type("S", (), {"extra": {"uniqueness": rep}})()
    with pytest.raises(UniquenessRiskError) as exc:
        sec.check(stats)
    msg = str(exc.value)
    assert "column 'income' singles out 100.00% of released records" in msg and "column 'card' singles out" in msg
    assert "income: {action: generalize, method: round, to: 1000}" in msg and "signup: {action: generalize, method: truncate" in msg
    assert "uniqueness.accept_risk" in msg and "limit 1.00%" in msg
    import json

    dumped = json.dumps(sec.report(stats))
    for text in (msg, dumped):
        assert "secret-" not in text and "1.37" not in text
    assert sec.report(stats)["passed"] is False


def test_a_generalized_column_that_still_singles_people_out_is_measured_and_told_to_coarsen():
    sec = _policy(income={"action": "generalize", "method": "round", "to": 0.01}).sections["uniqueness"]
    assert "income" in sec.spec.columns  # generalizing is no exemption: the released form is measured
    n = 300
    cols = {"card": pa.array(["x"] * n), "dob": pa.array(["1980s"] * n), "zip": pa.array(["9*"] * n),
            "income": pa.array(np.arange(n) * 0.01), "signup": pa.array(np.zeros(n, np.int64), pa.timestamp("us", tz="UTC")),
            "dx": pa.array(["flu"] * n)}
    rep = evaluate(sketch_batch(cols, sec.spec), sec.spec)
    with pytest.raises(UniquenessRiskError, match="column 'income' singles out 100.00%.*coarser levels for income"):
        sec.check(type("S", (), {"extra": {"uniqueness": rep}})())
