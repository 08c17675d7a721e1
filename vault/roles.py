"""Grants: which role may reverse protection (detokenize, decrypt), erase (forget) or read the audit trail, per
domain and purpose, until when and how much per day. Grants are DATA HELD BY THE REVEAL SERVICE (its `grants:`
file); a caller's roles come from its verified token (vault/service.py), never from a flag, a file the caller
names, or an environment variable. Default deny: a role, action, domain or purpose that no grant names is refused.

    version: 1
    roles:
      fraud-analyst:
        - action: detokenize               # or a list: [detokenize, decrypt, forget]
          domains: [card_number]           # token domains / encrypted column paths; "*" means any
          purposes: [fraud-investigation]  # "*" means any purpose (avoid: purposes are what the audit log shows)
      privacy-officer:
        - {action: [detokenize, decrypt], domains: ["*"], purposes: [dsar, erasure-check],
           valid_until: 2027-06-30T00:00:00Z,   # optional: the grant ends then (UTC)
           rows_per_day: 10000,                 # optional: values/rows revealed per identity per UTC day
           requests_per_minute: 60}             # optional: requests per identity per minute
    members:                               # optional: which verified subjects (token `sub`) may act in a role
      privacy-officer: [alice@corp, bob@corp]

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

ACTIONS = frozenset({"detokenize", "decrypt", "forget", "audit"})
_GRANT_KEYS = {"action", "actions", "domains", "purposes", "valid_until", "rows_per_day", "requests_per_minute"}


@dataclass(frozen=True)
class Grant:
    """One grant: these actions on these domains for these purposes ("*" = any), optionally until a time and
    within per-identity limits (rows per UTC day, requests per minute)."""

    actions: frozenset[str]
    domains: frozenset[str]
    purposes: frozenset[str]
    valid_until: float | None = None  # POSIX seconds
    rows_per_day: int | None = None
    requests_per_minute: int | None = None

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

    def grant_for(
        self, roles: Iterable[str], action: str, domains: Iterable[str], purpose: str, subject: str, now: float
    ) -> tuple[str, Grant]:
        """The (role, grant) that lets an identity with `roles` (verified claims) and `subject` do `action` on every
        one of `domains` for `purpose` now; AccessDenied naming what is missing otherwise. Expired grants do not
        count; among several, the one with the highest daily limit is used."""
        domains = list(domains)
        if not purpose:
            raise AccessDenied("a purpose is required for every request")
        expired = False
        best: tuple[str, Grant] | None = None
        for role in sorted(set(roles)):
            if role not in self.grants:
                continue
            if role in self.members and subject not in self.members[role]:
                continue
            for g in self.grants[role]:
                if not all(g.matches(action, d, purpose) for d in domains):
                    continue
                if g.valid_until is not None and now >= g.valid_until:
                    expired = True
                    continue
                if best is None or (g.rows_per_day or float("inf")) > (best[1].rows_per_day or float("inf")):
                    best = (role, g)
        if best is not None:
            return best
        what = ", ".join(domains) or "*"
        if expired:
            raise AccessDenied(f"the grant for {action} on '{what}' for purpose '{purpose}' has expired")
        shown = ", ".join(sorted(set(roles))) or "none"
        raise AccessDenied(f"no grant lets roles [{shown}] {action} '{what}' for purpose '{purpose}'")

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
    """The OS account running this process, from the kernel's uid (never $USER/$LOGNAME, which anyone can set)."""
    import os
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no passwd entry in some containers
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
        raise ConfigError(
            f"{where}: role '{role}' grant {i + 1}: unknown key '{unknown[0]}'; allowed: action, domains, purposes, valid_until, rows_per_day, requests_per_minute"
        )
    for key in ("domains", "purposes"):
        if key not in g:
            raise ConfigError(f"{where}: role '{role}' grant {i + 1} needs '{key}' (use \"*\" for any)")
    raw_actions = g.get("action", g.get("actions"))
    if raw_actions is None:
        raise ConfigError(f"{where}: role '{role}' grant {i + 1} needs 'action' (detokenize, decrypt, forget and/or audit)")
    actions = _names(where, role, i, "action", raw_actions)
    bad = sorted(actions - ACTIONS)
    if bad:
        raise ConfigError(f"{where}: role '{role}' grant {i + 1}: unknown action '{bad[0]}'; use detokenize, decrypt, forget or audit")
    return Grant(
        actions,
        _names(where, role, i, "domains", g["domains"]),
        _names(where, role, i, "purposes", g["purposes"]),
        valid_until=_when(where, role, i, g.get("valid_until")),
        rows_per_day=_limit(where, role, i, "rows_per_day", g.get("rows_per_day")),
        requests_per_minute=_limit(where, role, i, "requests_per_minute", g.get("requests_per_minute")),
    )


def _when(where: str, role: str, i: int, value: Any) -> float | None:
    import datetime as dt

    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            value = None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc).timestamp()
    raise ConfigError(f"{where}: role '{role}' grant {i + 1}: 'valid_until' must be an ISO-8601 date or time such as 2027-01-31T00:00:00Z")


def _limit(where: str, role: str, i: int, key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: role '{role}' grant {i + 1}: '{key}' must be a positive whole number")
    return value


def roles_of(policy: RolePolicy) -> Iterable[str]:
    """Role names defined by the policy (for CLI help and error hints)."""
    return sorted(policy.grants)
