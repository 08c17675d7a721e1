"""The `dp_statistics` section: validation and the budget refusal at compile time (and exit 2 from the CLI), public
partitions from declared values and bands, and the contributions handed to PipelineDP (keyed privacy ids, rows
without a unit, partition or value left out)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
import yaml

from cloakbeam.errors import PolicyError
from cloakbeam.schemas.avro import load_schema
from cloakbeam.tests.paths import POLICY, SCHEMA
from cloakbeam.transforms.dp import GroupBy, contributions, group_keys, privacy_ids
from cloakbeam.transforms.policy import compile_policy

GENDERS = ["female", "male", "nonbinary", "unknown"]


def _doc(**dp):
    doc = yaml.safe_load(POLICY.read_text())
    base = {"privacy_unit": "customer_id", "budget": {"epsilon": 2.0, "delta": 1e-6},
            "statistics": [{"name": "n", "metric": "count", "epsilon": 1.0, "group_by": {"field": "gender", "partitions": GENDERS}}]}
    base.update(dp)
    doc["dp_statistics"] = base
    return doc


def _compile(doc):
    return compile_policy(doc, load_schema(SCHEMA), "p.yaml")


def test_reference_policy_spends_its_whole_budget_and_no_more():
    section = _compile(yaml.safe_load(POLICY.read_text())).sections["dp_statistics"]
    assert section.spec.spent_epsilon == pytest.approx(3.0) and section.spec.budget_epsilon == 3.0
    d = section.describe()
    assert d["spent"] == {"epsilon": 3.0, "delta": 0.0} and "public partitions" in d["partition_selection"]


def test_a_declaration_over_budget_is_refused_with_a_sentence():
    stats = [{"name": f"s{i}", "metric": "count", "epsilon": 1.0} for i in range(3)]
    with pytest.raises(PolicyError) as info:
        _compile(_doc(statistics=stats))
    msg = str(info.value)
    assert "spend epsilon 3" in msg and "budget (epsilon 2" in msg and "lower some statistic" in msg
    with pytest.raises(PolicyError, match="delta"):
        _compile(_doc(statistics=[{"name": "g", "metric": "count", "epsilon": 1.0, "noise": "gaussian", "delta": 1e-5}]))


def test_over_budget_policy_exits_2_from_the_cli(tmp_path, capsys):
    from cloakbeam.cli.main import main

    doc = _doc(statistics=[{"name": f"s{i}", "metric": "count", "epsilon": 1.5} for i in range(2)])
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(doc))
    src = tmp_path / "in.jsonl"
    src.write_text("")
    code = main(["run", "--dev", "--input", str(src), "--schema", str(SCHEMA), "--policy", str(p), "--output", str(tmp_path / "o"), "--state-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "more than the budget" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "data").exists()


@pytest.mark.parametrize("stat, words", [
    ({"name": "a", "metric": "median", "epsilon": 1}, "'metric' must be one of"),
    ({"name": "a", "metric": "sum", "value": "income", "epsilon": 1}, "needs 'min_value' and 'max_value'"),
    ({"name": "a", "metric": "mean", "value": "gender", "min_value": 0, "max_value": 1, "epsilon": 1}, "must be numeric or boolean"),
    ({"name": "a", "metric": "count", "epsilon": 0}, "must be a positive number"),
    ({"name": "a", "metric": "count", "epsilon": 1, "noise": "gaussian"}, "gaussian noise needs a positive 'delta'"),
    ({"name": "a", "metric": "count", "epsilon": 1, "group_by": {"field": "date_of_birth", "bands": [30, 40]}}, "give 'as_of"),
    ({"name": "a", "metric": "count", "epsilon": 1, "group_by": {"field": "gender", "bands": [1]}}, "numeric or date field"),
    ({"name": "a", "metric": "count", "epsilon": 1, "group_by": {"field": "gender"}}, "exactly one of 'partitions'"),
    ({"name": "a", "metric": "count", "epsilon": 1, "group_by": {"field": "income", "bands": [3, 1]}}, "increasing numbers"),
    ({"name": "a", "metric": "count", "epsilon": 1, "max_contributions_per_partition": 0}, "at least 1"),
    ({"name": "a", "metric": "count", "epsilon": 1, "value": "income"}, "takes no 'value'"),
])
def test_bad_statistics_fail_at_compile_time(stat, words):
    with pytest.raises(PolicyError) as info:
        _compile(_doc(statistics=[stat]))
    assert words in str(info.value)


def test_bad_privacy_unit_and_budget():
    with pytest.raises(PolicyError, match="privacy_unit 'who'"):
        _compile(_doc(privacy_unit="who"))
    with pytest.raises(PolicyError, match="'budget' must be"):
        _compile(_doc(budget=3))


def test_group_keys_declared_partitions_and_bands():
    cols = {"g": pa.array(["female", "other", None, "male"]), "x": pa.array([5.0, 30.0, None, 64.9]),
            "d": pa.array([dt.date(2000, 1, 2), dt.date(1995, 1, 1), dt.date(1960, 6, 1), None])}
    assert group_keys(cols, GroupBy("g", partitions=("female", "male")), 4).to_pylist() == ["female", None, None, "male"]
    assert group_keys(cols, GroupBy("x", bands=(30.0, 65.0)), 4).to_pylist() == ["<30", "[30, 65)", None, "[30, 65)"]
    # Age in whole years at as_of: born 2000-01-02 is 24 on 2025-01-01 (birthday not reached), 1995-01-01 is 30.
    ages = group_keys(cols, GroupBy("d", bands=(25.0, 30.0, 65.0), as_of="2025-01-01"), 4).to_pylist()
    assert ages == ["<25", "30-64", "30-64", None]
    assert GroupBy("d", bands=(30.0, 45.0, 65.0), as_of="2025-01-01").labels() == ["<30", "30-44", "45-64", "65+"]
    assert GroupBy("x", bands=(12.5, 30.0)).labels() == ["<12.5", "[12.5, 30)", ">=30"]
    assert group_keys(cols, None, 4).to_pylist() == ["all"] * 4


def test_contributions_use_keyed_ids_and_leave_out_incomplete_rows():
    from cloakbeam.transforms.dp import DpStatistic

    stat = DpStatistic("m", "mean", "v", GroupBy("g", partitions=("a", "b")), 1.0, 0.0, "laplace", 1, 1, 0.0, 10.0)
    cols = {"id": pa.array(["s1", "s2", None, "s1", "s3"]), "g": pa.array(["a", "b", "a", "zz", "a"]),
            "v": pa.array([1.0, None, 3.0, 4.0, 5.0])}
    pids, keys, vals = contributions(cols, stat, "id", bytes(32), 5)
    assert keys == ["a", "a"] and vals == [1.0, 5.0]  # no unit, undeclared partition, missing value: out
    assert pids == privacy_ids(pa.array(["s1", "s3"]), bytes(32)).tolist()
    assert pids != privacy_ids(pa.array(["s1", "s3"]), bytes([1] * 32)).tolist()  # the id is keyed
    assert all(isinstance(p, int) for p in pids)
