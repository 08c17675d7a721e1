"""Run-time configuration: where local state lives and how workers reach keys and the vault.

`RuntimeConfig` is picklable and holds references only (paths, provider names, environment variable names),
never key material or passwords. Local state (dev keyring, SQLite vault, audit log) defaults to `.cloakbeam/`
in the current directory, created on first use with a one-line notice; `--state-dir`, the environment variable
CLOAKBEAM_STATE_DIR or a config file (`--config`, YAML) override it. Production configs name a KMS and a
PostgreSQL DSN instead.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cloakbeam.errors import ConfigError

DEFAULT_STATE_DIR = ".cloakbeam"


@dataclass(frozen=True)
class KeyRef:
    """Where keys live, without any key material: safe to pickle into a DoFn and to write in a manifest.

    params (all optional, non-secret): dek_ttl_seconds, dek_max_uses, and provider settings (key_id, endpoint,
    region, mount, ...). Secrets such as KMS credentials come from the provider's usual environment.
    """

    provider: str = "local"
    path: str | None = None
    params: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def param(self, name: str, default: str | None = None) -> str | None:
        return dict(self.params).get(name, default)

    def describe(self) -> dict[str, Any]:
        return {"provider": self.provider, "path": self.path, **dict(self.params)}


@dataclass(frozen=True)
class RuntimeConfig:
    """What every worker needs to open its resources in `DoFn.setup()`; no secrets inside."""

    run_id: str
    dataset_id: str
    state_dir: str
    keys: KeyRef
    vault: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"backend": "sqlite", "path": ...}
    progress_addr: tuple[str, int] | None = None  # loopback UDP listener for live progress (local runners only)

    def with_dataset(self, dataset_id: str) -> RuntimeConfig:
        return replace(self, dataset_id=dataset_id)


def new_run_id() -> str:
    return uuid.uuid4().hex


def load_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    from cloakbeam.core.safeyaml import read_yaml_file

    _, data = read_yaml_file(Path(path), what="config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a YAML mapping")
    allowed = {"state_dir", "keys", "vault", "reveal", "signing_public_key"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(allowed))}")
    return data


def resolve_state_dir(option: str | None, config: Mapping[str, Any], create: bool = True, quiet: bool = False) -> Path:
    """Pick the local state directory and create it on first use with a one-line notice on stderr."""
    chosen = option or os.environ.get("CLOAKBEAM_STATE_DIR") or config.get("state_dir") or DEFAULT_STATE_DIR
    p = Path(chosen).expanduser().resolve()
    if create and not p.exists():
        p.mkdir(parents=True, mode=0o700)
        if not quiet:
            print(f"cloakbeam: created local state directory {p} (dev keyring, vault, audit log)", file=sys.stderr)
    return p


def key_ref_from(config: Mapping[str, Any], state_dir: Path) -> KeyRef:
    keys = dict(config.get("keys") or {})
    provider = keys.pop("provider", "local")
    path = keys.pop("path", None)
    if provider == "local" and path is None:
        path = str(state_dir / "keyring.json")
    return KeyRef(provider=provider, path=path, params=tuple(sorted((str(k), str(v)) for k, v in keys.items())))


def vault_ref_from(config: Mapping[str, Any], state_dir: Path) -> dict[str, Any]:
    vault = dict(config.get("vault") or {})
    vault.setdefault("backend", "sqlite")
    if vault["backend"] == "sqlite":
        vault.setdefault("path", str(state_dir / "vault.sqlite"))
    if "dsn" in vault:
        raise ConfigError("put the PostgreSQL DSN in an environment variable and name it with 'dsn_env', not in the config file")
    return vault
