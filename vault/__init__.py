"""Token vault: convergent tokens, encrypted originals, SQLite and PostgreSQL backends.

Public API: `open_vault(ref, key_service) -> Vault` (see `cloakbeam.vault.store`), `Domain`, `TokenFormat`,
`VaultAccess` (role-checked, audited detokenize/forget), `RolePolicy` (vault/roles.py), `AuditLog` and
`audit_key` (vault/audit.py). See docs/token-vault.md.
"""

from cloakbeam.vault.access import VaultAccess
from cloakbeam.vault.audit import AuditLog, audit_key
from cloakbeam.vault.roles import RolePolicy
from cloakbeam.vault.store import Domain, Vault, check_vault_ref, open_vault
from cloakbeam.vault.tokens import TokenFormat

__all__ = ["AuditLog", "Domain", "RolePolicy", "TokenFormat", "Vault", "VaultAccess", "audit_key", "check_vault_ref", "open_vault"]
