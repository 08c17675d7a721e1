"""Policy validation: every bad policy fails at construction with a sentence naming the problem; default deny."""

from __future__ import annotations

import pytest
import yaml

from cloakbeam.errors import PolicyError
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.tests.paths import NESTED, POLICY, SCHEMA
from cloakbeam.transforms.policy import compile_policy, load_policy


def _compile(fields, schema=None, **extra):
    schema = schema or schema_from_dict(NESTED)
    return compile_policy({"version": 1, "dataset": "t", "fields": fields, **extra}, schema, source="p.yaml")


def test_reference_policy_compiles_and_denies_internal_ref(customers_schema):
    policy = load_policy(POLICY, customers_schema)
    assert "internal_ref" in policy.unmentioned
    assert "internal_ref" in policy.dropped
    assert "internal_ref" not in policy.output_schema().names


@pytest.mark.parametrize(
    "fields,extra,message",
    [
        ({"idd": "keep"}, {}, "field 'idd' is not in schema .*did you mean 'id'"),
        ({"id": "shred"}, {}, "unknown action 'shred'; registered actions: .*keep"),
        ({"id": {"action": "keep", "colour": "red"}}, {}, "field 'id' \\(action 'keep'\\): unknown parameter 'colour'"),
        ({"id": {"mode": "x"}}, {}, "field 'id' needs an 'action' key"),
        ({"id": 5}, {}, "field 'id' must map to an action name"),
        ({}, {}, "needs a 'fields' mapping"),
        ({"id": "keep"}, {"version": 2}, "version 2 is not supported"),
        ({"id": "keep"}, {"colour": "red"}, "unknown top-level key 'colour'"),
        ({"id": "keep"}, {"dataset": "bad name!"}, "'dataset' must be a non-empty name"),
    ],
)
def test_bad_policies_fail_with_a_sentence(fields, extra, message):
    with pytest.raises(PolicyError, match=message) as info:
        _compile(fields, **extra)
    assert "p.yaml" in str(info.value)


def test_record_paths_expand_and_inner_rules_win():
    policy = _compile({"id": "keep", "contact": "drop", "contact.city": "keep"})
    assert policy.actions["contact.email"].name == "drop"
    assert policy.actions["contact.city"].name == "keep"
    assert policy.unmentioned == ["age", "visited"]
    out = policy.output_schema()
    assert out.names == ["id", "contact"]
    assert [f.name for f in out.field("contact").type] == ["city"]


def test_output_schema_carries_action_and_class_metadata(customers_schema):
    policy = load_policy(POLICY, customers_schema)
    field = policy.output_schema().field("income")
    assert field.metadata[b"cloakbeam.class"] == b"NUMERIC"
    assert b'"action": "generalize"' in field.metadata[b"cloakbeam.action"] and b'"edges": [30000' in field.metadata[b"cloakbeam.action"]
    assert b'"action": "keep"' in policy.output_schema().field("diagnosis").metadata[b"cloakbeam.action"]


def test_unreadable_and_invalid_yaml(tmp_path, customers_schema):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml", customers_schema)
    bad = tmp_path / "bad.yaml"
    bad.write_text("fields: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML at line"):
        load_policy(bad, customers_schema)


def test_cli_exits_2_with_a_sentence(tmp_path, capsys, reference_inputs):
    from cloakbeam.cli.main import main

    for fields, needle in (({"nope": "keep"}, "field 'nope' is not in schema"), ({"gender": "shred"}, "unknown action 'shred'"),
                           ({"gender": {"action": "keep", "x": 1}}, "unknown parameter 'x'")):
        p = tmp_path / "policy.yaml"
        p.write_text(yaml.safe_dump({"version": 1, "fields": fields}))
        code = main(["run", "--dev", "--input", reference_inputs["jsonl"]["path"], "--schema", str(SCHEMA), "--policy", str(p), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2
        assert needle in err
        assert "Traceback" not in err
