"""Options shared by the commands that ask the reveal service for something (`vault detokenize|forget`, `decrypt`,
`audit verify`): `--server URL` plus a bearer token from `--token-file` or $CLOAKBEAM_TOKEN (the token itself),
or the explicit `--dev` in-process mode. No option or environment variable names a role, a grant file or an audit
log: those belong to the service.
"""

from __future__ import annotations

import argparse
from typing import Any

from cloakbeam.errors import ConfigError


def add_reveal_options(p: argparse.ArgumentParser, purpose_required: bool = True) -> None:
    p.add_argument("--server", default=None, metavar="URL", help="reveal service URL (https://...; or config 'reveal: {server: URL}')")
    p.add_argument("--token-file", default=None, metavar="FILE", help="file holding your bearer token (default: $CLOAKBEAM_TOKEN holds the token)")
    p.add_argument("--ca-file", default=None, metavar="FILE", help="CA bundle that signed the service's TLS certificate")
    p.add_argument("--purpose", required=purpose_required, default=None, help="why: must be one of the purposes your token grants (audited)")
    p.add_argument("--dev", action="store_true", help="development only: run the reveal logic in this process on the local dev state (no server)")
    p.add_argument("--role", default=None, help="with --dev only: the role to act in (self-asserted, so development only)")
    p.add_argument("--state-dir", default=None, help="with --dev: local state directory (default ./.cloakbeam or $CLOAKBEAM_STATE_DIR)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config (state_dir, keys, vault, reveal: {server, ca_file}, signing_public_key)")
    p.add_argument("--vault-dsn-env", default=None, metavar="VAR", help="with --dev: PostgreSQL vault whose DSN is in environment variable VAR")


def open_reveal(args: argparse.Namespace) -> Any:
    """A RevealClient (server) or, with --dev, an InProcessReveal on the local development state."""
    from cloakbeam.core.config import load_config_file

    config = load_config_file(getattr(args, "config", None))
    if args.dev:
        if args.server:
            raise ConfigError("--dev runs without a server; drop --server or --dev")
        if not args.role:
            raise ConfigError("--dev needs --role (in --dev mode the role is self-asserted; a server takes it from your token)")
        return _dev(args, config)
    if args.role:
        raise ConfigError("--role is not accepted: the reveal service takes your roles from your verified token (use --dev for local development)")
    reveal_cfg = dict(config.get("reveal") or {})
    url = args.server or reveal_cfg.get("server")
    if not url:
        raise ConfigError("no reveal service: pass --server URL (or 'reveal: {server: URL}' in --config), or --dev for local development")
    from cloakbeam.vault.client import RevealClient, read_token

    return RevealClient(url, read_token(args.token_file), ca_file=args.ca_file or reveal_cfg.get("ca_file"))


def _dev(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from cloakbeam.core.config import key_ref_from, resolve_state_dir, vault_ref_from
    from cloakbeam.vault.client import InProcessReveal
    from cloakbeam.vault.service import dev_identity, open_dev_core

    state = resolve_state_dir(args.state_dir, config, create=False)
    if not state.exists():
        raise ConfigError(f"state directory {state} does not exist; pass --state-dir or --config")
    vault = vault_ref_from(config, state)
    if args.vault_dsn_env:
        vault = {"backend": "postgres", "dsn_env": args.vault_dsn_env}
    core = open_dev_core(state, key_ref_from(config, state), vault)
    return InProcessReveal(core, dev_identity(args.role, args.purpose or ""))
