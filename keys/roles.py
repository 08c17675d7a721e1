"""Role policy for `cloakbeam decrypt`: the vault layer's `cloakbeam.vault.roles.RolePolicy` (action `decrypt`,
domain = encrypted column path). This module only loads it, so the keys layer has one import point."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_role_policy(path: str | Path) -> Any:
    """Load the role policy YAML (ConfigError naming the file on problems)."""
    from cloakbeam.vault.roles import RolePolicy

    return RolePolicy.load(path)
