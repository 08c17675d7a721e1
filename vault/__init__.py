"""Token vault: convergent tokens, encrypted originals, SQLite and PostgreSQL backends.

Public API: `open_vault(ref, key_service) -> Vault` (see `cloakbeam.vault.store`), `Domain`, `TokenFormat`,
`VaultAccess` (role-checked, audited detokenize/forget), `RolePolicy`, `AuditLog`.
"""

from cloakbeam.vault.store import Domain, Vault, open_vault
from cloakbeam.vault.tokens import TokenFormat

__all__ = ["Domain", "TokenFormat", "Vault", "open_vault"]
