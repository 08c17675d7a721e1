"""The `cloakbeam` command line.

Each area owns its subcommands in its own module, which defines `register(subparsers)`; a registered command
sets `func(args) -> int`. Exit codes: 0 success, 2 usage or configuration error, 1 runtime failure. Errors are
printed as one sentence without a traceback and never contain a record value or key material.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from cloakbeam import __version__
from cloakbeam.errors import CloakbeamError, ConfigError

COMMAND_MODULES = (
    "cloakbeam.cli.run",  # run, demo, generate
    "cloakbeam.cli.classify",  # classify
    "cloakbeam.cli.keys",  # keys init|list|rotate|rewrap, decrypt, verify
    "cloakbeam.cli.vault",  # vault detokenize|forget, audit verify
    "cloakbeam.cli.serve",  # serve (the reveal service)
    "cloakbeam.cli.evaluate",  # evaluate (release evidence: risk and utility)
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 already; keep its message short
        self.print_usage(sys.stderr)
        print(f"cloakbeam: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cloakbeam",
        description="Turn raw records into classified, policy-protected training Parquet with a reconciling manifest.",
    )
    parser.add_argument("--version", action="version", version=f"cloakbeam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (never values)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        module.register(sub)
    return parser


class _DropBeamImportNoise(logging.Filter):
    """Beam logs "apitools not found" through the root logger when imported without the GCP extras."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropBeamImportNoise())
    for noisy in ("distributed", "urllib3", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    # Beam logs a worker's exception with its traceback before re-raising it to the launcher, where a
    # cloakbeam error becomes one sentence; keep that traceback for --verbose.
    logging.getLogger("apache_beam").setLevel(logging.WARNING if verbose else logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a bare `--` is passed through to Beam untouched.
    beam_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, beam_args = argv[:i], argv[i + 1 :]
    # Logging first: command modules import Beam, which logs at import time.
    configure_logging("-v" in argv or "--verbose" in argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.beam_args = beam_args
    verbose = bool(getattr(args, "verbose", False))
    if not verbose:
        # Runner threads (Beam's worker handlers) report their own failures with a traceback through
        # threading.excepthook; the launcher turns the failure into one sentence, so keep those for --verbose.
        import threading

        threading.excepthook = lambda hook_args: None
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"cloakbeam: configuration error: {exc}", file=sys.stderr)
        return 2
    except CloakbeamError as exc:
        print(f"cloakbeam: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cloakbeam: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A file or device the command could not use (full disk, read-only path, missing directory): its path and
        # the system's reason, never data. The traceback only with --verbose.
        if verbose:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"cloakbeam: error: cannot use{where}: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Not one of ours: its message may quote data, so only its class is printed.
        if verbose:
            raise
        print(f"cloakbeam: error: unexpected {type(exc).__name__}; rerun with --verbose for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
