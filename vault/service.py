"""The reveal service (`cloakbeam serve`): the only place that holds the reveal keyring and the vault's read path.

Callers prove who they are with a bearer JWT from a configured issuer (verified with PyJWT against the issuer's
public key or its JWKS URL: signature, algorithm allow-list, issuer, audience, expiry, not-before; unsigned and
HMAC tokens are refused). Roles and purposes come from the verified claims only. Grants (vault/roles.py) are data
held by the service. Every request, allowed or refused, is audited BEFORE it is answered, with the verified subject
as actor; a failed audit write fails the request. Audit entries are MAC'd with a key only this service holds, and
a signed checkpoint (entry count + head MAC) goes to a separate sink after every entry (vault/audit.py).

    GET  /healthz                                     liveness (no authentication, reveals nothing)
    POST /v1/detokenize   {"domain", "tokens": [...], "purpose"}       -> {"results": [{"status", "value"}]}
    POST /v1/decrypt?purpose=P&columns=a,b  body: one Parquet file     -> Arrow IPC stream, one batch per row group
    POST /v1/quarantine?purpose=P&dataset=D body: one quarantine file  -> JSON lines with record_base64
    POST /v1/forget       {"purpose", "subject" | "domain"+"value" | "expired": true}  -> {"forgotten": n}
    GET  /v1/audit/verify?purpose=P                                    -> {"entries", "checkpoints", ...}

Status codes: 401 no or bad token, 403 no grant (or members list), 429 row or request limit, 400 bad request,
422 integrity failure (tampered input), 503 the audit trail could not be written. Responses never carry key
material; values only in a granted answer. `RevealCore` is the same logic without HTTP, used in-process by the
CLI's explicit `--dev` mode.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloakbeam.core.config import KeyRef
from cloakbeam.errors import AccessDenied, CloakbeamError, ConfigError, IntegrityError, KeyAccessError
from cloakbeam.vault.audit import AnchoredAudit, AuditLog, FileCheckpointSink, PostgresCheckpointSink, appendable_file
from cloakbeam.vault.roles import Grant, RolePolicy

REFUSED_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
ARROW_STREAM = "application/vnd.apache.arrow.stream"


class AuthError(CloakbeamError):
    """The bearer token is missing, malformed, unsigned, forged, expired or for someone else (HTTP 401)."""


class LimitExceeded(CloakbeamError):
    """A grant's rows-per-day or requests-per-minute limit is used up (HTTP 429)."""


class AuditUnavailable(CloakbeamError):
    """The audit entry could not be written, so the request is refused (HTTP 503)."""


@dataclass(frozen=True)
class Identity:
    """Who is asking, as the verified token says (or the OS account in --dev mode)."""

    subject: str
    roles: tuple[str, ...]
    purposes: tuple[str, ...]
    issuer: str = ""


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class AuthConfig:
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    jwks_url: str | None = None
    public_key_pem: str | None = None
    roles_claim: str = "roles"
    purposes_claim: str = "purposes"
    leeway_seconds: float = 30.0


@dataclass
class ServiceConfig:
    """Everything `cloakbeam serve` needs, from one YAML file; paths relative to that file."""

    keys: KeyRef
    reveal_keys: KeyRef
    vault: dict[str, Any]
    grants_path: Path
    audit_log: Path
    checkpoints: Any  # FileCheckpointSink | PostgresCheckpointSink
    auth: AuthConfig
    max_body_bytes: int = 512 * 1024 * 1024
    source: str = "<inline>"
    extra: dict[str, Any] = field(default_factory=dict)


_TOP_KEYS = {"state_dir", "keys", "reveal_keys", "vault", "grants", "audit", "auth", "limits"}


def load_service_config(path: str | Path) -> ServiceConfig:
    """Read and check a service config; ConfigError with a sentence naming the file and what to fix."""
    p = Path(path).resolve()
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read service config {p}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError(f"service config {p} is not valid YAML") from None
    return service_config_from_dict(doc, p.parent, str(p))


def service_config_from_dict(doc: Any, base: Path, source: str = "<inline>") -> ServiceConfig:
    from cloakbeam.core.config import key_ref_from, vault_ref_from

    where = f"service config {source}"
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must be a YAML mapping")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(_TOP_KEYS))}")

    def rel(value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: '{what}' must be a path")
        q = Path(value).expanduser()
        return (q if q.is_absolute() else base / q).resolve()

    state = rel(doc.get("state_dir", "."), "state_dir")
    for section in ("keys", "reveal_keys", "auth", "grants"):
        if section not in doc:
            raise ConfigError(f"{where} needs a '{section}' section")
    keys_doc = dict(doc["keys"] or {})
    if "path" in keys_doc:
        keys_doc["path"] = str(rel(keys_doc["path"], "keys.path"))
    keys = key_ref_from({"keys": keys_doc}, state)
    rk = dict(doc["reveal_keys"] or {})
    if "path" not in rk:
        raise ConfigError(f"{where}: 'reveal_keys' needs the 'path' of the reveal keyring")
    rprov = rk.pop("provider", "local")
    rpath = str(rel(rk.pop("path"), "reveal_keys.path"))
    reveal = KeyRef(provider=rprov, path=rpath, params=tuple(sorted((str(k), str(v)) for k, v in rk.items())))
    vault_doc = dict(doc.get("vault") or {})
    if vault_doc.get("path"):
        vault_doc["path"] = str(rel(vault_doc["path"], "vault.path"))
    vault = vault_ref_from({"vault": vault_doc}, state)
    grants = rel(doc["grants"], "grants")
    audit = dict(doc.get("audit") or {})
    log = appendable_file(rel(audit.get("log", str(state / "audit.jsonl")), "audit.log"), f"{where}: 'audit.log'")
    sink: Any
    if audit.get("checkpoints_dsn_env"):
        sink = PostgresCheckpointSink(str(audit["checkpoints_dsn_env"]))
    elif audit.get("checkpoints"):
        cp = rel(audit["checkpoints"], "audit.checkpoints")
        for inside in (state, log.parent):
            if cp == inside or inside in cp.parents:
                raise ConfigError(
                    f"{where}: 'audit.checkpoints' ({cp}) must be outside the state directory and the audit log's directory ({inside}): "
                    "checkpoints are the evidence that survives a rewritten log"
                )
        sink = FileCheckpointSink(appendable_file(cp, f"{where}: 'audit.checkpoints'"))
    else:
        raise ConfigError(f"{where}: 'audit' needs 'checkpoints' (a file outside the state directory) or 'checkpoints_dsn_env' (a PostgreSQL table)")
    auth = _auth_config(doc["auth"], where, rel)
    limits = dict(doc.get("limits") or {})
    max_body = int(limits.get("max_body_bytes", 512 * 1024 * 1024))
    return ServiceConfig(keys, reveal, vault, grants, log, sink, auth, max_body, source)


def _auth_config(a: Any, where: str, rel: Any) -> AuthConfig:
    if not isinstance(a, dict):
        raise ConfigError(f"{where}: 'auth' must be a mapping with issuer, audience and jwks_url or public_key")
    allowed = {"issuer", "audience", "algorithms", "jwks_url", "public_key", "roles_claim", "purposes_claim", "leeway_seconds"}
    unknown = sorted(set(a) - allowed)
    if unknown:
        raise ConfigError(f"{where}: auth: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}")
    for k in ("issuer", "audience"):
        if not isinstance(a.get(k), str) or not a[k]:
            raise ConfigError(f"{where}: auth needs '{k}' (the token's expected '{k[:3]}' claim)")
    algs = tuple(a.get("algorithms") or DEFAULT_ALGORITHMS)
    bad = sorted(set(algs) & REFUSED_ALGORITHMS)
    if bad:
        raise ConfigError(f"{where}: auth algorithm '{bad[0]}' is refused: tokens must be signed by the issuer's private key (RS256, ES256, EdDSA, ...)")
    jwks, pem = a.get("jwks_url"), None
    if a.get("public_key"):
        pem = rel(a["public_key"], "auth.public_key").read_text()
    if bool(jwks) == bool(pem):
        raise ConfigError(f"{where}: auth needs exactly one of 'jwks_url' or 'public_key' (the issuer's PEM public key)")
    return AuthConfig(
        issuer=a["issuer"], audience=a["audience"], algorithms=algs, jwks_url=jwks, public_key_pem=pem,
        roles_claim=str(a.get("roles_claim", "roles")), purposes_claim=str(a.get("purposes_claim", "purposes")),
        leeway_seconds=float(a.get("leeway_seconds", 30)),
    )


# ------------------------------------------------------------------------------------------------ auth
class Authenticator:
    """Verify bearer JWTs (PyJWT): signature by the issuer, algorithm allow-list, iss, aud, exp, nbf, sub."""

    def __init__(self, cfg: AuthConfig) -> None:
        import jwt

        self.cfg = cfg
        self._jwt = jwt
        self._jwks = jwt.PyJWKClient(cfg.jwks_url, cache_keys=True, lifespan=300) if cfg.jwks_url else None
        self._key: Any = None
        if cfg.public_key_pem:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                self._key = load_pem_public_key(cfg.public_key_pem.encode())
            except ValueError:
                raise ConfigError("auth.public_key is not a PEM public key") from None

    def verify(self, authorization: str | None) -> Identity:
        jwt = self._jwt
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("a bearer token is required (Authorization: Bearer <JWT>)")
        token = authorization[len("Bearer ") :].strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the bearer token is not a JWT") from None
        alg = header.get("alg")
        if alg not in self.cfg.algorithms:
            raise AuthError(f"token algorithm '{alg}' is not accepted")
        try:
            key = self._jwks.get_signing_key_from_jwt(token).key if self._jwks is not None else self._key
            claims = jwt.decode(
                token, key, algorithms=list(self.cfg.algorithms), audience=self.cfg.audience, issuer=self.cfg.issuer,
                leeway=self.cfg.leeway_seconds, options={"require": ["exp", "iss", "aud", "sub"], "verify_nbf": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("the token is from another issuer") from None
        except jwt.PyJWKClientError:
            raise AuthError("the token's signing key is not in the issuer's JWKS") from None
        except jwt.PyJWTError:
            raise AuthError("the token signature or claims do not verify") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("the token has no subject")
        return Identity(sub, _names(claims.get(self.cfg.roles_claim)), _names(claims.get(self.cfg.purposes_claim) or claims.get("purpose")), str(claims.get("iss")))


def _names(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = v.split() if " " in v else [v]
    if not isinstance(v, list):
        return ()
    return tuple(str(x) for x in v if isinstance(x, str) and x)


# ------------------------------------------------------------------------------------------------ limits
class Limits:
    """Per identity and role: rows revealed per UTC day and requests per minute (grant limits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str, int], int] = {}
        self._recent: dict[tuple[str, str], deque[float]] = {}

    def seed(self, entries: Any, now: float) -> None:
        """Count today's allowed reveals from the audit log, so a restart does not reset a daily limit."""
        import datetime as dt

        today = int(now // 86400)
        for e in entries:
            if e.get("outcome") != "allowed":
                continue
            try:
                day = int(dt.datetime.fromisoformat(e["ts"]).timestamp() // 86400)
            except Exception:
                continue
            if day == today:
                k = (str(e.get("actor")), str(e.get("role")), day)
                self._rows[k] = self._rows.get(k, 0) + int(e.get("count", 0))

    def charge(self, actor: str, role: str, grant: Grant, rows: int, now: float) -> None:
        with self._lock:
            if grant.requests_per_minute is not None:
                q = self._recent.setdefault((actor, role), deque())
                while q and q[0] <= now - 60:
                    q.popleft()
                if len(q) >= grant.requests_per_minute:
                    raise LimitExceeded(f"role '{role}' allows {grant.requests_per_minute} requests per minute; try again later")
                q.append(now)
            if grant.rows_per_day is not None:
                k = (actor, role, int(now // 86400))
                used = self._rows.get(k, 0)
                if used + rows > grant.rows_per_day:
                    raise LimitExceeded(f"role '{role}' allows {grant.rows_per_day} rows per day; {used} used today, this request needs {rows}")
                self._rows[k] = used + rows


# ------------------------------------------------------------------------------------------------ core
class RevealCore:
    """Authorize, audit, then reveal. Holds the key service with the reveal keyring attached and opens one vault
    connection per thread. Every public method audits exactly once before it returns or raises."""

    def __init__(self, key_service: Any, vault_ref: dict[str, Any], grants: RolePolicy, audit: Any) -> None:
        self.keys = key_service
        self.vault_ref = dict(vault_ref)
        self.grants = grants
        self.audit = audit
        self.limits = Limits()
        self._local = threading.local()
        self._vaults: list[Any] = []
        self._vlock = threading.Lock()
        try:
            self.limits.seed(audit.log.entries() if hasattr(audit, "log") else audit.entries(), time.time())
        except Exception:  # an unreadable log shows up in audit verify; limits then start from zero
            pass

    def vault(self) -> Any:
        v = getattr(self._local, "vault", None)
        if v is None:
            from cloakbeam.vault.store import open_vault

            v = self._local.vault = open_vault(self.vault_ref, self.keys)
            with self._vlock:
                self._vaults.append(v)
        return v

    def close(self) -> None:
        with self._vlock:
            for v in self._vaults:
                v.close()
            self._vaults.clear()

    # -- the decision point ------------------------------------------------------------------------------------
    def _record(self, event: str, who: Identity | None, *, role: str, purpose: str, domain: str, outcome: str, count: int = 0,
                subject: str | None = None, detail: str = "") -> None:
        try:
            self.audit.append(event, role=role, purpose=purpose, domain=domain, subject=subject, outcome=outcome, count=count,
                              detail=detail, actor=who.subject if who is not None else "-")
        except Exception as exc:
            raise AuditUnavailable(f"the audit trail could not be written ({type(exc).__name__}); the request is refused") from None

    def refuse_unauthenticated(self, event: str, reason: str) -> None:
        """Audit a request whose token did not verify (actor '-')."""
        self._record(event, None, role="-", purpose="-", domain="-", outcome="denied", detail=f"auth: {reason}"[:200])

    def _purpose(self, who: Identity, purpose: str | None) -> str:
        if purpose:
            return purpose
        return who.purposes[0] if len(who.purposes) == 1 else ""

    def authorize(self, event: str, who: Identity, purpose: str | None, domains: Sequence[str], rows: int, subject: str | None = None) -> tuple[str, str]:
        """(role, purpose) when a grant allows it and its limits hold; otherwise audit 'denied' and raise."""
        purpose_ = self._purpose(who, purpose)
        label = ",".join(domains) if domains else "*"
        try:
            if not purpose_:
                raise AccessDenied("name a purpose: the token grants more than one (or none)")
            if purpose_ not in who.purposes:
                raise AccessDenied(f"the token does not grant purpose '{purpose_}'")
            role, grant = self.grants.grant_for(who.roles, event, domains, purpose_, who.subject, time.time())
            self.limits.charge(who.subject, role, grant, rows, time.time())
        except (AccessDenied, LimitExceeded) as exc:
            self._record(event, who, role=",".join(who.roles) or "-", purpose=purpose_ or "-", domain=label, outcome="denied",
                         count=rows, subject=subject, detail=str(exc)[:200])
            raise
        return role, purpose_

    # -- detokenize --------------------------------------------------------------------------------------------
    def detokenize(self, who: Identity, purpose: str | None, domain: str, tokens: Sequence[str], label: str | None = None) -> list[tuple[str, str | None]]:
        """(status, value) per token. `label` names a batch in the audit entry (e.g. "column:email:part-1.parquet");
        one token is recorded as itself."""
        tokens = [str(t) for t in tokens]
        subject = tokens[0] if len(tokens) == 1 else (str(label)[:200] if label else f"{len(tokens)} tokens")
        role, purpose_ = self.authorize("detokenize", who, purpose, [domain], len(tokens), subject)
        try:
            results = self.vault().reveal(domain, tokens)
        except CloakbeamError as exc:
            self._record("detokenize", who, role=role, purpose=purpose_, domain=domain, outcome="error", count=len(tokens), subject=subject,
                         detail=type(exc).__name__)
            raise
        counts: dict[str, int] = {}
        for s, _ in results:
            counts[s] = counts.get(s, 0) + 1
        outcome = {"ok": "allowed", "expired": "expired", "not_found": "not_found", "forgotten": "forgotten"}[results[0][0]] if len(tokens) == 1 else "allowed"
        detail = ",".join(f"{k}={counts[k]}" for k in ("ok", "expired", "not_found", "forgotten") if counts.get(k))
        self._record("detokenize", who, role=role, purpose=purpose_, domain=domain, outcome=outcome, count=len(tokens), subject=subject, detail=detail)
        return results

    # -- decrypt -----------------------------------------------------------------------------------------------
    def decrypt(
        self, who: Identity, purpose: str | None, data: bytes, columns: Sequence[str] | None, label: str = "upload",
        wrapped_keys: Sequence[dict[str, Any]] = (),
    ) -> tuple[Any, Iterator[Any], dict[str, int]]:
        """(output schema, iterator of decrypted row-group tables, unreadable cells per column) after the grant
        for every target column was checked and the reveal audited."""
        from cloakbeam.keys.cells import cell_key_ids
        from cloakbeam.vault.reveal import decrypt_parquet, encrypted_targets, parquet_file

        pf = parquet_file(data, self.keys)
        targets = encrypted_targets(pf.schema_arrow, columns)
        if not targets:
            raise ConfigError("the file has no encrypted column to decrypt")
        rows = pf.metadata.num_rows
        role, purpose_ = self.authorize("decrypt", who, purpose, targets, rows, f"file:{label}")
        from cloakbeam.keys.decrypt import encrypted_columns

        enc = encrypted_columns(pf.schema_arrow)
        unreadable: dict[str, int] = {}
        keyed = [c for c in targets if enc[c].get("subject") and "." not in c]
        if keyed:  # cells whose subject was forgotten, counted before anything is answered
            table = pf.read(columns=keyed)
            for c in keyed:
                ids = cell_key_ids(table.column(c))
                gone = self.vault().forgotten_column_keys(sorted(ids)) if ids else set()
                if gone:
                    import pyarrow as pa
                    import pyarrow.compute as pc

                    kid = pc.binary_slice(table.column(c).combine_chunks(), 1, 9)
                    unreadable[c] = int(pc.sum(pc.is_in(kid, value_set=pa.array(sorted(gone), pa.binary()))).as_py() or 0)
        detail = f"columns={','.join(targets)}" + (f";unreadable={sum(unreadable.values())}" if unreadable else "")
        self._record("decrypt", who, role=role, purpose=purpose_, domain=",".join(targets), outcome="allowed", count=rows,
                     subject=f"file:{label}", detail=detail[:200])
        batches = decrypt_parquet(pf, self.keys, self.vault(), targets, wrapped_keys)
        first = next(batches, None)

        def chain() -> Iterator[Any]:
            if first is not None:
                yield first[0]
                for t, _ in batches:
                    yield t

        schema = first[0].schema if first is not None else pf.schema_arrow
        return schema, chain(), unreadable

    # -- quarantine --------------------------------------------------------------------------------------------
    def open_quarantine(self, who: Identity, purpose: str | None, dataset: str, data: bytes, label: str = "upload") -> list[dict[str, Any]]:
        from cloakbeam.vault.reveal import open_quarantine_lines

        lines = [x for x in data.splitlines() if x.strip()]
        role, purpose_ = self.authorize("decrypt", who, purpose, ["quarantine"], len(lines), f"file:{label}")
        try:
            out = list(open_quarantine_lines(lines, self.keys, dataset))
        except CloakbeamError as exc:
            self._record("decrypt", who, role=role, purpose=purpose_, domain="quarantine", outcome="error", count=len(lines), detail=type(exc).__name__)
            raise
        self._record("decrypt", who, role=role, purpose=purpose_, domain="quarantine", outcome="allowed", count=len(out), subject=f"file:{label}")
        return out

    # -- forget ------------------------------------------------------------------------------------------------
    def forget(self, who: Identity, purpose: str | None, *, subject: str | None = None, domain: str | None = None,
               value: str | None = None, expired: bool = False) -> int:
        from cloakbeam.vault.tokens import normalize

        vault = self.vault()
        if sum([subject is not None, value is not None, expired]) != 1:
            raise ConfigError("forget needs exactly one of 'subject', 'value' (with 'domain') or 'expired'")
        if value is not None:
            if not domain:
                raise ConfigError("forget by value needs the token domain")
            dom = vault.domain(domain)
            ref = "bidx:" + vault.blind_index(domain, normalize([value], dom.normalize))[0].hex()
            scope = domain
        elif subject is not None:
            ref, scope = "subject:" + vault.subject_ref(subject), "*"
        else:
            ref, scope = "expired", domain or "*"
        role, purpose_ = self.authorize("forget", who, purpose, [scope], 1, ref)
        if value is not None:
            n = vault.forget_value(domain, value)
        elif subject is not None:
            n = vault.forget_subject(subject)
        else:
            n = vault.forget_expired(domain)
        self._record("forget", who, role=role, purpose=purpose_, domain=scope, outcome="forgotten" if n else "not_found", count=n, subject=ref)
        return n

    # -- audit -------------------------------------------------------------------------------------------------
    def audit_verify(self, who: Identity, purpose: str | None) -> dict[str, Any]:
        role, purpose_ = self.authorize("audit", who, purpose, ["*"], 0, "verify")
        try:
            result = self.audit.verify() if hasattr(self.audit, "verify") and isinstance(self.audit, AnchoredAudit) else {"entries": self.audit.verify()}
        except IntegrityError as exc:
            result = {"ok": False, "problem": str(exc)}
        else:
            result = {"ok": True, **result}
        self._record("audit", who, role=role, purpose=purpose_, domain="*", outcome="allowed" if result["ok"] else "error", detail="verify")
        return result


# ------------------------------------------------------------------------------------------------ assembly
def open_core(cfg: ServiceConfig) -> RevealCore:
    """Open keys, reveal keyring, grants and anchored audit for a service config (ConfigError with a sentence)."""
    from cloakbeam.keys.sealing import open_reveal_keys
    from cloakbeam.keys.service import open_key_service

    try:
        ks = open_key_service(cfg.keys)
        reveal = open_reveal_keys(cfg.reveal_keys)
    except KeyAccessError as exc:
        raise ConfigError(str(exc)) from None
    ks.attach_reveal(reveal)
    grants = RolePolicy.load(cfg.grants_path)
    log = AuditLog(cfg.audit_log, reveal.audit_key())
    audit = AnchoredAudit(log, cfg.checkpoints, reveal.checkpoint_key(), reveal.checkpoint_public_key(), reveal._doc.get("keyring_id", "audit"))
    audit.recover()
    core = RevealCore(ks, cfg.vault, grants, audit)
    core.vault()  # fail at start-up, not on the first request, when the vault cannot be opened
    return core


def open_dev_core(state: Path, keys: KeyRef, vault_ref: dict[str, Any]) -> RevealCore:
    """The `--dev` core: a development keyring pair in the state dir, grants from STATE_DIR/roles.yaml, the audit
    log and its checkpoints in the state dir. For development only: whoever runs it holds every key."""
    from cloakbeam.keys.service import dev_reveal_keyring_path

    grants = state / "roles.yaml"
    if not grants.exists():
        raise ConfigError(f"--dev reads its grants from {grants}, which does not exist (see docs/access-control.md)")
    cfg = ServiceConfig(
        keys=keys, reveal_keys=KeyRef(path=str(dev_reveal_keyring_path(keys.path or ""))), vault=vault_ref, grants_path=grants,
        audit_log=state / "audit.jsonl", checkpoints=FileCheckpointSink(state / "audit.checkpoints.jsonl"),
        auth=AuthConfig(issuer="dev", audience="dev"), source="--dev",
    )
    return open_core(cfg)


def dev_identity(role: str, purpose: str) -> Identity:
    """The OS account (from the kernel's uid, not $USER) acting in `role` for `purpose`: self-asserted, --dev only."""
    from cloakbeam.vault.roles import _current_user

    return Identity(_current_user(), (role,), (purpose,), "dev")


def build_app(core: RevealCore, auth: Authenticator, max_body_bytes: int = 512 * 1024 * 1024) -> Any:
    """The Starlette app: authentication as the first step of every endpoint, errors as JSON sentences."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    status = {AuthError: 401, AccessDenied: 403, LimitExceeded: 429, AuditUnavailable: 503, ConfigError: 400, IntegrityError: 422, KeyAccessError: 422}

    def error(exc: Exception) -> JSONResponse:
        code = next((c for t, c in status.items() if isinstance(exc, t)), 500)
        return JSONResponse({"error": str(exc) if code != 500 else "internal error"}, status_code=code)

    async def identify(request: Request, event: str) -> Identity:
        try:
            return await run_in_threadpool(auth.verify, request.headers.get("authorization"))
        except AuthError as exc:
            await run_in_threadpool(core.refuse_unauthenticated, event, str(exc))
            raise

    async def body(request: Request) -> bytes:
        n = request.headers.get("content-length")
        if n is not None and int(n) > max_body_bytes:
            raise ConfigError(f"request body exceeds {max_body_bytes} bytes")
        data = await request.body()
        if len(data) > max_body_bytes:
            raise ConfigError(f"request body exceeds {max_body_bytes} bytes")
        return data

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            doc = json.loads(await body(request))
        except ValueError:
            raise ConfigError("the request body must be a JSON object") from None
        if not isinstance(doc, dict):
            raise ConfigError("the request body must be a JSON object")
        return doc

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def detokenize(request: Request) -> Response:
        try:
            who = await identify(request, "detokenize")
            doc = await json_body(request)
            tokens = doc.get("tokens")
            if not isinstance(doc.get("domain"), str) or not isinstance(tokens, list) or not tokens:
                raise ConfigError("detokenize needs 'domain' and a non-empty list of 'tokens'")
            label = doc.get("label") if isinstance(doc.get("label"), str) else None
            results = await run_in_threadpool(core.detokenize, who, doc.get("purpose"), doc["domain"], tokens, label)
        except Exception as exc:
            return error(exc)
        return JSONResponse({"results": [{"status": s, "value": v} for s, v in results]})

    async def decrypt(request: Request) -> Response:
        try:
            from cloakbeam.vault.client import unframe_decrypt_body

            who = await identify(request, "decrypt")
            records, data = unframe_decrypt_body(await body(request))
            cols = request.query_params.get("columns")
            columns = [c for c in cols.split(",") if c] if cols else None
            label = request.query_params.get("file", "upload")[:200]
            schema, batches, unreadable = await run_in_threadpool(core.decrypt, who, request.query_params.get("purpose"), data, columns, label, records)
        except Exception as exc:
            return error(exc)

        return StreamingResponse(_ipc_chunks(schema, batches), media_type=ARROW_STREAM,
                                 headers={"x-cloakbeam-unreadable": json.dumps(unreadable, sort_keys=True)})

    async def quarantine(request: Request) -> Response:
        try:
            who = await identify(request, "decrypt")
            data = await body(request)
            dataset = request.query_params.get("dataset")
            if not dataset:
                raise ConfigError("quarantine needs the dataset id (?dataset=...)")
            entries = await run_in_threadpool(core.open_quarantine, who, request.query_params.get("purpose"), dataset, data,
                                              request.query_params.get("file", "upload")[:200])
        except Exception as exc:
            return error(exc)
        return Response("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries), media_type="application/x-ndjson")

    async def forget(request: Request) -> Response:
        try:
            who = await identify(request, "forget")
            doc = await json_body(request)
            n = await run_in_threadpool(
                lambda: core.forget(who, doc.get("purpose"), subject=doc.get("subject"), domain=doc.get("domain"), value=doc.get("value"),
                                    expired=bool(doc.get("expired", False)))
            )
        except Exception as exc:
            return error(exc)
        return JSONResponse({"forgotten": n})

    async def audit_verify(request: Request) -> Response:
        try:
            who = await identify(request, "audit")
            result = await run_in_threadpool(core.audit_verify, who, request.query_params.get("purpose"))
        except Exception as exc:
            return error(exc)
        return JSONResponse(result)

    routes = [
        Route("/healthz", health, methods=["GET"]),
        Route("/v1/detokenize", detokenize, methods=["POST"]),
        Route("/v1/decrypt", decrypt, methods=["POST"]),
        Route("/v1/quarantine", quarantine, methods=["POST"]),
        Route("/v1/forget", forget, methods=["POST"]),
        Route("/v1/audit/verify", audit_verify, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _ChunkSink:
    """A file-like sink for pyarrow's IPC writer that hands out what was written so far."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def _ipc_chunks(schema: Any, batches: Iterator[Any]) -> Iterator[bytes]:
    """Arrow IPC stream bytes, one chunk per decrypted row group (memory stays at one row group)."""
    import pyarrow as pa

    sink = _ChunkSink()
    writer = pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), schema)
    for table in batches:
        writer.write_table(table)
        yield sink.take()
    writer.close()
    yield sink.take()


def serve(cfg: ServiceConfig, host: str = "127.0.0.1", port: int = 8443, tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Run the service on uvicorn until interrupted (TLS when a certificate and key are given)."""
    import ipaddress

    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if tls_cert is None and not loopback:
        raise ConfigError(f"refusing to serve reveals over plain HTTP on {host}; pass --tls-cert and --tls-key (plain HTTP is for loopback only)")
    core = open_core(cfg)
    app = build_app(core, Authenticator(cfg.auth), cfg.max_body_bytes)
    try:
        uvicorn.run(app, host=host, port=port, ssl_certfile=tls_cert, ssl_keyfile=tls_key, log_level="warning", access_log=False)
    finally:
        core.close()
