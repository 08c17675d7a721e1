"""The plain evidence functions with known answers: linkage-risk figures from class sizes (ARX's prosecutor,
journalist and marketer models), the DCR membership test (a leaking release vs an independent sample), the
utility model and per-feature information loss, and the bounded uniform sample."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cloakbeam.pipeline import risk, utility
from cloakbeam.pipeline.evaluate import UniformSample


def _counts(d):
    return pa.table({"k": pa.array(list(d), pa.string()), "n": pa.array(list(d.values()), pa.int64())})


def test_linkage_figures_known_answer():
    got = risk.linkage_risk(_counts({"a": 2, "b": 5}), _counts({"a": 4, "b": 5, "c": 1}), k=3)
    assert got["records_released"] == 7 and got["classes"] == 2
    assert got["smallest_class"] == 2 and got["smallest_population_class"] == 4
    assert got["prosecutor"] == {"highest_risk": 0.5, "average_risk": round(2 / 7, 6), "expected_reidentifications": 2.0}
    assert got["journalist"]["highest_risk"] == 0.25
    assert got["marketer"]["expected_share"] == round((2 / 4 + 5 / 5) / 7, 6)
    assert got["marketer"]["expected_reidentifications"] == pytest.approx(1.5, abs=1e-3)
    assert got["uniquely_matched"] == 0
    assert got["meets_k"] is False and got["records_in_classes_below_k"] == 2
    assert got["statement"].startswith("does not meet k=3: 2 released records")


def test_unique_match_and_meeting_k():
    got = risk.linkage_risk(_counts({"x": 1, "y": 9}), _counts({"x": 1, "y": 12}), k=None)
    assert got["uniquely_matched"] == 1 and got["uniquely_matched_share"] == 0.1
    ok = risk.linkage_risk(_counts({"y": 9}), _counts({"y": 12}), k=5)
    assert ok["meets_k"] and ok["statement"].startswith("meets k=5")
    mismatch = risk.linkage_risk(_counts({"z": 3}), _counts({}), k=2)
    assert mismatch["classes_not_in_adversary_table"] == 1 and mismatch["journalist"]["highest_risk"] == pytest.approx(1 / 3, abs=1e-6)


def test_class_counter_merges_batches():
    c = risk.ClassCounter()
    for keys in (["a", "b", "a"], ["b", "b"], []):
        c.add(risk.class_key([pa.array(keys, pa.string())]))
    t = c.table()
    assert dict(zip(t.column("k").to_pylist(), t.column("n").to_pylist())) == {"a": 2, "b": 3}
    two = risk.class_key([pa.array(["a", None]), pa.array(["b", "b"])]).to_pylist()
    assert two[0] != two[1]


def _tables(rng, n):
    return {"cat": pa.array(rng.choice(["p", "q", "r", "s"], n)), "num": pa.array(rng.normal(0, 1, n))}


def test_dcr_membership_flags_a_release_that_copies_its_members():
    rng = np.random.default_rng(1)
    members, others, released = _tables(rng, 300), _tables(rng, 300), None
    released = members  # the release is the members themselves
    kinds = {"cat": "category", "num": "number"}
    m, h, r = risk.encode_features([members, others, released], kinds)
    num = np.array([False, True])
    res = risk.membership_inference(risk.distance_to_closest(m, r, num), risk.distance_to_closest(h, r, num))
    assert res["auc"] > 0.99 and res["advantage"] > 0.95 and res["level"] == "high"
    assert res["members_exact_match_share"] == 1.0 and res["non_members_exact_match_share"] == 0.0


def test_dcr_membership_near_guessing_for_an_independent_release():
    rng = np.random.default_rng(2)
    members, others, released = _tables(rng, 400), _tables(rng, 400), _tables(rng, 2000)
    kinds = {"cat": "category", "num": "number"}
    m, h, r = risk.encode_features([members, others, released], kinds)
    num = np.array([False, True])
    res = risk.membership_inference(risk.distance_to_closest(m, r, num), risk.distance_to_closest(h, r, num))
    assert abs(res["auc"] - 0.5) < 0.08 and res["advantage"] < 0.15


def test_model_learns_a_signal_and_information_loss_measures_coarsening():
    rng = np.random.default_rng(3)
    n = 4000
    x = rng.normal(0, 1, n)
    grp = rng.choice(["a", "b", "c"], n)
    y = (x + (grp == "a") * 1.0 + rng.normal(0, 0.5, n)) > 0.5
    t = pa.table({"x": x, "g": grp, "y": y})
    scores = utility.train_and_score(t.slice(0, 3000), t.slice(3000), ["x", "g"], "y")
    assert scores["measured"] and scores["auc"] > 0.85 and 0.5 < scores["accuracy"] <= 1
    coarse = pa.table({"x": np.round(x), "g": pa.array(["*"] * n), "y": y})
    loss = utility.information_loss(t, coarse, ["x", "g"], {"x": "generalize", "g": "generalize"})
    assert loss["g"]["entropy_loss"] == 1.0 and loss["g"]["distinct_released"] == 1
    assert 0 < loss["x"]["entropy_loss"] < 1
    same = utility.information_loss(t, t, ["x", "g"], {})
    assert same["x"]["entropy_loss"] == 0.0 and same["g"]["entropy_loss"] == 0.0
    one_class = utility.train_and_score(t.filter(pa.array(y)), t.slice(3000), ["x"], "y")
    assert one_class["measured"] is False


def test_uniform_sample_is_bounded_and_uniform():
    s = UniformSample(500, seed=0)
    for i in range(20):
        s.add(pa.table({"i": pa.array(range(i * 1000, (i + 1) * 1000))}))
    got = np.array(s.result().column("i").to_pylist())
    assert len(got) == 500 and s.seen == 20_000 and len(set(got.tolist())) == 500
    assert 7_000 < got.mean() < 13_000  # not the first rows: uniform over the stream
