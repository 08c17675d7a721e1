"""`cloakbeam serve`: run the reveal service (vault/service.py) on uvicorn, with TLS when given a certificate.

    cloakbeam serve --config serve.yaml [--host 127.0.0.1] [--port 8443] [--tls-cert cert.pem --tls-key key.pem]

The config names the pipeline keyring, the reveal keyring, the vault, the grants file, the audit log and its
checkpoint sink, and the token issuer (docs/access-control.md). Plain HTTP is refused on non-loopback addresses.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the reveal service: authenticated, audited detokenize/decrypt/forget")
    p.add_argument("--config", required=True, metavar="FILE", help="service config YAML (keys, reveal_keys, vault, grants, audit, auth)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8443, help="port (default 8443)")
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="TLS certificate chain (PEM)")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="TLS private key (PEM)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from cloakbeam.vault.service import load_service_config, serve

    serve(load_service_config(args.config), host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return 0
