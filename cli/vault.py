"""`cloakbeam vault detokenize|forget` and `cloakbeam audit verify`.

    cloakbeam vault detokenize --role R --purpose P --domain email TOKEN [TOKEN ...]
    cloakbeam vault detokenize --role R --purpose P --input OUT/data --column email --out REVEALED/
    cloakbeam vault forget --role R --purpose P --domain email --value-stdin   (or --value V, --subject ID, --expired)
    cloakbeam audit verify [--log FILE]

Local state (keyring, SQLite vault, audit log `audit.jsonl`, role policy `roles.yaml`) comes from --state-dir /
$CLOAKBEAM_STATE_DIR / --config like `cloakbeam run`. A PostgreSQL vault is named by --vault-dsn-env VAR (the
DSN itself is read from that environment variable) or by the config file's `vault` section. Exit codes: 0 ok,
1 refused / integrity failure / a token that did not detokenize, 2 usage or configuration error.
Values are printed only by `detokenize`, to stdout, because that is what the caller was granted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cloakbeam.errors import ConfigError, IntegrityError

AUDIT_FILE = "audit.jsonl"
ROLES_FILE = "roles.yaml"


def register(subparsers: Any) -> None:
    vault = subparsers.add_parser("vault", help="detokenize values or forget a subject (role-checked, audited)")
    vsub = vault.add_subparsers(dest="vault_command", metavar="SUBCOMMAND")
    vsub.required = True

    det = vsub.add_parser("detokenize", help="reveal tokens (single values or a whole output column)")
    _common(det)
    _who(det)
    det.add_argument("--domain", default=None, help="token domain (default: from the column's metadata with --input)")
    det.add_argument("tokens", nargs="*", metavar="TOKEN", help="tokens to reveal (or '-' to read one per line from stdin)")
    det.add_argument("--input", default=None, metavar="DIR", help="output Parquet directory (or file) whose column to detokenize")
    det.add_argument("--column", default=None, metavar="NAME", help="top-level column to detokenize (with --input)")
    det.add_argument("--out", default=None, metavar="DIR", help="where to write the detokenized copy (new directory, mode 0700)")
    det.set_defaults(func=cmd_detokenize)

    fg = vsub.add_parser("forget", help="crypto-shred a value's or a subject's vault entries (irreversible)")
    _common(fg)
    _who(fg)
    fg.add_argument("--domain", default=None, help="token domain of --value")
    g = fg.add_mutually_exclusive_group(required=True)
    g.add_argument("--value", default=None, help="the value to forget (prefer --value-stdin: arguments show up in ps)")
    g.add_argument("--value-stdin", action="store_true", help="read the value to forget from stdin")
    g.add_argument("--subject", default=None, help="subject id given to the tokenize action's 'subject' field")
    g.add_argument("--expired", action="store_true", help="every entry past its TTL (in --domain, or in all domains)")
    fg.set_defaults(func=cmd_forget)

    audit = subparsers.add_parser("audit", help="verify the hash-chained audit log")
    asub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    asub.required = True
    ver = asub.add_parser("verify", help="check that no audit entry was removed, edited or reordered")
    _common(ver)
    ver.set_defaults(func=cmd_audit_verify)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None, help="local state directory (default ./.cloakbeam or $CLOAKBEAM_STATE_DIR)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config naming state_dir, keys and vault")
    p.add_argument("--vault-dsn-env", default=None, metavar="VAR", help="use the PostgreSQL vault whose DSN is in environment variable VAR")
    p.add_argument("--log", "--audit-log", dest="audit_log", default=None, metavar="FILE", help="audit log (default STATE_DIR/audit.jsonl)")


def _who(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", required=True, help="role named in the role policy")
    p.add_argument("--purpose", required=True, help="why (recorded in the audit log and checked against the role's grants)")
    p.add_argument("--roles", default=None, metavar="FILE", help="role policy YAML (default $CLOAKBEAM_ROLES or STATE_DIR/roles.yaml)")


def audit_log_path(option: str | None, state: Path) -> Path:
    """The audit log file to use; a sentence (ConfigError) when it is not a regular file or cannot be created.

    `--log /dev/null` is refused on purpose: an audit log that discards entries would let reveals go unrecorded."""
    p = Path(option) if option else state / AUDIT_FILE
    if p.exists() and not p.is_file():
        raise ConfigError(f"audit log {p} is not a regular file; name a file the audit chain can be appended to")
    if not p.exists() and not os.access(p.parent if p.parent.exists() else p.parent.parent, os.W_OK):
        raise ConfigError(f"audit log {p} cannot be created (directory not writable)")
    return p


class _Env:
    """Keys, vault, audit log and role policy opened from the command's options."""

    def __init__(self, args: argparse.Namespace, need_vault: bool = True) -> None:
        from cloakbeam.core.config import key_ref_from, load_config_file, resolve_state_dir, vault_ref_from
        from cloakbeam.errors import KeyAccessError
        from cloakbeam.keys.service import open_key_service
        from cloakbeam.vault.audit import AuditLog, audit_key

        config = load_config_file(args.config)
        self.state = resolve_state_dir(args.state_dir, config, create=False)
        if not self.state.exists():
            raise ConfigError(f"state directory {self.state} does not exist; pass --state-dir or --config")
        try:
            self.keys = open_key_service(key_ref_from(config, self.state))
        except KeyAccessError as exc:
            raise ConfigError(str(exc)) from None
        self.audit = AuditLog(audit_log_path(args.audit_log, self.state), audit_key(self.keys))
        self.vault = None
        if need_vault:
            from cloakbeam.vault.store import open_vault

            ref = vault_ref_from(config, self.state)
            if args.vault_dsn_env:
                ref = {"backend": "postgres", "dsn_env": args.vault_dsn_env}
            self.vault = open_vault(ref, self.keys)

    def access(self, args: argparse.Namespace) -> Any:
        from cloakbeam.vault.access import VaultAccess
        from cloakbeam.vault.roles import RolePolicy

        roles_path = args.roles or os.environ.get("CLOAKBEAM_ROLES") or str(self.state / ROLES_FILE)
        if not Path(roles_path).exists():
            raise ConfigError(f"role policy {roles_path} does not exist; pass --roles FILE (see docs/token-vault.md)")
        return VaultAccess(self.vault, RolePolicy.load(roles_path), self.audit)

    def close(self) -> None:
        if self.vault is not None:
            self.vault.close()
        self.keys.close()


def cmd_detokenize(args: argparse.Namespace) -> int:
    if args.input is None and not args.tokens:
        raise ConfigError("give tokens to detokenize, '-' to read them from stdin, or --input DIR --column NAME --out DIR")
    if args.input is not None and args.tokens:
        raise ConfigError("give either tokens or --input, not both")
    if args.input is not None and (not args.column or not args.out):
        raise ConfigError("--input needs --column NAME and --out DIR")
    if args.input is None and not args.domain:
        raise ConfigError("--domain is required when detokenizing single tokens")
    env = _Env(args)
    try:
        access = env.access(args)
        if args.input is not None:
            return _detokenize_parquet(access, args)
        tokens = args.tokens
        if tokens == ["-"]:
            tokens = [line.strip() for line in sys.stdin if line.strip()]
        results = access.detokenize_detailed(args.role, args.purpose, args.domain, tokens)
        failed = 0
        for tok, (status, value) in zip(tokens, results):
            if status == "ok":
                print(value)
            else:
                failed += 1
                print("")
                print(f"cloakbeam: token {tok} did not detokenize: {status.replace('_', ' ')}", file=sys.stderr)
        return 1 if failed else 0
    finally:
        env.close()


def _detokenize_parquet(access: Any, args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    src = Path(args.input)
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files or not files[0].exists():
        raise ConfigError(f"no Parquet files under {src}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} is not empty; choose a new one (detokenized copies are never written in place)")
    col = args.column
    domain = args.domain
    schemas = [pq.read_schema(f) for f in files]
    if col not in schemas[0].names:
        raise ConfigError(f"column '{col}' is not a top-level column of {files[0]}")
    if domain is None:
        meta = schemas[0].field(col).metadata or {}
        try:
            action = json.loads(meta[b"cloakbeam.action"])
            if action.get("action") != "tokenize":
                raise KeyError
            domain = action["domain"]
        except (KeyError, ValueError):
            raise ConfigError(f"column '{col}' carries no tokenize metadata; pass --domain") from None
    # One authorization and one audit entry per file, before any value is read.
    tables = []
    totals: dict[str, int] = {}
    for f in files:
        table = pq.read_table(f)
        column = table.column(col).combine_chunks()
        enc = pc.dictionary_encode(column)
        distinct = enc.dictionary.to_pylist()
        results = access.detokenize_detailed(args.role, args.purpose, domain, distinct, label=f"column:{col}:{f.name}")
        for s, _ in results:
            totals[s] = totals.get(s, 0) + 1
        values = pa.array([v for _, v in results], type=pa.string())
        revealed = pc.take(values, enc.indices)
        i = table.schema.get_field_index(col)
        field = pa.field(col, pa.string(), nullable=True, metadata={b"cloakbeam.detokenized": domain.encode()})
        tables.append((f, table.set_column(i, field, revealed)))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f, table in tables:
        rel = f.relative_to(src) if src.is_dir() else Path(f.name)
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
    summary = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(totals.items()))
    print(f"detokenized column '{col}' (domain '{domain}') of {len(files)} file(s) into {out}; distinct tokens {summary}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    value = args.value
    if args.value_stdin:
        value = sys.stdin.readline().rstrip("\n")
    if value is not None and not args.domain:
        raise ConfigError("--domain is required with --value / --value-stdin")
    env = _Env(args)
    try:
        access = env.access(args)
        if args.expired:
            n = access.forget_expired(args.role, args.purpose, args.domain)
        elif value is not None:
            n = access.forget(args.role, args.purpose, domain=args.domain, value=value)
        else:
            n = access.forget(args.role, args.purpose, subject=args.subject)
        if n == 0:
            print("cloakbeam: nothing to forget: the vault holds no entry for it", file=sys.stderr)
            return 1
        print(f"forgot {n} vault entr{'y' if n == 1 else 'ies'}: their data keys are destroyed and their tokens can no longer be reversed")
        return 0
    finally:
        env.close()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    env = _Env(args, need_vault=False)
    try:
        try:
            n = env.audit.verify()
        except IntegrityError as exc:
            print(f"cloakbeam: audit log FAILED verification: {exc}", file=sys.stderr)
            return 1
        print(f"audit log {env.audit.path}: {n} entr{'y' if n == 1 else 'ies'}, hash chain intact")
        return 0
    finally:
        env.close()
