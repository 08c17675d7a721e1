"""Role policy: which role may reverse protection (detokenize, decrypt) or erase (forget), per domain and purpose.

Used by `cloakbeam vault detokenize` (token vault) and `cloakbeam decrypt` (keys layer). The policy is a YAML
file; default deny: a role, action, domain or purpose that no grant names is refused.

    version: 1
    roles:
      fraud-analyst:
        - action: detokenize               # or a list: [detokenize, decrypt, forget]
          domains: [card_number]           # token domains / encrypted column paths; "*" means any
          purposes: [fraud-investigation]  # "*" means any purpose (avoid: purposes are what the audit log shows)
      privacy-officer:
        - {action: [detokenize, decrypt], domains: ["*"], purposes: [dsar, erasure-check]}
    members:                               # optional: who may act in a role (OS user names)
      privacy-officer: [alice, bob]        # a role listed here refuses every other user

API (keep it small; the keys layer uses exactly this):
- `RolePolicy.load(path) -> RolePolicy` raises `ConfigError` with a sentence naming the file and what to fix.
- `RolePolicy.from_dict(doc, source)` for inline policies (tests).
- `policy.check(role, action, domain, purpose, actor=None) -> None` raises `AccessDenied` when no grant
  matches, or when the role has a `members` list that does not name `actor` (default: the current OS user).
- `policy.allows(role, action, domain, purpose) -> bool`.

Error messages name the role, action, domain and purpose (never a value or a key). Callers audit every check,
allowed or refused, with `cloakbeam.vault.audit.AuditLog`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloakbeam.errors import AccessDenied, ConfigError

ACTIONS = frozenset({"detokenize", "decrypt", "forget"})
_GRANT_KEYS = {"action", "actions", "domains", "purposes"}


@dataclass(frozen=True)
class Grant:
    """One grant: these actions on these domains for these purposes ("*" = any)."""

    actions: frozenset[str]
    domains: frozenset[str]
    purposes: frozenset[str]

    def matches(self, action: str, domain: str, purpose: str) -> bool:
        return (
            action in self.actions
            and ("*" in self.domains or domain in self.domains)
            and ("*" in self.purposes or purpose in self.purposes)
        )


class RolePolicy:
    """Grants per role, loaded from YAML; `check` is the single decision point (default deny)."""

    def __init__(
        self, grants: Mapping[str, tuple[Grant, ...]], source: str = "<inline>", members: Mapping[str, frozenset[str]] | None = None
    ) -> None:
        self.grants = dict(grants)
        self.source = source
        self.members = dict(members or {})

    @classmethod
    def load(cls, path: str | Path) -> RolePolicy:
        from cloakbeam.core.safeyaml import read_yaml_file

        p = Path(path)
        _, doc = read_yaml_file(p, what="role policy")
        return cls.from_dict(doc, source=str(p))

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<inline>") -> RolePolicy:
        where = f"role policy {source}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where} must be a YAML mapping with a 'roles' section")
        unknown = sorted(set(doc) - {"version", "roles", "members"})
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'; allowed keys: members, roles, version")
        if doc.get("version", 1) != 1:
            raise ConfigError(f"{where}: version {doc.get('version')!r} is not supported; use 'version: 1'")
        roles = doc.get("roles")
        if not isinstance(roles, dict) or not roles:
            raise ConfigError(f"{where} needs a 'roles' mapping from role name to a list of grants")
        grants: dict[str, tuple[Grant, ...]] = {}
        for role, items in roles.items():
            if not isinstance(role, str) or not role:
                raise ConfigError(f"{where}: role names must be non-empty strings")
            if isinstance(items, dict):
                items = [items]
            if not isinstance(items, list) or not items:
                raise ConfigError(f"{where}: role '{role}' must map to a list of grants")
            grants[role] = tuple(_grant(where, role, i, g) for i, g in enumerate(items))
        raw_members = doc.get("members") or {}
        if not isinstance(raw_members, dict):
            raise ConfigError(f"{where}: 'members' must map role names to lists of user names")
        members: dict[str, frozenset[str]] = {}
        for role, users in raw_members.items():
            if role not in grants:
                raise ConfigError(f"{where}: 'members' names role '{role}', which has no grants under 'roles'")
            if not isinstance(users, list) or not users or not all(isinstance(u, str) and u for u in users):
                raise ConfigError(f"{where}: members of role '{role}' must be a non-empty list of user names")
            members[role] = frozenset(users)
        return cls(grants, source, members)

    def allows(self, role: str, action: str, domain: str, purpose: str) -> bool:
        return any(g.matches(action, domain, purpose) for g in self.grants.get(role, ()))

    def check(self, role: str, action: str, domain: str, purpose: str, actor: str | None = None) -> None:
        """Return when `role` may perform `action` on `domain` for `purpose`; raise AccessDenied otherwise."""
        if action not in ACTIONS:
            raise AccessDenied(f"unknown action '{action}'")
        if not purpose:
            raise AccessDenied("a purpose is required for every detokenize or decrypt request")
        if role not in self.grants:
            raise AccessDenied(f"role '{role}' is not defined in {self.source}")
        if role in self.members:
            who = actor if actor is not None else _current_user()
            if who not in self.members[role]:
                raise AccessDenied(f"user '{who}' is not a member of role '{role}' in {self.source}")
        if not self.allows(role, action, domain, purpose):
            raise AccessDenied(f"role '{role}' may not {action} domain '{domain}' for purpose '{purpose}'")


def _current_user() -> str:
    import getpass
    import os

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


def _names(where: str, role: str, i: int, key: str, value: Any) -> frozenset[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: role '{role}' grant {i + 1}: '{key}' must be a name or a non-empty list of names")
    return frozenset(value)


def _grant(where: str, role: str, i: int, g: Any) -> Grant:
    if not isinstance(g, dict):
        raise ConfigError(f"{where}: role '{role}' grant {i + 1} must be a mapping with action, domains, purposes")
    unknown = sorted(set(g) - _GRANT_KEYS)
    if unknown:
        raise ConfigError(f"{where}: role '{role}' grant {i + 1}: unknown key '{unknown[0]}'; allowed: action, domains, purposes")
    for key in ("domains", "purposes"):
        if key not in g:
            raise ConfigError(f"{where}: role '{role}' grant {i + 1} needs '{key}' (use \"*\" for any)")
    raw_actions = g.get("action", g.get("actions"))
    if raw_actions is None:
        raise ConfigError(f"{where}: role '{role}' grant {i + 1} needs 'action' (detokenize, decrypt and/or forget)")
    actions = _names(where, role, i, "action", raw_actions)
    bad = sorted(actions - ACTIONS)
    if bad:
        raise ConfigError(f"{where}: role '{role}' grant {i + 1}: unknown action '{bad[0]}'; use detokenize, decrypt or forget")
    return Grant(actions, _names(where, role, i, "domains", g["domains"]), _names(where, role, i, "purposes", g["purposes"]))


def roles_of(policy: RolePolicy) -> Iterable[str]:
    """Role names defined by the policy (for CLI help and error hints)."""
    return sorted(policy.grants)
