"""`cloakbeam keys init|init-reveal|set-reveal-key|list|rotate|retire|rewrap|public-key`, `cloakbeam decrypt` and
`cloakbeam verify`.

Two keyrings, two holders (docs/access-control.md): the pipeline keyring (`keys init --reveal-key ...`: PRF root,
signing key, the reveal PUBLIC key it seals to) and the reveal keyring (`keys init-reveal`, held by the reveal
service alone). `decrypt` is a client of the reveal service and verifies the output against a pinned signing key
first; `verify` needs a pinned key. Exit codes: 0 success, 2 usage/configuration error, 1 runtime failure (refused,
tampered cell, failed verification). Output never contains key material or cell contents.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cloakbeam.cli.reveal_client import add_reveal_options, open_reveal
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
    p.add_argument("--reveal-key", default=None, metavar="KEY|FILE",
                   help="the reveal service's public key(s) the pipeline seals to: its reveal keyring file, or [name:]base64 (required unless --protect dev)")
    p.set_defaults(func=cmd_init)

    p = ksub.add_parser("init-reveal", help="create the reveal service's keyring (reveal key pair, audit MAC key, checkpoint key)")
    _common(p)
    p.add_argument("--protect", choices=("passphrase", "env-key", "dev"), default="passphrase", help="how the reveal keyring is protected")
    p.add_argument("--env", default=None, metavar="VAR", help="environment variable holding the passphrase or raw key")
    p.add_argument("--scrypt-n", type=int, default=None, help=argparse.SUPPRESS)  # tests only
    p.add_argument("--name", action="append", default=None, help="reveal key name(s) (default 'default'; e.g. one per sensitivity)")
    p.set_defaults(func=cmd_init_reveal)

    p = ksub.add_parser("set-reveal-key", help="record (or replace) a reveal public key in the pipeline keyring")
    _common(p)
    p.add_argument("key", metavar="KEY|FILE", help="reveal keyring file (its public keys only are read) or [name:]base64")
    p.set_defaults(func=cmd_set_reveal_key)

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

    p = ksub.add_parser("rewrap", help="re-wrap every data key recorded in an output under the newest KEK / reveal key version")
    _common(p)
    p.add_argument("output", metavar="DIR", help="output directory of a run")
    p.add_argument("--reveal-keyring", default=None, metavar="FILE", help="the reveal keyring (needed to reseal sealed data keys; reveal service host)")
    p.set_defaults(func=cmd_rewrap)

    p = ksub.add_parser("public-key", help="print the manifest signing public key (base64) to pin with 'verify --public-key'")
    _common(p)
    p.set_defaults(func=cmd_public_key)

    d = subparsers.add_parser("decrypt", help="decrypt encrypted columns of an output through the reveal service (verified first, audited)")
    add_reveal_options(d)
    d.add_argument("input", metavar="PATH", help="output directory (or one Parquet file inside one)")
    d.add_argument("--out", required=True, metavar="DIR", help="new directory for the decrypted copy (mode 0700)")
    d.add_argument("--columns", default=None, help="comma-separated encrypted column paths (default: all)")
    d.add_argument("--quarantine", action="store_true", help="open the sealed quarantine records instead (grant domain 'quarantine')")
    d.add_argument("--public-key", default=None, metavar="KEY|FILE", help="pinned manifest signing key (base64, PEM or keyring file; or config signing_public_key)")
    d.set_defaults(func=cmd_decrypt)

    v = subparsers.add_parser("verify", help="check an output's manifest signature (pinned key), file hashes and row counts")
    v.add_argument("output", metavar="DIR")
    v.add_argument("--public-key", default=None, metavar="KEY|FILE",
                   help="the expected signing key (base64, PEM file or pipeline keyring file); required, or 'signing_public_key' in --config")
    v.add_argument("--config", default=None, metavar="FILE", help="YAML config naming signing_public_key")
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
    from cloakbeam.keys.sealing import init_reveal_keyring, read_reveal_public_keys
    from cloakbeam.keys.service import dev_reveal_keyring_path

    if args.reveal_key:
        reveal = read_reveal_public_keys(args.reveal_key)
    elif args.protect == "dev" and ref.provider == "local":
        dev_reveal = dev_reveal_keyring_path(ref.path)
        if not dev_reveal.exists():
            init_reveal_keyring(dev_reveal, protection="dev")
        reveal = read_reveal_public_keys(str(dev_reveal))
        print(f"cloakbeam: WARNING: also created a development reveal keyring {dev_reveal} beside it; in production it lives only on the reveal service", file=sys.stderr)
    else:
        raise ConfigError("a pipeline keyring seals to the reveal service's public key: pass --reveal-key REVEAL_KEYRING_OR_BASE64 "
                          "(from 'cloakbeam keys init-reveal' on the reveal service)")
    try:
        from cloakbeam.keys.keyring import DEFAULT_SCRYPT_N

        init_keyring(ref.path, provider=ref.provider, protection=args.protect, env=args.env, scrypt_n=args.scrypt_n or DEFAULT_SCRYPT_N,
                     params=params, reveal_public_keys=reveal)
    except KeyAccessError as exc:  # missing passphrase/token, unreachable KMS: nothing was written
        raise ConfigError(str(exc)) from None
    if args.protect == "dev" and ref.provider == "local":
        print("cloakbeam: WARNING: created an UNPROTECTED development keyring; never use it for real data", file=sys.stderr)
    print(f"created keyring {ref.path} (provider {ref.provider}, KEK 'default' version 1, signing key under KEK 'signing'; seals to reveal key(s) {', '.join(sorted(reveal))})")
    return 0


def cmd_init_reveal(args: argparse.Namespace) -> int:
    from cloakbeam.keys.sealing import init_reveal_keyring, read_reveal_public_keys

    ref, state = _ref(args, create_state=True)
    path = args.keyring or str(state / "reveal-keyring.json")
    try:
        from cloakbeam.keys.keyring import DEFAULT_SCRYPT_N

        init_reveal_keyring(path, provider=ref.provider, protection=args.protect, env=args.env, scrypt_n=args.scrypt_n or DEFAULT_SCRYPT_N,
                            params=dict(ref.params), names=tuple(args.name or ["default"]))
    except KeyAccessError as exc:
        raise ConfigError(str(exc)) from None
    print(f"created reveal keyring {path}: keep it on the reveal service only")
    for name, v in sorted(read_reveal_public_keys(path).items()):
        print(f"reveal public key {name} v{v['version']}: {v['public_key']}")
    return 0


def cmd_set_reveal_key(args: argparse.Namespace) -> int:
    from cloakbeam.keys.sealing import read_reveal_public_keys
    from cloakbeam.keys.service import set_reveal_public_keys

    ref, _ = _ref(args)
    keys = read_reveal_public_keys(args.key)
    try:
        set_reveal_public_keys(ref, keys)
    except KeyAccessError as exc:
        raise ConfigError(str(exc)) from None
    names = ", ".join(f"{n} v{v['version']}" for n, v in sorted(keys.items()))
    print(f"keyring {ref.path} now seals to reveal key(s) {names}")
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
    if args.reveal_keyring:
        from cloakbeam.core.config import KeyRef
        from cloakbeam.keys.sealing import open_reveal_keys

        try:
            ks.attach_reveal(open_reveal_keys(KeyRef(path=str(Path(args.reveal_keyring).resolve()))))
        except KeyAccessError as exc:
            raise ConfigError(str(exc)) from None
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


def pinned_public_key(args: argparse.Namespace) -> bytes:
    """The manifest signing key the caller pins (--public-key or config signing_public_key); exit 2 without one."""
    from cloakbeam.core.config import load_config_file
    from cloakbeam.keys.signing import load_public_key

    spec = args.public_key or load_config_file(getattr(args, "config", None)).get("signing_public_key")
    if not spec:
        raise ConfigError(
            "no pinned signing key: pass --public-key KEY|FILE (the pipeline's 'cloakbeam keys public-key') or set signing_public_key "
            "in --config; a signature checked against the key inside the signature file proves nothing"
        )
    try:
        return load_public_key(str(spec))
    except Exception:
        raise ConfigError("--public-key must be a base64 Ed25519 public key, a PEM file or a keyring file") from None


def cmd_decrypt(args: argparse.Namespace) -> int:
    from cloakbeam.keys.signing import verify_output

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {out} is not empty; decrypted copies are never written in place or over files")
    src = Path(args.input)
    if not src.exists():
        raise ConfigError(f"{src} does not exist")
    base = src if src.is_dir() else src.parent.parent if src.parent.name == "data" else src.parent
    pinned = pinned_public_key(args)
    problems = verify_output(base, pinned)
    if problems:
        for p in problems:
            print(f"cloakbeam: verify: {p}", file=sys.stderr)
        raise IntegrityError(f"{base} failed verification against the pinned signing key ({len(problems)} problem(s)); nothing was decrypted")
    reveal = open_reveal(args)
    try:
        if args.quarantine:
            return _decrypt_quarantine(args, base, out, reveal)
        return _decrypt_files(args, src, base, out, reveal)
    finally:
        reveal.close()


def _decrypt_files(args: argparse.Namespace, src: Path, base: Path, out: Path, reveal: Any) -> int:
    from cloakbeam.cli.vault import write_private_parquet
    from cloakbeam.vault.client import iter_output_files
    from cloakbeam.vault.reveal import manifest_records

    cols = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    records = manifest_records(str(base))
    decrypted = []
    unreadable: dict[str, int] = {}
    for f, rel in iter_output_files(src if src.is_file() else base / "data" if (base / "data").is_dir() else base):
        table, gone = reveal.decrypt_file(str(f), args.purpose, cols, records)
        for c, n in gone.items():
            unreadable[c] = unreadable.get(c, 0) + n
        decrypted.append((rel, table))
    if not decrypted:
        raise ConfigError(f"no Parquet files under {src}")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for rel, table in decrypted:
        write_private_parquet(table, out / rel)
    note = "; " + ", ".join(f"{n} cell(s) of '{c}' are unreadable (forgotten subjects)" for c, n in sorted(unreadable.items()) if n) if any(unreadable.values()) else ""
    print(f"decrypted {len(decrypted)} file(s) into {out}{note}")
    return 0


def _decrypt_quarantine(args: argparse.Namespace, base: Path, out: Path, reveal: Any) -> int:
    import json

    qdir = base / "quarantine"
    try:
        dataset = json.loads((base / "manifest.json").read_text())["policy"]["dataset"]
    except Exception:
        raise ConfigError(f"cannot read the dataset id from {base / 'manifest.json'}; point at an output directory") from None
    entries = []
    for f in sorted(qdir.rglob("*.jsonl")) if qdir.is_dir() else []:
        entries.extend(reveal.open_quarantine(str(f), dataset, args.purpose))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(out / "quarantine.jsonl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        for entry in entries:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    print(f"opened {len(entries)} quarantine record(s) into {out / 'quarantine.jsonl'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from cloakbeam.keys.signing import fingerprint, verify_output

    if not Path(args.output).is_dir():
        raise ConfigError(f"{args.output} is not a directory")
    pinned = pinned_public_key(args)
    problems = verify_output(args.output, pinned)
    if problems:
        for p in problems:
            print(f"cloakbeam: verify: {p}", file=sys.stderr)
        raise IntegrityError(f"{args.output} failed verification ({len(problems)} problem(s))")
    print(f"{args.output}: manifest signature (pinned key {fingerprint(pinned)}), file hashes and row counts verified")
    return 0
