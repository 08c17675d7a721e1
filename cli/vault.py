"""`cloakbeam vault detokenize|forget` and `cloakbeam audit verify`: clients of the reveal service.

    cloakbeam vault detokenize --server URL --purpose P --domain email TOKEN [TOKEN ...]     (token: $CLOAKBEAM_TOKEN)
    cloakbeam vault detokenize --server URL --purpose P --input OUT/data --column email --out REVEALED/
    cloakbeam vault forget --server URL --purpose P --subject ID   (or --domain D --value-stdin, --expired)
    cloakbeam audit verify --server URL --purpose P        (or --service-config serve.yaml on the service host)
    ... --dev --role R                                     local development: the same logic in this process

Who you are and what you may do come from your verified token and the service's grants; there is no flag for a
role, a grant file or an audit log. Exit codes: 0 ok, 1 refused / integrity failure / a token that did not
detokenize, 2 usage or configuration error. Values are printed only by `detokenize`, to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cloakbeam.cli.reveal_client import add_reveal_options, open_reveal
from cloakbeam.errors import ConfigError


def register(subparsers: Any) -> None:
    vault = subparsers.add_parser("vault", help="detokenize values or forget a subject through the reveal service")
    vsub = vault.add_subparsers(dest="vault_command", metavar="SUBCOMMAND")
    vsub.required = True

    det = vsub.add_parser("detokenize", help="reveal tokens (single values or a whole output column)")
    add_reveal_options(det)
    det.add_argument("--domain", default=None, help="token domain (default: from the column's metadata with --input)")
    det.add_argument("tokens", nargs="*", metavar="TOKEN", help="tokens to reveal (or '-' to read one per line from stdin)")
    det.add_argument("--input", default=None, metavar="DIR", help="output Parquet directory (or file) whose column to detokenize")
    det.add_argument("--column", default=None, metavar="NAME", help="top-level column to detokenize (with --input)")
    det.add_argument("--out", default=None, metavar="DIR", help="where to write the detokenized copy (new directory, mode 0700)")
    det.set_defaults(func=cmd_detokenize)

    fg = vsub.add_parser("forget", help="crypto-shred a subject's or a value's vault entries and keys (irreversible)")
    add_reveal_options(fg)
    fg.add_argument("--domain", default=None, help="token domain of --value")
    g = fg.add_mutually_exclusive_group(required=True)
    g.add_argument("--value", default=None, help="the value to forget (prefer --value-stdin: arguments show up in ps)")
    g.add_argument("--value-stdin", action="store_true", help="read the value to forget from stdin")
    g.add_argument("--subject", default=None, help="subject id named by the policy's 'subject' field")
    g.add_argument("--expired", action="store_true", help="every entry past its TTL (in --domain, or in all domains)")
    fg.set_defaults(func=cmd_forget)

    audit = subparsers.add_parser("audit", help="verify the reveal service's audit trail")
    asub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    asub.required = True
    ver = asub.add_parser("verify", help="check that no audit entry or checkpoint was removed, edited or reordered")
    add_reveal_options(ver, purpose_required=False)
    ver.add_argument("--service-config", default=None, metavar="FILE", help="on the service host: verify with the service's own keys and config")
    ver.set_defaults(func=cmd_audit_verify)


def cmd_detokenize(args: argparse.Namespace) -> int:
    if args.input is None and not args.tokens:
        raise ConfigError("give tokens to detokenize, '-' to read them from stdin, or --input DIR --column NAME --out DIR")
    if args.input is not None and args.tokens:
        raise ConfigError("give either tokens or --input, not both")
    if args.input is not None and (not args.column or not args.out):
        raise ConfigError("--input needs --column NAME and --out DIR")
    if args.input is None and not args.domain:
        raise ConfigError("--domain is required when detokenizing single tokens")
    reveal = open_reveal(args)
    try:
        if args.input is not None:
            return _detokenize_parquet(reveal, args)
        tokens = args.tokens
        if tokens == ["-"]:
            tokens = [line.strip() for line in sys.stdin if line.strip()]
        results = reveal.detokenize(args.domain, tokens, args.purpose)
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
        reveal.close()


def _detokenize_parquet(reveal: Any, args: argparse.Namespace) -> int:
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
    # One request (one authorization, one audit entry) per file, before anything is written.
    tables = []
    totals: dict[str, int] = {}
    for f in files:
        table = pq.read_table(f)
        enc = pc.dictionary_encode(table.column(col).combine_chunks())
        distinct = enc.dictionary.to_pylist()
        results = reveal.detokenize(domain, distinct, args.purpose, label=f"column:{col}:{f.name}") if distinct else []
        for s, _ in results:
            totals[s] = totals.get(s, 0) + 1
        revealed = pc.take(pa.array([v for _, v in results], type=pa.string()), enc.indices)
        i = table.schema.get_field_index(col)
        field = pa.field(col, pa.string(), nullable=True, metadata={b"cloakbeam.detokenized": domain.encode()})
        tables.append((f, table.set_column(i, field, revealed)))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f, table in tables:
        rel = f.relative_to(src) if src.is_dir() else Path(f.name)
        write_private_parquet(table, out / rel)
    summary = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(totals.items()))
    print(f"detokenized column '{col}' (domain '{domain}') of {len(files)} file(s) into {out}; distinct tokens {summary}")
    return 0


def write_private_parquet(table: Any, dest: Path) -> None:
    """A revealed copy, owner-only (directories 0700, file 0600)."""
    import pyarrow.parquet as pq

    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")


def cmd_forget(args: argparse.Namespace) -> int:
    value = args.value
    if args.value_stdin:
        value = sys.stdin.readline().rstrip("\n")
    if value is not None and not args.domain:
        raise ConfigError("--domain is required with --value / --value-stdin")
    reveal = open_reveal(args)
    try:
        if args.expired:
            n = reveal.forget(args.purpose, expired=True, domain=args.domain)
        elif value is not None:
            n = reveal.forget(args.purpose, domain=args.domain, value=value)
        else:
            n = reveal.forget(args.purpose, subject=args.subject)
    finally:
        reveal.close()
    if n == 0:
        print("cloakbeam: nothing to forget: the vault holds no entry or key for it", file=sys.stderr)
        return 1
    print(f"forgot {n} vault entr{'y' if n == 1 else 'ies'} and keys: they are destroyed and can no longer be reversed or decrypted")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    if args.service_config:
        from cloakbeam.errors import IntegrityError
        from cloakbeam.vault.service import load_service_config, open_core

        core = open_core(load_service_config(args.service_config))
        try:
            try:
                result = {"ok": True, **core.audit.verify()}
            except IntegrityError as exc:
                result = {"ok": False, "problem": str(exc)}
            where = str(core.audit.log.path)
        finally:
            core.close()
    else:
        reveal = open_reveal(args)
        try:
            result = reveal.audit_verify(args.purpose)
        finally:
            reveal.close()
        where = args.server or "the local dev state"
    if not result.get("ok"):
        print(f"cloakbeam: audit trail FAILED verification: {result.get('problem')}", file=sys.stderr)
        return 1
    n = int(result.get("entries", 0))
    print(f"audit trail of {where}: {n} entr{'y' if n == 1 else 'ies'}, hash chain intact, {result.get('checkpoints', 0)} signed checkpoint(s) agree")
    return 0
