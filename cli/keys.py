"""`cloakbeam keys init|list|rotate|retire|rewrap|public-key`, `cloakbeam decrypt` and `cloakbeam verify`.

Exit codes: 0 success, 2 usage/configuration error, 1 runtime failure (wrong key, tampered cell, failed
verification). Output never contains key material or cell contents.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cloakbeam.cli.vault import ROLES_FILE  # one place names the files both CLIs use
from cloakbeam.errors import ConfigError, IntegrityError, KeyAccessError


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="manage the keyring: init, list, rotate, retire, rewrap, public-key")
    ksub = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND")
    ksub.required = True

    p = ksub.add_parser("init", help="create a keyring (KEK version 1, PRF root, manifest signing key)")
    _common(p)
    p.add_argument("--protect", choices=("passphrase", "env-key", "dev"), default="passphrase",
                   help="how the local keyring's KEKs are protected (default passphrase from $CLOAKBEAM_KEYRING_PASSPHRASE)")
    p.add_argument("--env", default=None, metavar="VAR", help="environment variable holding the passphrase or raw key")
    p.add_argument("--scrypt-n", type=int, default=None, help=argparse.SUPPRESS)  # tests only; default keys.keyring.DEFAULT_SCRYPT_N
    p.set_defaults(func=cmd_init)

    p = ksub.add_parser("list", help="list KEK versions and their state (no key material)")
    _common(p)
    p.set_defaults(func=cmd_list)

    p = ksub.add_parser("rotate", help="add a new KEK version; new data keys are wrapped under it")
    _common(p)
    p.add_argument("--name", default="default", help="KEK name (default 'default'; a new name creates that KEK)")
    p.set_defaults(func=cmd_rotate)

    p = ksub.add_parser("retire", help="destroy an old KEK version: it can never unwrap again (rewrap outputs first)")
    _common(p)
    p.add_argument("version", help="the version to retire")
    p.add_argument("--name", default="default", help="KEK name")
    p.set_defaults(func=cmd_retire)

    p = ksub.add_parser("rewrap", help="re-wrap every data key recorded in an output under the newest KEK version")
    _common(p)
    p.add_argument("output", metavar="DIR", help="output directory of a run")
    p.set_defaults(func=cmd_rewrap)

    p = ksub.add_parser("public-key", help="print the manifest signing public key (base64) to pin with 'verify --public-key'")
    _common(p)
    p.set_defaults(func=cmd_public_key)

    d = subparsers.add_parser("decrypt", help="decrypt encrypted columns of an output into a new directory (role-checked, audited)")
    _common(d)
    d.add_argument("input", metavar="PATH", help="output directory or one Parquet file")
    d.add_argument("--out", required=True, metavar="DIR", help="new directory for the decrypted copy (mode 0700)")
    d.add_argument("--columns", default=None, help="comma-separated encrypted column paths (default: all)")
    d.add_argument("--quarantine", action="store_true", help="open the sealed quarantine records instead (role domain 'quarantine')")
    d.add_argument("--role", required=True, help="role named in the role policy")
    d.add_argument("--purpose", required=True, help="why (checked against the role's grants and audited)")
    d.add_argument("--roles", default=None, metavar="FILE", help="role policy YAML (default $CLOAKBEAM_ROLES or STATE_DIR/roles.yaml)")
    d.add_argument("--log", "--audit-log", dest="audit_log", default=None, metavar="FILE", help="audit log (default STATE_DIR/audit.jsonl)")
    d.set_defaults(func=cmd_decrypt)

    v = subparsers.add_parser("verify", help="check an output's manifest signature, file hashes and row counts")
    v.add_argument("output", metavar="DIR")
    v.add_argument("--public-key", default=None, metavar="KEY|FILE",
                   help="expected signing key (base64, PEM file or keyring file); default: the keyring in the state dir if present")
    v.add_argument("--state-dir", default=None, help="local state directory (default ./.cloakbeam or $CLOAKBEAM_STATE_DIR)")
    v.add_argument("--config", default=None, metavar="FILE", help="YAML config naming state_dir and keys")
    v.set_defaults(func=cmd_verify)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None, help="local state directory (default ./.cloakbeam or $CLOAKBEAM_STATE_DIR)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config naming state_dir and keys (provider, path, ...)")
    p.add_argument("--keyring", default=None, metavar="FILE", help="keyring file (default STATE_DIR/keyring.json)")


def _ref(args: argparse.Namespace, create_state: bool = False):
    from dataclasses import replace

    from cloakbeam.core.config import key_ref_from, load_config_file, resolve_state_dir

    config = load_config_file(getattr(args, "config", None))
    state = resolve_state_dir(getattr(args, "state_dir", None), config, create=create_state, quiet=True)
    ref = key_ref_from(config, state)
    if getattr(args, "keyring", None):
        ref = replace(ref, path=str(Path(args.keyring).resolve()))
    return ref, state


def _open(args: argparse.Namespace):
    from cloakbeam.keys.service import open_key_service

    ref, state = _ref(args)
    try:
        return open_key_service(ref), state
    except KeyAccessError as exc:
        raise ConfigError(str(exc)) from None


def cmd_init(args: argparse.Namespace) -> int:
    from cloakbeam.keys.service import init_keyring

    ref, _ = _ref(args, create_state=True)
    if not ref.path:
        raise ConfigError("no keyring path; pass --keyring FILE or configure keys.path")
    params = dict(ref.params)
    try:
        from cloakbeam.keys.keyring import DEFAULT_SCRYPT_N

        init_keyring(ref.path, provider=ref.provider, protection=args.protect, env=args.env, scrypt_n=args.scrypt_n or DEFAULT_SCRYPT_N, params=params)
    except KeyAccessError as exc:  # missing passphrase/token, unreachable KMS: nothing was written
        raise ConfigError(str(exc)) from None
    if args.protect == "dev" and ref.provider == "local":
        print("cloakbeam: WARNING: created an UNPROTECTED development keyring; never use it for real data", file=sys.stderr)
    print(f"created keyring {ref.path} (provider {ref.provider}, KEK 'default' version 1)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    ks, _ = _open(args)
    try:
        for k in ks.list_keys():
            extra = f" retired {k['retired']}" if k.get("retired") else ""
            print(f"{k['name']}\tv{k['version']}\t{k['state']}\tcreated {k.get('created')}{extra}")
    finally:
        ks.close()
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    ks, _ = _open(args)
    try:
        v = ks.rotate(args.name)
    finally:
        ks.close()
    print(f"KEK '{args.name}' now at version {v}; run 'cloakbeam keys rewrap DIR' for existing outputs before retiring older versions")
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    ks, _ = _open(args)
    try:
        ks.retire(args.name, args.version)
    finally:
        ks.close()
    print(f"KEK '{args.name}' version {args.version} retired; data keys still wrapped under it can no longer be unwrapped")
    return 0


def cmd_rewrap(args: argparse.Namespace) -> int:
    from cloakbeam.keys.decrypt import rewrap_output

    ks, _ = _open(args)
    try:
        r = rewrap_output(args.output, ks)
    finally:
        ks.close()
    note = f"; {r['skipped']} Parquet-encrypted file(s) keep their old footer (the manifest has the new records)" if r.get("skipped") else ""
    print(f"rewrapped {r['rewrapped']} of {r['keys']} data keys; rewrote the key metadata of {r['files']} file(s); manifest re-signed{note}")
    return 0


def cmd_public_key(args: argparse.Namespace) -> int:
    ks, _ = _open(args)
    try:
        import base64

        from cloakbeam.keys.signing import public_key_bytes

        print(base64.b64encode(public_key_bytes(ks.signing_public_key())).decode())
    finally:
        ks.close()
    return 0


def _roles(args: argparse.Namespace, state: Path):
    from cloakbeam.vault.roles import RolePolicy

    path = args.roles or os.environ.get("CLOAKBEAM_ROLES") or str(state / ROLES_FILE)
    if not Path(path).exists():
        raise ConfigError(f"role policy {path} does not exist; pass --roles FILE (see docs/keys-and-encryption.md)")
    return RolePolicy.load(path)


def cmd_decrypt(args: argparse.Namespace) -> int:
    from cloakbeam.keys.decrypt import write_private_table
    from cloakbeam.vault.reveal import decrypt_output

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} is not empty; decrypted copies are never written in place or over files")
    src = Path(args.input)
    if not src.exists():
        raise ConfigError(f"{src} does not exist")
    ks, state = _open(args)
    try:
        roles = _roles(args, state)
        audit = _audit(args, state, ks)
        if args.quarantine:
            return _decrypt_quarantine(args, src, out, ks, roles, audit)
        cols = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
        n = 0
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        for rel, table in decrypt_output(src, ks, role=args.role, purpose=args.purpose, roles=roles, columns=cols, audit=audit):
            write_private_table(table, out / rel)
            n += 1
    finally:
        ks.close()
    print(f"decrypted {n} file(s) into {out}")
    return 0


def _decrypt_quarantine(args: argparse.Namespace, src: Path, out: Path, ks: Any, roles: Any, audit: Any) -> int:
    import base64
    import json

    from cloakbeam.keys.quarantine import read_quarantine

    qdir = src / "quarantine" if (src / "quarantine").is_dir() else src
    try:
        dataset = json.loads((src / "manifest.json").read_text())["policy"]["dataset"]
    except Exception:
        raise ConfigError(f"cannot read the dataset id from {src / 'manifest.json'}; point at an output directory") from None
    # Authorize and open everything before creating any file (quarantines are small).
    items = list(read_quarantine(qdir, ks, dataset_id=dataset, role=args.role, purpose=args.purpose, roles=roles, audit=audit))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(out / "quarantine.jsonl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        for entry, raw in items:
            entry["record_base64"] = base64.b64encode(raw).decode("ascii")
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    print(f"opened {len(items)} quarantine record(s) into {out / 'quarantine.jsonl'}")
    return 0


def _audit(args: argparse.Namespace, state: Path, ks: Any):
    try:
        from cloakbeam.vault.audit import AuditLog, audit_key
    except ImportError:  # pragma: no cover - the vault layer ships the audit log
        return None
    from cloakbeam.cli.vault import audit_log_path

    return AuditLog(audit_log_path(args.audit_log, state), audit_key(ks))


def cmd_verify(args: argparse.Namespace) -> int:
    from cloakbeam.keys.signing import load_public_key, verify_output

    pinned = None
    note = ""
    if args.public_key:
        try:
            pinned = load_public_key(args.public_key)
        except Exception:
            raise ConfigError("--public-key must be a base64 Ed25519 public key, a PEM file or a keyring file") from None
    else:
        ref, _ = _ref(args)
        if ref.path and Path(ref.path).is_file():
            try:
                pinned = load_public_key(ref.path)
                note = f" (signer pinned to keyring {ref.path})"
            except Exception:
                pinned = None
        if pinned is None:
            note = " (signature checked against the key in the signature file; pin the signer with --public-key)"
    if not Path(args.output).is_dir():
        raise ConfigError(f"{args.output} is not a directory")
    problems = verify_output(args.output, pinned)
    if problems:
        for p in problems:
            print(f"cloakbeam: verify: {p}", file=sys.stderr)
        raise IntegrityError(f"{args.output} failed verification ({len(problems)} problem(s))")
    print(f"{args.output}: manifest signature, file hashes and row counts verified{note}")
    return 0
