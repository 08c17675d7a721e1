"""Role policy: grants match exactly; every malformed policy fails with a sentence (ConfigError)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloakbeam.errors import AccessDenied, ConfigError
from cloakbeam.vault.roles import RolePolicy

DOC = {
    "version": 1,
    "roles": {
        "analyst": [{"action": "detokenize", "domains": ["email"], "purposes": ["support"]}],
        "dpo": {"action": ["detokenize", "forget", "decrypt"], "domains": "*", "purposes": ["dsar"]},
    },
}


@pytest.mark.parametrize(
    "role,action,domain,purpose,ok",
    [
        ("analyst", "detokenize", "email", "support", True),
        ("analyst", "detokenize", "card_number", "support", False),
        ("analyst", "detokenize", "email", "marketing", False),
        ("analyst", "decrypt", "email", "support", False),
        ("analyst", "forget", "email", "support", False),
        ("dpo", "decrypt", "income", "dsar", True),
        ("dpo", "forget", "*", "dsar", True),
        ("dpo", "forget", "email", "audit", False),
        ("stranger", "detokenize", "email", "support", False),
    ],
)
def test_check_matrix(role: str, action: str, domain: str, purpose: str, ok: bool) -> None:
    pol = RolePolicy.from_dict(DOC)
    assert pol.allows(role, action, domain, purpose) is ok
    if ok:
        pol.check(role, action, domain, purpose)
    else:
        with pytest.raises(AccessDenied, match=role):
            pol.check(role, action, domain, purpose)


def test_empty_purpose_and_unknown_action_refused() -> None:
    pol = RolePolicy.from_dict(DOC)
    with pytest.raises(AccessDenied, match="purpose is required"):
        pol.check("dpo", "decrypt", "x", "")
    with pytest.raises(AccessDenied, match="unknown action"):
        pol.check("dpo", "delete", "x", "dsar")


@pytest.mark.parametrize(
    "doc,fragment",
    [
        ([], "YAML mapping"),
        ({"roles": {}}, "needs a 'roles' mapping"),
        ({"roles": {"a": []}}, "list of grants"),
        ({"version": 2, "roles": {"a": [{}]}}, "version"),
        ({"roles": {"a": [{"action": "detokenize", "domains": ["x"]}]}}, "needs 'purposes'"),
        ({"roles": {"a": [{"domains": ["x"], "purposes": ["p"]}]}}, "needs 'action'"),
        ({"roles": {"a": [{"action": "delete", "domains": ["x"], "purposes": ["p"]}]}}, "unknown action 'delete'"),
        ({"roles": {"a": [{"action": "decrypt", "domains": [], "purposes": ["p"]}]}}, "'domains' must be"),
        ({"roles": {"a": [{"action": "decrypt", "domains": ["x"], "purposes": ["p"], "until": 1}]}}, "unknown key 'until'"),
        ({"roles": {"a": ["decrypt"]}}, "must be a mapping"),
        ({"users": {}, "roles": {"a": [{}]}}, "unknown key 'users'"),
    ],
)
def test_bad_policies(doc: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        RolePolicy.from_dict(doc, source="roles.yaml")


def test_load_from_file(tmp_path: Path) -> None:
    p = tmp_path / "roles.yaml"
    p.write_text("roles:\n  analyst:\n    - {action: detokenize, domains: [email], purposes: [support]}\n")
    assert RolePolicy.load(p).allows("analyst", "detokenize", "email", "support")
    p.write_text("roles: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RolePolicy.load(p)
    with pytest.raises(ConfigError, match="cannot read"):
        RolePolicy.load(tmp_path / "missing.yaml")


def test_members_bind_a_role_to_users() -> None:
    import getpass

    me = getpass.getuser()
    doc = {**DOC, "members": {"dpo": ["someone-else"], "analyst": [me]}}
    pol = RolePolicy.from_dict(doc)
    with pytest.raises(AccessDenied, match="not a member of role 'dpo'"):
        pol.check("dpo", "decrypt", "income", "dsar")
    pol.check("dpo", "decrypt", "income", "dsar", actor="someone-else")
    pol.check("analyst", "detokenize", "email", "support")  # current user is a member
    with pytest.raises(ConfigError, match="has no grants"):
        RolePolicy.from_dict({**DOC, "members": {"ghost": ["x"]}})
    with pytest.raises(ConfigError, match="non-empty list"):
        RolePolicy.from_dict({**DOC, "members": {"dpo": []}})
