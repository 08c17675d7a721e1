"""Policies, config files and role policies are read strictly (issue 13): no aliases or anchors, no repeated key
at any depth, bounded size and depth, the policy hashed from its text; each refusal is a sentence with the line."""

from __future__ import annotations

import hashlib
import time

import pytest

from cloakbeam.core.config import load_config_file
from cloakbeam.errors import ConfigError, PolicyError
from cloakbeam.schemas.avro import schema_from_dict
from cloakbeam.tests.paths import NESTED
from cloakbeam.transforms.policy import load_policy

BASE = "version: 1\ndataset: t\nfields:\n  id: keep\n"


def _load(tmp_path, text: str):
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return load_policy(p, schema_from_dict(NESTED))


def test_a_repeated_field_is_refused_not_last_wins(tmp_path):
    with pytest.raises(PolicyError, match=r"policy file .*policy.yaml repeats the key 'age' at line 6 \(first at line 5\)"):
        _load(tmp_path, BASE + "  age: keep\n  age: drop\n")


def test_repeated_keys_at_any_depth_and_at_the_top(tmp_path):
    with pytest.raises(PolicyError, match=r"repeats the key 'method' at line 5"):
        _load(tmp_path, "version: 1\nfields:\n  id: keep\n  contact.email: {action: mask, method: email,\n    method: last4}\n")
    with pytest.raises(PolicyError, match=r"repeats the key 'fields' at line 5"):
        _load(tmp_path, BASE + "fields:\n  id: drop\n")


def test_an_alias_bomb_in_a_free_form_key_is_refused_at_once(tmp_path):
    bomb = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = BASE + "description:\n" + "".join(f"  {line}\n" for line in bomb)
    t0 = time.monotonic()
    with pytest.raises(PolicyError, match=r"defines an anchor \(&a\) at line 6; aliases and anchors are not allowed"):
        _load(tmp_path, text)
    assert time.monotonic() - t0 < 2


def test_a_lone_alias_and_a_merge_key_are_refused(tmp_path):
    with pytest.raises(PolicyError, match="anchor"):
        _load(tmp_path, BASE + "  age: &k keep\n  contact.city: *k\n")
    with pytest.raises(PolicyError, match="anchor"):
        _load(tmp_path, "base: &b {action: keep}\n" + BASE + "  age:\n    <<: *b\n")


def test_size_and_depth_caps(tmp_path):
    with pytest.raises(PolicyError, match=r"over the 1,048,576-byte limit"):
        _load(tmp_path, BASE + "description: '" + "x" * (1 << 20) + "'\n")
    with pytest.raises(PolicyError, match=r"nested more than 64 levels deep"):
        _load(tmp_path, BASE + "description: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PolicyError, match=r"more than one YAML document"):
        _load(tmp_path, BASE + "---\n" + BASE)


def test_the_policy_hash_is_of_its_text(tmp_path):
    text = BASE + "# reviewed by compliance\n"
    policy = _load(tmp_path, text)
    assert policy.content_hash == hashlib.sha256(text.encode()).hexdigest()
    assert policy.text == text


def test_refusals_never_quote_a_value(tmp_path):
    secret = "219-09-9999"
    with pytest.raises(PolicyError) as exc:
        _load(tmp_path, BASE + f"description: {secret}\ndescription: {secret}\n")
    assert secret not in str(exc.value)


def test_config_file_is_read_strictly(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("state_dir: /tmp/a\nkeys:\n  provider: local\n  provider: aws-kms\n")
    with pytest.raises(ConfigError, match=r"config file .* repeats the key 'provider' at line 4 \(first at line 3\)"):
        load_config_file(str(p))
    p.write_text("state_dir: &s /tmp/a\nvault: {path: *s}\n")
    with pytest.raises(ConfigError, match="anchor"):
        load_config_file(str(p))


def test_role_policy_is_read_strictly(tmp_path):
    from cloakbeam.vault.roles import RolePolicy

    p = tmp_path / "roles.yaml"
    p.write_text("version: 1\nroles:\n  analyst: []\n  analyst: [{action: detokenize, domains: ['*'], purposes: ['*']}]\n")
    with pytest.raises(ConfigError, match=r"role policy .* repeats the key 'analyst' at line 4"):
        RolePolicy.load(p)


def test_limits_section_is_validated(tmp_path):
    assert _load(tmp_path, BASE + "limits: {max_depth: 8, quarantine_record_bytes: 1024}\n").sections["limits"].max_depth == 8
    with pytest.raises(PolicyError, match="unknown limit 'max_dept'"):
        _load(tmp_path, BASE + "limits: {max_dept: 8}\n")
    with pytest.raises(PolicyError, match="limit 'max_depth' must be a positive whole number"):
        _load(tmp_path, BASE + "limits: {max_depth: -1}\n")


def test_a_control_character_in_a_policy_is_a_sentence(tmp_path):
    """Found by tests/fuzz/fuzz_policy.py: PyYAML's reader raised outside the loader's error handling."""
    with pytest.raises(PolicyError, match=r"holds a character YAML does not allow .* at character offset \d+"):
        _load(tmp_path, BASE + "description: a\x00b\n")


def test_a_null_top_level_key_is_a_sentence(tmp_path):
    """Found by tests/fuzz/fuzz_policy.py: sorting top-level keys raised TypeError on a null key."""
    with pytest.raises(PolicyError, match="every top-level key must be a name; found a NoneType key"):
        _load(tmp_path, BASE + "~: x\n")


def test_a_non_string_parameter_name_is_a_sentence(tmp_path):
    """Found by tests/fuzz/fuzz_policy.py: sorting an action's parameter names raised TypeError on an int key."""
    with pytest.raises(PolicyError, match=r"field 'age' \(action 'keep'\): parameter names must be words; found a int key"):
        _load(tmp_path, BASE + "  age: {action: keep, 7: x}\n")
