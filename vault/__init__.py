"""Token vault: convergent tokens, sealed originals, SQLite and PostgreSQL backends, and the reveal service.

Public API: `open_vault(ref, key_service) -> Vault` (see `cloakbeam.vault.store`), `Domain`, `TokenFormat`,
`RolePolicy` (grants, vault/roles.py), `AuditLog` (vault/audit.py). Revealing goes through the reveal service
(`cloakbeam.vault.service`, `cloakbeam serve`). See docs/token-vault.md and docs/access-control.md.
"""

from cloakbeam.vault.audit import AuditLog
from cloakbeam.vault.roles import RolePolicy
from cloakbeam.vault.store import Domain, Vault, check_vault_ref, open_vault
from cloakbeam.vault.tokens import TokenFormat

__all__ = ["AuditLog", "Domain", "RolePolicy", "TokenFormat", "Vault", "check_vault_ref", "open_vault"]
