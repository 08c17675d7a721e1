"""Role-checked, audited access to the vault: the supported way to detokenize and to forget.

    access = VaultAccess(vault, RolePolicy.load("roles.yaml"), AuditLog(path, audit_key(keys)))
    values = access.detokenize("fraud-analyst", "chargeback-review", "card_number", ["4929..."])
    access.forget("privacy-officer", "gdpr-art17", domain="email", value="a@example.com")
    access.forget("privacy-officer", "gdpr-art17", subject="c-000123")

Every attempt, allowed or refused, is written to the audit log before this returns or raises. Audit entries
name the role, purpose, domain, a token or keyed hash and counts - never a value. The check is a guard for
honest callers in one process; the real boundary is who holds the keyring/KMS access and the vault's database
credentials (see docs/token-vault.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from cloakbeam.errors import AccessDenied
from cloakbeam.vault.audit import AuditLog
from cloakbeam.vault.roles import RolePolicy
from cloakbeam.vault.store import Vault
from cloakbeam.vault.tokens import normalize

_OUTCOME = {"ok": "allowed", "expired": "expired", "not_found": "not_found", "forgotten": "forgotten"}


class VaultAccess:
    """A vault plus the role policy that guards it and the audit log that records every request."""

    def __init__(self, vault: Vault, roles: RolePolicy, audit: AuditLog) -> None:
        self.vault = vault
        self.roles = roles
        self.audit = audit

    def _check(self, event: str, role: str, purpose: str, domain: str, subject: str | None, count: int) -> None:
        try:
            self.roles.check(role, event, domain, purpose)
        except AccessDenied:
            self.audit.append(event, role=role, purpose=purpose, domain=domain, subject=subject, outcome="denied", count=count)
            raise

    def detokenize_detailed(
        self, role: str, purpose: str, domain: str, tokens: Sequence[str], label: str | None = None
    ) -> list[tuple[str, str | None]]:
        """(status, value) per token, status ok | expired | not_found | forgotten. Raises AccessDenied (audited).

        `label` names what was detokenized in the audit entry when there is more than one token (e.g.
        "column:email"); a single token is recorded as itself.
        """
        tokens = list(tokens)
        subject = tokens[0] if len(tokens) == 1 else (label or f"{len(tokens)} tokens")
        self._check("detokenize", role, purpose, domain, subject, len(tokens))
        try:
            results = self.vault.reveal(domain, tokens)
        except Exception as exc:
            self.audit.append(
                "detokenize", role=role, purpose=purpose, domain=domain, subject=subject, outcome="error",
                count=len(tokens), detail=exc.__class__.__name__,
            )
            raise
        counts = Counter(s for s, _ in results)
        if len(tokens) == 1:
            outcome = _OUTCOME[results[0][0]]
        else:
            outcome = "allowed"
        detail = ",".join(f"{k}={counts[k]}" for k in ("ok", "expired", "not_found", "forgotten") if counts[k])
        self.audit.append(
            "detokenize", role=role, purpose=purpose, domain=domain, subject=subject, outcome=outcome, count=len(tokens), detail=detail
        )
        return results

    def detokenize(self, role: str, purpose: str, domain: str, tokens: Sequence[str]) -> list[str | None]:
        """Original (normalized) values, None where a token is unknown, expired or forgotten."""
        return [v if s == "ok" else None for s, v in self.detokenize_detailed(role, purpose, domain, tokens)]

    def forget(self, role: str, purpose: str, *, domain: str | None = None, value: str | None = None, subject: str | None = None) -> int:
        """Crypto-shred by (domain, value) or by subject id; return the number of entries made irreversible."""
        if (value is None) == (subject is None):
            raise ValueError("forget needs exactly one of value (with domain) or subject")
        if value is not None:
            if not domain:
                raise ValueError("forget by value needs the token domain")
            dom = self.vault.domain(domain)
            ref = self.vault.blind_index(domain, normalize([value], dom.normalize))[0].hex()
            self._check("forget", role, purpose, domain, f"bidx:{ref}", 1)
            n = self.vault.forget_value(domain, value)
        else:
            assert subject is not None  # exactly one of value and subject, checked above
            ref = self.vault.subject_ref(subject)
            domain = domain or "*"
            self._check("forget", role, purpose, domain, f"subject:{ref}", 1)
            n = self.vault.forget_subject(subject)
            ref = f"subject:{ref}"
        self.audit.append(
            "forget", role=role, purpose=purpose, domain=domain, subject=ref if subject is not None else f"bidx:{ref}",
            outcome="forgotten" if n else "not_found", count=n,
        )
        return n

    def forget_expired(self, role: str, purpose: str, domain: str | None = None) -> int:
        """Crypto-shred every entry past its TTL (in `domain`, or in all domains with a "*" grant); audited."""
        scope = domain or "*"
        self._check("forget", role, purpose, scope, "expired", 0)
        n = self.vault.forget_expired(domain)
        self.audit.append("forget", role=role, purpose=purpose, domain=scope, subject="expired",
                          outcome="forgotten" if n else "not_found", count=n)
        return n
