"""Compile-time validation of the k_anonymity section: every bad configuration fails with a sentence."""

from __future__ import annotations

import copy

import pyarrow as pa
import pytest

from cloakbeam.errors import PolicyError
from cloakbeam.tests.kanon_fixtures import people_policy, people_schema
from cloakbeam.transforms.policy import compile_policy

AUTO = {"action": "generalize", "level": "auto"}
BASE = {
    "version": 1,
    "dataset": "people",
    "fields": {"id": "drop", "diagnosis": "keep", "dob": AUTO, "zip": AUTO, "gender": "keep", "age": "drop", "home": "keep"},
    "k_anonymity": {
        "k": 5,
        "suppression_limit": "2%",
        "sensitive": {"field": "diagnosis", "l": 2},
        "quasi_identifiers": {"dob": {"hierarchy": "date"}, "zip": {"hierarchy": "prefix", "lengths": [3, 1]}},
    },
}


def _compile(mutate):
    raw = copy.deepcopy(BASE)
    mutate(raw)
    return compile_policy(raw, people_schema(), source="p.yaml")


def test_good_section_compiles_with_string_outputs_and_percent_limit():
    pol = _compile(lambda r: None)
    sec = pol.sections["k_anonymity"]
    assert sec.spec.k == 5 and sec.spec.suppression_limit == pytest.approx(0.02) and sec.spec.l == 2
    assert [q.path for q in sec.spec.qis] == ["dob", "zip"]
    schema = pol.output_schema()
    assert schema.field("dob").type == pa.string() and schema.field("zip").type == pa.string()
    desc = sec.describe()
    assert desc["quasi_identifiers"]["dob"]["levels"] == ["value", "month", "year", "decade", "suppressed"]


def _set(path, value):
    def mutate(raw):
        cur = raw
        for p in path[:-1]:
            cur = cur[p]
        if value is KeyError:
            del cur[path[-1]]
        else:
            cur[path[-1]] = value
    return mutate


CASES = [
    (_set(["k_anonymity", "k"], 1), "'k' must be an integer of at least 2"),
    (_set(["k_anonymity", "k"], "10"), "'k' must be an integer"),
    (_set(["k_anonymity", "k"], True), "'k' must be an integer"),
    (_set(["k_anonymity", "suppression_limit"], 1.5), "'suppression_limit' must be a share"),
    (_set(["k_anonymity", "suppression_limit"], "lots%"), "'suppression_limit' must be a share"),
    (_set(["k_anonymity", "quasi_identifiers"], {}), "'quasi_identifiers' must map"),
    (_set(["k_anonymity", "quasi_identifiers", "postcode"], {"hierarchy": "suppress"}), "quasi-identifier 'postcode' is not in schema"),
    (_set(["k_anonymity", "quasi_identifiers", "home"], {"hierarchy": "suppress"}), "is a record"),
    (_set(["k_anonymity", "quasi_identifiers", "age"], {"hierarchy": "band", "widths": [5]}), "quasi-identifier 'age' is dropped by the fields section"),
    (_set(["k_anonymity", "quasi_identifiers", "gender"], {"hierarchy": "suppress"}), "quasi-identifier 'gender' uses action 'keep'"),
    (_set(["k_anonymity", "quasi_identifiers", "zip"], {"hierarchy": "prefix", "lengths": [1, 3]}), "quasi-identifier 'zip' has a bad hierarchy"),
    (_set(["k_anonymity", "quasi_identifiers", "dob"], {"hierarchy": "band", "widths": [5]}), "needs a numeric field"),
    (_set(["k_anonymity", "quasi_identifiers", "zip"], KeyError), "field 'zip' uses 'generalize' with 'level: auto' but is not listed"),
    (_set(["k_anonymity", "sensitive"], {"field": "nope", "l": 2}), "sensitive attribute 'nope' is not a leaf field"),
    (_set(["k_anonymity", "sensitive"], {"field": "dob", "l": 2}), "is also a quasi-identifier"),
    (_set(["k_anonymity", "sensitive"], {"field": "age", "l": 2}), "sensitive attribute 'age' is dropped"),
    (_set(["k_anonymity", "sensitive"], {"field": "diagnosis", "l": 1}), "'sensitive.l' must be an integer of at least 2"),
    (_set(["k_anonymity", "sensitive"], {"field": "diagnosis", "l": 9}), "cannot exceed 'k'"),
    (_set(["k_anonymity", "sensitive"], "diagnosis"), "'sensitive' must be a mapping"),
    (_set(["k_anonymity", "streaming"], {"window_seconds": 0}), "'streaming.window_seconds' must be a positive"),
    (_set(["k_anonymity", "streaming"], {"window": 10}), "'streaming' must be a mapping"),
    (_set(["k_anonymity", "kk"], 3), "unknown key 'kk'"),
    (_set(["k_anonymity"], [1, 2]), "the section must be a mapping"),
    (_set(["k_anonymity"], KeyError), "field 'dob' uses 'generalize' with 'level: auto' but the policy has no k_anonymity section"),
    (_set(["k_anonymity", "metric"], "utility"), "'metric' must be one of loss, discernibility, aecs, entropy, precision"),
    (_set(["k_anonymity", "weights"], {"dob": 2, "gender": 1}), "'weights' names 'gender', which is not a quasi-identifier"),
    (_set(["k_anonymity", "weights"], {"dob": 0}), "'weights.dob' must be a positive number"),
    (lambda r: r["k_anonymity"].update(metric="aecs", weights={"dob": 2}), "metric 'aecs' has no per-attribute terms"),
    (_set(["k_anonymity", "suppression_weight"], 2), "'suppression_weight' must be between 0"),
    (lambda r: r["k_anonymity"].update(metric="entropy", suppression_weight=0.3), "applies to the metrics loss and precision"),
    (_set(["k_anonymity", "sensitive", "diversity"], "shannon"), "'sensitive.diversity' must be distinct, entropy or recursive"),
    (_set(["k_anonymity", "sensitive", "diversity"], "recursive"), "recursive (c,l)-diversity needs 'sensitive.c'"),
    (_set(["k_anonymity", "sensitive", "c"], 2), "'sensitive.c' applies to 'diversity: recursive' only"),
    (_set(["k_anonymity", "sensitive", "t"], 1.5), "'sensitive.t' must be a distance between 0 and 1"),
    (_set(["k_anonymity", "sensitive", "t_measure"], "hierarchical"), "'sensitive.t_measure' needs 'sensitive.t'"),
    (lambda r: r["k_anonymity"]["sensitive"].update(t=0.2, t_measure="hierarchical"), "needs 'sensitive.hierarchy'"),
    (lambda r: r["k_anonymity"]["sensitive"].update(t=0.2, t_measure="hierarchical", hierarchy={"hierarchy": "prefix", "lengths": [2, 3]}),
     "sensitive attribute 'diagnosis' has a bad hierarchy"),
    (_set(["k_anonymity", "presence"], {"population": "pop.csv"}), "'presence.population' must be {path: FILE}"),
    (_set(["k_anonymity", "presence"], {"population": {"path": "p.csv"}, "delta_min": 0.6, "delta_max": 0.5}), "must not exceed"),
    (_set(["k_anonymity", "presence"], {"population": {"path": "p.csv"}, "columns": {"age": "AGE"}}), "'presence.columns' must map"),
]


@pytest.mark.parametrize("mutate, words", CASES)
def test_bad_sections_fail_at_compile_with_a_sentence(mutate, words):
    with pytest.raises(PolicyError) as exc:
        _compile(mutate)
    assert words in str(exc.value)
    assert "p.yaml" in str(exc.value)


def test_policy_without_section_or_auto_fields_has_no_stage():
    pol = compile_policy({"fields": {"id": "keep"}}, people_schema())
    assert "k_anonymity" not in pol.sections


def test_nested_quasi_identifier_is_supported():
    pol = people_policy(qis=("zip", "home.city"))
    assert [q.path for q in pol.sections["k_anonymity"].spec.qis] == ["zip", "home.city"]


def test_arx_style_section_compiles_and_describes_every_choice(tmp_path):
    (tmp_path / "zip.csv").write_text("94107;941;9;*\n94110;941;9;*\n10001;100;1;*\n")
    (tmp_path / "dx.csv").write_text("flu;resp;*\ncold;resp;*\nok;other;*\n")
    raw = copy.deepcopy(BASE)
    raw["k_anonymity"].update(
        metric="loss", suppression_weight=0.7, weights={"dob": 2},
        presence={"population": {"path": "population.parquet"}, "delta_max": 0.5},
    )
    raw["k_anonymity"]["quasi_identifiers"]["zip"] = {"hierarchy": "csv", "path": "zip.csv", "on_unknown": "top"}
    raw["k_anonymity"]["sensitive"].update(diversity="entropy", t=0.3, t_measure="hierarchical",
                                           hierarchy={"hierarchy": "csv", "path": "dx.csv"})
    pol = compile_policy(raw, people_schema(), source=str(tmp_path / "p.yaml"))
    spec = pol.sections["k_anonymity"].spec
    assert spec.weights == (2.0, 1.0) and spec.suppression_weight == 0.7 and spec.diversity == "entropy" and spec.t == 0.3
    assert spec.presence.base == str(tmp_path) and spec.presence.columns == (("dob", "dob"), ("zip", "zip"))
    d = pol.sections["k_anonymity"].describe()
    assert d["quasi_identifiers"]["zip"]["levels"] == ["value", "level 1", "level 2", "suppressed"]
    assert d["quasi_identifiers"]["zip"]["on_unknown"] == "top" and d["metric"] == "loss" and d["t_measure"] == "hierarchical"
    assert set(pol.attachments) == {"zip.csv", "dx.csv"}
