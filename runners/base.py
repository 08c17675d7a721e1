"""What every runner profile shares: the handle `make_runner` returns and the pipeline-shape checks.

A profile turns `cloakbeam run --runner NAME` plus pass-through Beam arguments into a Beam runner object and
`PipelineOptions`, and owns whatever must live around one run (a local Dask cluster, a client to close). It never
falls back to another runner: a runner that cannot be built or reached raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cloakbeam.errors import ConfigError

LOCAL_RUNNERS = ("direct", "dask")
REMOTE_RUNNERS = ("flink", "dataflow")
# cloakbeam-level options of the streaming graph (pipeline/streaming.py), valid on every streaming-capable runner.
STREAMING_OPTIONS = ("streaming", "watch_seconds", "poll_seconds", "window_seconds", "allowed_lateness")


class RunnerHandle:
    """A Beam runner plus the context one run needs. `graph.run_pipeline` uses `.beam_runner` and `.session()`."""

    name = "base"

    def __init__(self, beam_runner: Any, options: Any) -> None:
        self.beam_runner = beam_runner
        self.options = options

    @contextlib.contextmanager
    def session(self) -> Iterator[RunnerHandle]:
        yield self


def option_dict(options: Any) -> dict[str, Any]:
    """The explicitly set pipeline options (defaults dropped), for checks and tests."""
    return options.get_all_options(drop_default=True, retain_unknown_options=True)


def reject_unknown(name: str, runner_options: Mapping[str, Any] | None, allowed: Sequence[str]) -> dict[str, Any]:
    """cloakbeam-level runner options (from CLI flags) the profile does not understand are an error, not ignored."""
    opts = dict(runner_options or {})
    extra = sorted(k for k, v in opts.items() if v is not None and k not in allowed and k not in STREAMING_OPTIONS)
    if extra:
        flag = "--" + extra[0].replace("_", "-")
        raise ConfigError(f"{flag} does not apply to --runner {name}; remove it or pick a runner that uses it")
    return opts


def check_remote_state(name: str, runtime: Any) -> None:
    """Refuse a remote runner whose workers would need this machine's files: a SQLite vault or a local keyring.

    Remote workers run on other machines; they can reach a PostgreSQL vault (DSN from an environment variable
    set on the workers) and a KMS provider, never a file under the launcher's state directory.
    """
    vault = dict(getattr(runtime, "vault", {}) or {})
    keys = getattr(runtime, "keys", None)
    if str(vault.get("backend", "sqlite")) == "sqlite":
        raise ConfigError(
            f"--runner {name} runs workers on other machines, which cannot open the local SQLite vault "
            f"{vault.get('path', '(state dir)')}; configure a PostgreSQL vault in --config "
            "(vault: {backend: postgres, dsn_env: CLOAKBEAM_VAULT_DSN}) and set that variable on the workers"
        )
    if keys is not None and getattr(keys, "provider", "local") == "local":
        raise ConfigError(
            f"--runner {name} runs workers on other machines, which cannot read the local keyring "
            f"{getattr(keys, 'path', None) or '(state dir)'}; configure a KMS key provider in --config "
            "(keys: {provider: aws-kms|gcp-kms|vault-transit, ...})"
        )


def no_fallback(name: str, exc: BaseException) -> ConfigError:
    return ConfigError(f"runner '{name}' is not available here ({type(exc).__name__}); cloakbeam never falls back to another runner")
